"""Per-scan map normalisation: maps of scans whose residuals differ only in scale come out equal."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from anomaly.config import ScoringSettings
from anomaly.mapnorm import robust_stats, robust_z
from anomaly.models import load_model
from anomaly.models.autoencoder import MapConfig, ScanContext
from anomaly.scoring import score_volume
from anomaly.volume import Volume
from tests.conftest import phantom


def test_robust_stats_ignore_a_small_bright_lesion() -> None:
    rng = np.random.default_rng(0)
    healthy = rng.normal(1.0, 0.1, 100_000)
    lesioned = healthy.copy()
    lesioned[:3_000] = 50.0  # 3 % of the brain, far outside the normal range
    median, spread = robust_stats(healthy)
    assert median == pytest.approx(1.0, abs=0.01) and spread == pytest.approx(0.1, rel=0.03)
    m2, s2 = robust_stats(lesioned)
    assert abs(m2 - median) < 0.01 and s2 == pytest.approx(spread, rel=0.1)
    mask = np.ones_like(healthy, dtype=bool)
    # the normalised map does not depend on the scan's scale or offset
    np.testing.assert_allclose(robust_z(3 * lesioned + 2, mask), robust_z(lesioned, mask), rtol=1e-4, atol=1e-4)


def test_robust_spread_of_a_term_that_is_mostly_zero_stays_positive() -> None:
    values = np.zeros(10_000)
    values[:50] = 1.0
    assert robust_stats(values)[1] > 0


def test_normalised_maps_share_one_scale_across_scans(tiny_vae_folder: Path) -> None:
    model = load_model(tiny_vae_folder)
    model.map_config = MapConfig(sign="abs", intensity_weight=1.0, normalise="robust")
    data = phantom(seed=1, lesion=True)
    affine = np.eye(4)
    settings = ScoringSettings()
    maps = score_volume(Volume(data, affine, Path("scan_t2.nii.gz")), model, settings)
    assert maps.anomaly.shape == data.shape and maps.anomaly.min() >= 0 and np.isfinite(maps.anomaly).all()
    assert (maps.anomaly[~maps.brain_mask] == 0).all()
    # on the model grid the map is in units of the brain's own spread: its median sits near 0-2 spreads
    inside = maps.grid_anomaly[maps.grid_mask]
    assert np.median(inside) < 3
    # combine_parts: scaling the residual of a scan (a noisier scanner) leaves the map unchanged, and the
    # intensity term is added on its own (per-scan percentile) scale
    prepared = maps.prepared
    rng = np.random.default_rng(0)
    residual = np.where(prepared.mask, rng.gamma(2.0, 0.02, prepared.image.shape), 0).astype(np.float32)
    parts = {"residual": residual, "intensity": prepared.image}
    ctx = ScanContext(contrast="t2")
    one = model.combine_parts(parts, prepared, ctx)
    two = model.combine_parts({**parts, "residual": 4 * residual}, prepared, ctx)
    np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-4)
    expected = np.clip(robust_z(residual, prepared.mask) + prepared.image, 0, None)
    np.testing.assert_allclose(one, expected, rtol=1e-5, atol=1e-5)
    # without normalisation the same change would scale the map
    model.map_config = replace(model.map_config, normalise="none")
    raw = score_volume(Volume(data, affine, Path("scan_t2.nii.gz")), model, settings)
    assert not np.allclose(raw.grid_anomaly, maps.grid_anomaly)


def test_per_contrast_overrides_are_checked() -> None:
    config = MapConfig(sign="abs", sign_by_contrast={"t2": "positive"}, intensity_weight=1.0,
                       intensity_weight_by_contrast={"t1": 0.0}, residual_weight_by_contrast={"flair": 0.02})
    assert config.sign_for("t2") == "positive" and config.sign_for("t1") == "abs" and config.sign_for(None) == "abs"
    assert config.residual_weight_for("flair") == 0.02 and config.residual_weight_for("t2") == 1.0
    assert config.weight_for("t1") == 0.0 and config.weight_for("flair") == 1.0 and config.depends_on_contrast
    with pytest.raises(ValueError, match="sign_by_contrast.t2"):
        MapConfig(sign_by_contrast={"t2": "up"})
    with pytest.raises(ValueError, match="unknown contrast"):
        MapConfig(intensity_weight_by_contrast={"dwi": 1.0})
    with pytest.raises(ValueError, match="normalise"):
        MapConfig(normalise="zscore")


def test_a_contrast_enhanced_t1_is_scored_with_its_own_sign(tiny_vae_folder: Path) -> None:
    """A file named t1ce is scored as t1c: the T1 network, the t1c map rule (bright enhancing tissue counts)."""
    model = load_model(tiny_vae_folder)
    rule = MapConfig(reference="input", normalise="robust-signed", sign="abs",
                     sign_by_contrast={"t1": "negative", "t1c": "abs"})
    data, affine = phantom(seed=2, lesion=True), np.eye(4)
    model.map_config = rule
    enhanced = score_volume(Volume(data, affine, Path("Brats_x_t1ce.nii.gz")), model)
    native = score_volume(Volume(data, affine, Path("Brats_x_t1.nii.gz")), model)
    assert enhanced.prepared.contrast == "t1c" and native.prepared.contrast == "t1"
    model.map_config = replace(rule, sign_by_contrast={"t1": "abs"})
    as_abs = score_volume(Volume(data, affine, Path("Brats_x_t1.nii.gz")), model)
    np.testing.assert_allclose(enhanced.grid_anomaly, as_abs.grid_anomaly, rtol=1e-5, atol=1e-5)
    assert not np.allclose(enhanced.grid_anomaly, native.grid_anomaly)
