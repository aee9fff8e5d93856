"""Tests of the viewer's volume reader: the fast gzip path gives what nibabel gives, for every NIfTI
flavour the outputs and inputs may be, and damaged files still fail with the path and nibabel's reason."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly import gzipio
from dashboard import volumes
from dashboard.volumes import VolumeLoadError, read_canonical


def _reference(path: Path) -> np.ndarray:
    image = nib.load(str(path))
    canon = nib.as_closest_canonical(image)
    return np.asarray(canon.get_fdata(dtype=np.float32))


def _affine() -> np.ndarray:
    """An oblique-free but reordered, flipped, anisotropic affine (so the RAS reordering is exercised)."""
    return np.array([[0.0, 0.0, -1.2, 40.0], [-0.9, 0.0, 0.0, 20.0], [0.0, 1.1, 0.0, -30.0], [0, 0, 0, 1]])


@pytest.mark.parametrize("flavour", ["nifti1-float", "nifti1-scaled-int16", "nifti2", "uncompressed", "big-endian"])
def test_fast_reader_gives_what_nibabel_gives(tmp_path: Path, flavour: str) -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(50, 10, (9, 11, 7)).astype(np.float32)
    data[2, 3, 4] = np.nan
    name = "scan.nii" if flavour == "uncompressed" else "scan.nii.gz"
    if flavour == "nifti1-scaled-int16":
        image = nib.Nifti1Image(rng.integers(-100, 100, data.shape).astype(np.int16), _affine())
        image.header.set_slope_inter(0.5, 3.0)
    elif flavour == "nifti2":
        image = nib.Nifti2Image(data, _affine())
    elif flavour == "big-endian":
        image = nib.Nifti1Image(data.astype(">f4"), _affine(), nib.Nifti1Header(endianness=">"))
    else:
        image = nib.Nifti1Image(data, _affine())
    path = tmp_path / name
    nib.save(image, str(path))
    if flavour == "big-endian":
        assert nib.load(str(path)).header.endianness == ">"
    if name.endswith(".gz"):
        assert gzipio.ACCELERATED, "isal (a dependency) is not installed"
        fast = volumes._fast_nifti(str(path))
        assert fast is not None, "the fast path should have read this file"
        # native float32 without scaling is used in place (read-only, no copy); anything else is converted
        assert fast[0].flags.writeable == (flavour not in ("nifti1-float", "nifti2"))
    loaded = read_canonical(path)
    expected = _reference(path)
    assert loaded.volume.data.shape == expected.shape
    np.testing.assert_array_equal(loaded.volume.data, expected)
    assert "".join(nib.aff2axcodes(loaded.volume.affine)) == "RAS"
    np.testing.assert_allclose(loaded.volume.affine, nib.as_closest_canonical(nib.load(str(path))).affine)
    finite = expected[np.isfinite(expected)]
    assert loaded.vmin == pytest.approx(float(finite.min())) and loaded.vmax == pytest.approx(float(finite.max()))
    assert not loaded.volume.data.flags.writeable


def test_damaged_gzip_is_reported_with_path_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "broken.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    assert volumes._fast_nifti(str(path)) is None
    with pytest.raises(VolumeLoadError, match=r"broken\.nii\.gz: cannot be read as NIfTI"):
        read_canonical(path)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a header" * 40))
    with pytest.raises(VolumeLoadError, match=r"garbage\.nii\.gz: cannot be read as NIfTI"):
        read_canonical(garbage)

