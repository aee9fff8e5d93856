"""Tests for the synthetic lesion blobs of the restoration stage's training: they change whole regions
inside the brain only, reproducibly, and the recipe checks their settings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from anomaly.training.blobs import BlobSettings, blob_weight, draw_radius, paint_blobs
from anomaly.training.config import ConfigError, DenoiserTrainConfig, load_recipe
from anomaly.training.denoiser import corrupt


def _batch(n: int = 6, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    brain = (((yy - size / 2) / 26) ** 2 + ((xx - size / 2) / 22) ** 2 < 1).float()
    texture = 0.5 + 0.1 * torch.sin(xx / 3.0) * torch.cos(yy / 5.0)
    x = (texture * brain).expand(n, 1, size, size).clone()
    return x, brain.expand(n, 1, size, size).clone()


def test_blob_weight_is_a_soft_ellipse() -> None:
    w = blob_weight((64, 64), (32.0, 32.0), (4.0, 8.0), 0.0, torch.Generator().manual_seed(0))
    assert float(w[32, 32]) == 1.0 and float(w[0, 0]) == 0.0 and float(w.min()) >= 0 and float(w.max()) <= 1
    # radii (along y, along x) = (4, 8): wider along x
    assert float(w[32, 38]) > 0.5 and float(w[38, 32]) < 0.5
    assert ((w > 0) & (w < 1)).any()  # a soft border


def test_paint_blobs_changes_regions_inside_the_brain_only_and_is_reproducible() -> None:
    x, brain = _batch()
    settings = BlobSettings(probability=1.0, count=(2, 3), radius_px=(4.0, 8.0))
    a = paint_blobs(x, brain, settings, torch.Generator().manual_seed(1))
    b = paint_blobs(x, brain, settings, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x)
    changed = (a - x).abs() > 0.05
    assert not changed[brain == 0].any()  # never outside the brain
    per_slice = changed.flatten(1).sum(1)
    assert bool((per_slice > 20).all())  # every slice got a region, not a speck
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    none = paint_blobs(x, brain, replace(settings, probability=0.0), torch.Generator().manual_seed(1))
    assert torch.equal(none, x)


def test_corrupt_paints_blobs_only_when_asked() -> None:
    x, brain = _batch()
    plain = DenoiserTrainConfig(noise_std=(0.0, 0.0))
    assert torch.allclose(corrupt(x, brain, plain, torch.Generator().manual_seed(2)), x)
    painted = corrupt(x, brain, replace(plain, blob_probability=1.0), torch.Generator().manual_seed(2))
    assert float((painted - x).abs().max()) > 0.1


def test_recipe_checks_blob_settings(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nstage: denoiser\ndenoiser:\n  blob_probability: 0.5\n  blob_radius_px: [2, 9]\n")
    loaded = load_recipe(recipe)
    assert loaded.denoiser.blob_probability == 0.5 and tuple(loaded.denoiser.blob_radius_px) == (2, 9)
    for bad, word in (("blob_probability: 1.5", "blob_probability"), ("blob_count: [3, 1]", "blob_count"),
                      ("blob_radius_px: [0, 4]", "blob_radius_px"), ("blob_from_step: -1", "blob_from_step"),
                      ("blob_radius_sampling: cubic", "blob_radius_sampling")):
        recipe.write_text(f"name: x\nstage: denoiser\ndenoiser:\n  {bad}\n")
        with pytest.raises(ConfigError, match=word):
            load_recipe(recipe)


def test_foreign_blobs_move_normal_tissue_and_stay_in_its_range() -> None:
    """``foreign_share``: blobs of tissue from elsewhere (anatomy out of place) change regions inside the
    brain, reproducibly, without leaving the batch's own intensity range: what a level or a shift never shows."""
    x, brain = _batch()
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    for b in range(len(x)):  # a pattern of its own per slice, so tissue from elsewhere differs
        x[b, 0] = (0.5 + 0.2 * torch.sin(xx / (2.0 + b)) * torch.cos(yy / (3.0 + b))) * brain[b, 0]
    settings = BlobSettings(probability=1.0, count=(2, 3), radius_px=(6.0, 10.0), foreign_share=1.0)
    a = paint_blobs(x, brain, settings, torch.Generator().manual_seed(4))
    assert torch.equal(a, paint_blobs(x, brain, settings, torch.Generator().manual_seed(4)))
    changed = (a - x).abs() > 0.02
    assert not changed[brain == 0].any() and int(changed.sum()) > 200
    inside = brain > 0.5
    low, high = float(x[inside].min()), float(x[inside].max())
    assert low - 0.035 <= float(a[inside].min()) and float(a[inside].max()) <= high + 0.035  # grain at most
    plain = paint_blobs(x, brain, replace(settings, foreign_share=0.0), torch.Generator().manual_seed(4))
    assert torch.equal(plain, paint_blobs(x, brain, BlobSettings(1.0, (2, 3), (6.0, 10.0)),
                                          torch.Generator().manual_seed(4)))  # off: the draws of before
    recipe = DenoiserTrainConfig(blob_probability=0.5, blob_foreign_share=0.3)
    assert recipe.blob_foreign_share == 0.3
    with pytest.raises(ConfigError, match="blob_foreign_share"):
        DenoiserTrainConfig(blob_foreign_share=1.2)


def test_log_radius_sampling_draws_small_blobs_as_often_per_octave() -> None:
    """``radius_sampling: log`` spreads radii evenly over octaves (1-2, 2-4, 4-8, 8-16 px each about a
    quarter), so lesion-sized small blobs are common; uniform sampling puts most radii in the top octave."""
    octaves = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    for sampling, check in (("log", lambda share: bool((abs(share - 0.25) < 0.03).all())),
                            ("uniform", lambda share: float(share[0]) < 0.1 and float(share[-1]) > 0.5)):
        g = torch.Generator().manual_seed(5)
        radii = torch.tensor([draw_radius((1.0, 16.0), sampling, g) for _ in range(4000)])
        assert float(radii.min()) >= 1.0 and float(radii.max()) <= 16.0
        share = torch.histogram(radii, octaves).hist / len(radii)
        assert check(share), (sampling, share)
    x, brain = _batch()
    settings = BlobSettings(probability=1.0, count=(1, 1), radius_px=(1.0, 16.0), radius_sampling="log")
    painted = paint_blobs(x, brain, settings, torch.Generator().manual_seed(6))
    assert torch.equal(painted, paint_blobs(x, brain, settings, torch.Generator().manual_seed(6)))
    uniform = paint_blobs(x, brain, replace(settings, radius_sampling="uniform"), torch.Generator().manual_seed(6))
    small = ((painted - x).abs() > 0.05).flatten(1).sum(1).float().median()
    large = ((uniform - x).abs() > 0.05).flatten(1).sum(1).float().median()
    assert small < large  # the same draws otherwise: log sampling paints smaller regions
