"""The shortcuts (one lattice, hole filling, the median where read) give what MONAI and scipy give, and only apply where they hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import FillHoles, SpatialResample
from scipy import ndimage

from anomaly.lattice import lattice_map
from anomaly.median import median_in_plane
from anomaly.preprocess import fill_holes, largest_component, resample_grid


def _monai_resample(array: np.ndarray, src: np.ndarray, shape: tuple[int, int, int], dst: np.ndarray,
                    mode: str) -> np.ndarray:
    img = MetaTensor(torch.as_tensor(array)[None], affine=torch.as_tensor(src, dtype=torch.float64))
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=np.float32)(
        img, dst_affine=torch.as_tensor(dst, dtype=torch.float64), spatial_size=shape)
    return np.asarray(out.as_tensor()[0].numpy())  # type: ignore[union-attr]


def _reoriented(rng: np.random.Generator, shape: tuple[int, int, int], centre: np.ndarray) -> np.ndarray:
    """An affine that permutes and flips axes, 1 mm spacing, its middle voxel a few whole voxels from ``centre``."""
    perm = rng.permutation(3)
    rot = np.zeros((3, 3))
    rot[perm, np.arange(3)] = rng.choice([-1.0, 1.0], size=3)
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = centre - rot @ (np.array(shape) // 2) + rng.integers(-4, 5, size=3)
    return affine


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_lattice_copy_equals_monai_resample(seed: int, mode: str) -> None:
    rng = np.random.default_rng(seed)
    src_shape, dst_shape = (20, 17, 13), (15, 22, 18)
    array = rng.normal(size=src_shape).astype(np.float32)
    src = np.diag([1.0, 1.0, 1.0, 1.0])
    src[:3, 3] = rng.integers(-5, 5, size=3)
    dst = _reoriented(rng, dst_shape, src[:3, 3] + np.array(src_shape) // 2)
    assert lattice_map(src, dst) is not None
    fast = resample_grid(array, src, dst_shape, dst, mode)
    reference = _monai_resample(array, src, dst_shape, dst, mode)
    assert fast.shape == dst_shape and np.count_nonzero(fast) > 0
    np.testing.assert_allclose(fast, reference, rtol=1e-5, atol=1e-5)  # MONAI interpolates in float32


@pytest.mark.parametrize("change", ["spacing", "half-voxel shift", "rotation"])
def test_grids_off_the_lattice_take_monai(change: str) -> None:
    src, dst = np.eye(4), np.eye(4)
    if change == "spacing":
        dst[:3, :3] *= 1.5
    elif change == "half-voxel shift":
        dst[0, 3] = 0.5
    else:
        angle = np.deg2rad(10)
        dst[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    assert lattice_map(src, dst) is None
    array = np.random.default_rng(0).normal(size=(12, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(resample_grid(array, src, (12, 12, 12), dst),
                               _monai_resample(array, src, (12, 12, 12), dst, "bilinear"), atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_equals_monai(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((30, 28, 26)) > 0.45)  # shells, pockets and open channels
    mask[5:20, 5:20, 5:20] = True
    mask[9:13, 9:13, 9:13] = False                                     # one hole for sure
    reference = np.asarray(FillHoles()(torch.as_tensor(mask[None]).to(torch.uint8)))[0] > 0
    filled = fill_holes(mask)
    assert filled[10, 10, 10] and filled.sum() > mask.sum()
    np.testing.assert_array_equal(filled, reference)
    assert not fill_holes(np.zeros((5, 5, 5), dtype=bool)).any()


@pytest.mark.parametrize("corner", [(3, 4, 2), (0, 6, 0), (10, 0, 14)])
def test_fill_holes_and_largest_component_in_a_corner_of_the_array(corner: tuple[int, int, int]) -> None:
    """Both work on the mask's bounding box: a mask in a corner, touching faces or not, gives what the
    whole array gives (MONAI's FillHoles; scipy's labelling of the whole array)."""
    rng = np.random.default_rng(sum(corner))
    mask = np.zeros((30, 28, 26), dtype=bool)
    part = ndimage.binary_opening(rng.random((16, 18, 12)) > 0.4)
    part[3:12, 3:14, 3:10] = True
    part[5:8, 6:9, 5:7] = False                      # a pocket to fill
    part[0:2, 0:2, :] = False                        # a channel open at the box's edge: not a hole
    x, y, z = corner
    mask[x:x + 16, y:y + 18, z:z + 12] = part
    for _ in range(2):  # the part alone (a small box), then with a lone voxel far away (its own component)
        reference = np.asarray(FillHoles()(torch.as_tensor(mask[None]).to(torch.uint8)))[0] > 0
        assert reference.sum() > mask.sum()
        np.testing.assert_array_equal(fill_holes(mask), reference)
        mask[28, 26, 24] = True
    labels, n = ndimage.label(mask)
    largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    assert n > 1 and not largest[28, 26, 24]
    np.testing.assert_array_equal(largest_component(mask), largest)
    assert not largest_component(np.zeros((4, 4, 4), dtype=bool)).any()


@pytest.mark.parametrize("size", [3, 4, 5, 7])
def test_median_in_plane_equals_scipy_where_read(size: int) -> None:
    rng = np.random.default_rng(size)
    values = np.clip(rng.normal(size=(23, 19, 6)), 0, None).astype(np.float32)  # about half zero, like a signed map
    values[4:12, 3:15, :] += 2.0                                                    # a bright patch of positives
    where = rng.random(values.shape) > 0.3
    where[0, :, :] = where[:, -1, :] = True                                         # borders are read too
    reference = ndimage.median_filter(values, size=(size, size, 1))
    fast = median_in_plane(values, size, where)
    np.testing.assert_array_equal(fast[where], reference[where])
    assert (fast[~where] == 0).all() and np.count_nonzero(fast[where]) > 0
    signed = values - 0.5                                                           # negative values: scipy itself
    np.testing.assert_array_equal(median_in_plane(signed, size, where)[where],
                                  ndimage.median_filter(signed, size=(size, size, 1))[where])
