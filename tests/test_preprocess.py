"""MONAI preprocessing: canonical grid, brain mask, intensity scale, and the exact way back."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from anomaly.config import PreprocessConfig
from anomaly.preprocess import InputSpec, prepare_volume, quantiles, to_native
from anomaly.volume import Volume, VolumeError
from tests.conftest import SHARED_DATA, phantom

SPEC = InputSpec(slice_size=64, spacing=(1.0, 1.0, 1.0))


def _volume(data: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(data=data.astype(np.float32), affine=affine)


def _las(shape: tuple[int, int, int], zooms: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    affine = np.diag([-zooms[0], zooms[1], zooms[2], 1.0])
    affine[:3, 3] = [shape[0] * zooms[0] / 2, -shape[1] * zooms[1] / 2, -shape[2] * zooms[2] / 2]
    return affine


@pytest.mark.parametrize("affine", [np.eye(4), _las((56, 64, 48))], ids=["RAS", "LAS"])
def test_round_trip_is_exact_on_1mm_grids(affine: np.ndarray) -> None:
    vol = _volume(phantom(), affine)
    prepared = prepare_volume(vol, PreprocessConfig(), SPEC)
    assert prepared.image.shape[:2] == (64, 64)
    back = to_native(prepared.image, prepared)
    assert back.shape == vol.shape
    lo, hi = prepared.intensity_range
    expected = np.clip((vol.data - lo) / (hi - lo), 0, 1.5)
    inside = to_native(prepared.mask.astype(np.float32), prepared, mode="nearest") > 0.5
    assert inside.sum() > 0.9 * (vol.data > 0).sum()
    np.testing.assert_allclose(back[inside], expected[inside], atol=1e-4)


def test_orientation_is_canonical_ras() -> None:
    """A left-right flipped (LAS) copy must land on the same model grid as the RAS original."""
    data = phantom(lesion=True)
    ras = prepare_volume(_volume(data, np.eye(4)), PreprocessConfig(), SPEC)
    las_affine = np.diag([-1.0, 1, 1, 1])
    las_affine[0, 3] = data.shape[0] - 1
    las = prepare_volume(_volume(data[::-1].copy(), las_affine), PreprocessConfig(), SPEC)
    np.testing.assert_allclose(ras.image, las.image, atol=1e-5)
    np.testing.assert_allclose(ras.affine, las.affine, atol=1e-6)


def test_anisotropic_volume_is_resampled_to_model_spacing() -> None:
    data = phantom()[:, :, ::2]
    vol = _volume(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    prepared = prepare_volume(vol, PreprocessConfig(), SPEC)
    assert prepared.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert prepared.image.shape[2] >= 2 * (data[0, 0].size // 2) * 0.6
    back = to_native(prepared.image, prepared)
    assert back.shape == vol.shape


def test_constant_nonzero_background_gives_a_brain_mask() -> None:
    """z-normalised data (background constant but not zero) is masked like zero-background data."""
    data = phantom()
    shifted = np.where(data > 0, (data - 80) / 20, -1.7).astype(np.float32)
    a = prepare_volume(_volume(data, np.eye(4)), PreprocessConfig(), SPEC)
    b = prepare_volume(_volume(shifted, np.eye(4)), PreprocessConfig(), SPEC)
    assert abs(int(a.mask.sum()) - int(b.mask.sum())) < 0.02 * a.mask.sum()


def test_intensity_scale_uses_brain_percentiles() -> None:
    prepared = prepare_volume(_volume(phantom() * 7.5 + 3, np.eye(4)), PreprocessConfig(), SPEC)
    inside = prepared.image[prepared.mask]
    assert inside.min() >= 0 and inside.max() <= 1.5
    assert np.isclose(np.percentile(inside, 99.5), 1.0, atol=0.02)
    assert (prepared.image[~prepared.mask] == 0).all()


def test_slices_are_only_those_with_brain() -> None:
    prepared = prepare_volume(_volume(phantom(), np.eye(4)), PreprocessConfig(), SPEC)
    area = prepared.mask.sum(axis=(0, 1))
    assert (area[prepared.slices] > 0).all()
    assert set(np.flatnonzero(area > 0.05 * 64 * 64)) <= set(prepared.slices)


def test_empty_foreground_is_refused() -> None:
    data = np.zeros((40, 40, 40), np.float32)
    data[20, 20, 20] = 1.0
    with pytest.raises(VolumeError, match="no brain"):
        prepare_volume(_volume(data, np.eye(4)), PreprocessConfig(), SPEC)


def test_head_with_skull_is_reported() -> None:
    """A real head with skull must carry a clear warning (skull-stripped input is assumed)."""
    head = SHARED_DATA / "healthy" / "brainchop_t1_head.nii.gz"
    if not head.exists():
        pytest.skip("shared data not available")
    img = nib.load(str(head))
    vol = _volume(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    prepared = prepare_volume(vol, PreprocessConfig(), InputSpec(slice_size=192))
    assert any("skull" in w for w in prepared.warnings)


def test_slice_size_must_suit_the_model() -> None:
    with pytest.raises(VolumeError, match="multiple of 8"):
        prepare_volume(_volume(phantom(), np.eye(4)), PreprocessConfig(slice_size=60), SPEC)


@pytest.mark.parametrize("n", [1, 2, 7, 1001, 250_001])
def test_quantiles_by_selection_are_torch_quantile_bit_for_bit(n: int) -> None:
    generator = torch.Generator().manual_seed(n)
    q = torch.tensor([0.005, 0.995, 0.5, 0.0, 1.0, 0.25])
    for values in (torch.randn(n, generator=generator) * 100,  # distinct values
                   (torch.randn(n, generator=generator) * 3).round(),  # many ties
                   torch.rand(n, generator=generator, dtype=torch.float64)[::3]):  # float64, strided
        assert torch.equal(quantiles(values, q.to(values.dtype)), torch.quantile(values, q.to(values.dtype)))
    with pytest.raises(ValueError, match="empty"):
        quantiles(torch.zeros(0), q)
