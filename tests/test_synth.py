"""Tests for synthetic lesions: deterministic, inside the brain, in range where promised, never empty."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from anomaly.synth import (
    IN_RANGE_KINDS,
    KINDS,
    BrainStats,
    LesionSpec,
    add_lesions,
    apply_lesions,
    plan_lesions,
)


def _phantom(shape: tuple[int, int, int] = (48, 56, 48), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoid 'brain' (CSF rim, grey and white matter, noise) in a zero background, and its mask."""
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    radius = np.sqrt(sum(((g - (s - 1) / 2) / (0.45 * s)) ** 2 for g, s in zip(grid, shape, strict=True)))
    rng = np.random.default_rng(seed)
    data = np.where(radius < 0.55, 200.0, np.where(radius < 0.9, 150.0, 60.0))
    data = data + rng.normal(0, 6, shape)
    brain = radius < 1.0
    return np.where(brain, data, 0).astype(np.float32), brain


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    return _phantom()


def test_same_seed_same_lesions_other_seed_differs(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    data, brain = phantom
    first = add_lesions(data, brain, (1.0, 1.0, 1.0), n=3, seed=7, radius_mm=(3, 6))
    again = add_lesions(data, brain, (1.0, 1.0, 1.0), n=3, seed=7, radius_mm=(3, 6))
    other = add_lesions(data, brain, (1.0, 1.0, 1.0), n=3, seed=8, radius_mm=(3, 6))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_input_is_not_modified(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    data, brain = phantom
    before = data.copy()
    out, _ = add_lesions(data, brain, (1.0, 1.0, 1.0), n=2, seed=1, radius_mm=(3, 6))
    np.testing.assert_array_equal(data, before)
    assert out.dtype == np.float32 and out.shape == data.shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 1.1, 2.0)])
def test_each_kind_is_inside_the_brain_and_not_empty(phantom: tuple[np.ndarray, np.ndarray], kind: str,
                                                     spacing: tuple[float, float, float]) -> None:
    data, brain = phantom
    out, truth = add_lesions(data, brain, spacing, kinds=[kind], n=2, seed=3, radius_mm=(3, 6))
    assert truth.dtype == bool and truth.shape == data.shape
    assert truth.sum() >= 2
    assert not (truth & ~brain).any(), "ground truth outside the brain"
    changed = out != data
    assert not (changed & ~brain).any(), "voxels changed outside the brain"
    # everything that changed is the lesion or its soft rim (no mass effect asked for)
    near_truth = ndimage.binary_dilation(truth, iterations=3)
    assert not (changed & ~near_truth).any()
    stats = BrainStats.from_volume(data, brain)
    assert np.abs(out - data)[truth].mean() > 0.05 * stats.span, "the lesion must be visible"


@pytest.mark.parametrize("kind", sorted(IN_RANGE_KINDS))
def test_in_range_kinds_stay_in_the_normal_range(phantom: tuple[np.ndarray, np.ndarray], kind: str) -> None:
    data, brain = phantom
    p1, p99 = np.percentile(data[brain], [1, 99])
    for seed in range(3):
        out, truth = add_lesions(data, brain, (1.0, 1.0, 1.0), kinds=[kind], n=2, seed=seed, radius_mm=(3, 7))
        changed = out != data
        assert truth.any()
        assert out[changed].min() >= p1 - 1e-3 and out[changed].max() <= p99 + 1e-3


def test_out_of_range_kinds_leave_the_normal_range(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    data, brain = phantom
    p1, p99 = np.percentile(data[brain], [1, 99])
    bright, truth = add_lesions(data, brain, (1.0, 1.0, 1.0), kinds=["hyperintense"], n=1, seed=0)
    assert bright[truth].max() > p99
    dark, truth = add_lesions(data, brain, (1.0, 1.0, 1.0), kinds=["hypointense"], n=1, seed=0)
    assert dark[truth].min() < p1 and dark[truth].min() > 0, "dark lesions stay above the zero background"
    mass, truth = add_lesions(data, brain, (1.0, 1.0, 1.0), kinds=["mass"], n=1, seed=0, radius_mm=(6, 8))
    assert mass[truth].max() > p99 and mass[truth].min() < p1


def test_plan_places_separate_lesions_at_brain_voxels(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    data, brain = phantom
    specs = plan_lesions(brain, (1.0, 1.0, 1.0), n=5, seed=2, radius_mm=(2, 4))
    assert len(specs) == 5 and {s.kind for s in specs} == set(KINDS)
    assert all(brain[s.center] for s in specs)
    centres = np.array([s.center for s in specs], dtype=float)
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(5) * 1e9
    assert gaps.min() > 2 * 2.0
    out, truth = apply_lesions(data, brain, (1.0, 1.0, 1.0), specs)
    assert all(truth[s.center] for s in specs)


def test_mass_effect_moves_tissue_inside_the_brain_only(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    data, brain = phantom
    plain, truth = add_lesions(data, brain, (1.0, 1.0, 1.0), kinds=["mass"], n=1, seed=4, radius_mm=(5, 6))
    pushed, truth_pushed = add_lesions(data, brain, (1.0, 1.0, 1.0), kinds=["mass"], n=1, seed=4,
                                       radius_mm=(5, 6), mass_effect_mm=2.0)
    np.testing.assert_array_equal(truth, truth_pushed)
    moved = (pushed != plain) & ~ndimage.binary_dilation(truth, iterations=3)
    assert moved.sum() > 50, "tissue around the mass is displaced"
    assert not ((pushed != data) & ~brain).any()


def test_tiny_lesion_is_never_empty(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    data, brain = phantom
    spec = LesionSpec(kind="hyperintense", center=(24, 28, 24), radius_mm=0.4, seed=1)
    _, truth = apply_lesions(data, brain, (1.0, 1.0, 1.0), [spec])
    assert truth[24, 28, 24]


def test_bad_arguments_are_refused(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    data, brain = phantom
    with pytest.raises(ValueError, match="unknown lesion kind"):
        add_lesions(data, brain, (1.0, 1.0, 1.0), kinds=["glowing"])
    with pytest.raises(ValueError, match="brain mask"):
        add_lesions(data, np.zeros_like(brain), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        add_lesions(data, brain, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="no room"):
        add_lesions(data, brain, (1.0, 1.0, 1.0), n=40, radius_mm=(15, 15))


def test_full_size_volume_is_fast() -> None:
    data, brain = _phantom((182, 218, 182))
    start = time.perf_counter()
    out, truth = add_lesions(data, brain, (1.0, 1.0, 1.0), n=5, seed=0, radius_mm=(5, 15))
    elapsed = time.perf_counter() - start
    assert truth.any() and not (truth & ~brain).any()
    assert elapsed < 3.0, f"5 lesions took {elapsed:.1f} s"
