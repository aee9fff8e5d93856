"""Scoring one volume: maps on the native grid, post-processing, scan scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anomaly.config import PostprocessConfig, ScoreConfig, ScoringSettings
from anomaly.models import load_model
from anomaly.preprocess import InputSpec
from anomaly.scoring import (
    batch_to_slices,
    erode_mask,
    postprocess,
    scan_score,
    score_volume,
    slices_to_batch,
)
from anomaly.volume import Volume
from tests.conftest import phantom


def _intensity_64():
    model = load_model("intensity")
    model.input_spec = InputSpec(slice_size=64)
    return model


def test_slice_layout_round_trips() -> None:
    image = np.random.default_rng(0).random((64, 64, 10)).astype(np.float32)
    index = np.array([2, 5, 7])
    batch = slices_to_batch(image, index)
    assert batch.shape == (3, 1, 64, 64)
    np.testing.assert_array_equal(batch_to_slices(batch), image[:, :, index])


def test_bright_lesion_scores_higher_and_map_is_native() -> None:
    affine = np.diag([-1.2, 1.0, 1.5, 1.0])
    healthy = score_volume(Volume(phantom(), affine), _intensity_64())
    sick = score_volume(Volume(phantom(lesion=True), affine), _intensity_64())
    assert sick.anomaly.shape == phantom().shape
    assert sick.score > healthy.score
    lesion = phantom(lesion=True) > 150
    assert sick.anomaly[lesion].mean() > 2 * sick.anomaly[~lesion & (phantom() > 0)].mean()
    assert (sick.anomaly[~sick.brain_mask] == 0).all()


def test_vae_model_gives_reconstruction_on_native_grid(tiny_vae_folder: Path) -> None:
    vol = Volume(phantom(lesion=True), np.eye(4))
    maps = score_volume(vol, load_model(tiny_vae_folder), ScoringSettings(batch_size=7))
    assert maps.reconstruction is not None and maps.reconstruction.shape == vol.shape
    assert np.isfinite(maps.anomaly).all() and (maps.anomaly >= 0).all()
    assert set(maps.timings) >= {"prepare_s", "model_s", "post_s", "total_s"}


def test_batch_size_does_not_change_the_map(tiny_healer_folder: Path) -> None:
    vol = Volume(phantom(lesion=True), np.eye(4))
    model = load_model(tiny_healer_folder)
    a = score_volume(vol, model, ScoringSettings(batch_size=4))
    b = score_volume(vol, model, ScoringSettings(batch_size=64))
    np.testing.assert_allclose(a.anomaly, b.anomaly, atol=1e-4)
    assert ScoringSettings(batch_size=4).hash() == ScoringSettings(batch_size=64).hash()
    assert ScoringSettings(seed=1).hash() != ScoringSettings(seed=2).hash()


def test_erosion_shrinks_by_the_radius() -> None:
    mask = np.zeros((40, 40, 40), bool)
    mask[10:30, 10:30, 10:30] = True
    eroded = erode_mask(mask, 2.0, (1.0, 1.0, 1.0))
    assert eroded[12:28, 12:28, 12:28].all() and not eroded[11, 20, 20]
    coarse = erode_mask(mask, 2.0, (1.0, 1.0, 2.0))
    assert coarse[20, 20, 11] and not coarse[20, 20, 10]


def test_median_filter_removes_isolated_voxels() -> None:
    mask = np.zeros((30, 30, 5), bool)
    mask[5:25, 5:25] = True
    amap = np.zeros((30, 30, 5), np.float32)
    amap[15, 15, 2] = 1.0
    amap[8:14, 8:14, 2] = 0.5
    out, scored = postprocess(amap, mask, PostprocessConfig(median_size=3, erode_mm=0), (1.0, 1.0, 1.0))
    assert out[15, 15, 2] == 0 and out[10, 10, 2] == pytest.approx(0.5)


def test_scan_score_methods() -> None:
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    mask = np.ones_like(values, bool)
    assert scan_score(values, mask, ScoreConfig(method="max")) == 999
    assert scan_score(values, mask, ScoreConfig(method="mean")) == pytest.approx(499.5)
    assert scan_score(values, mask, ScoreConfig(fraction=0.01)) == pytest.approx(np.mean(np.arange(990, 1000)))
    assert scan_score(values, np.zeros_like(mask), ScoreConfig()) == 0.0
