"""Tests of the gzip layer: ISA-L is in use, its files are ordinary gzip, and a damaged stream raises
what the NIfTI reader turns into a clear message."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly import gzipio
from anomaly.volume import VolumeError, load_volume, save_nifti


def test_isal_is_installed_and_used() -> None:
    assert gzipio.ACCELERATED, "isal is a dependency: reinstall the project (pip install -e .)"


def test_written_files_are_plain_gzip_and_equal_for_equal_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = np.where(rng.random((40, 48, 36)) > 0.3, rng.gamma(2.0, 0.1, (40, 48, 36)), 0).astype(np.float32)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    first, second = save_nifti(data, affine, tmp_path / "a.nii.gz"), save_nifti(data, affine, tmp_path / "b.nii.gz")
    assert first.read_bytes() == second.read_bytes()  # no timestamp: reruns write identical files
    raw = gzip.decompress(first.read_bytes())  # the standard library reads it
    image = nib.Nifti1Image.from_bytes(raw)
    np.testing.assert_array_equal(np.asarray(image.dataobj), data)
    np.testing.assert_array_equal(nib.load(str(first)).get_fdata(dtype=np.float32), data)
    assert np.allclose(load_volume(first).affine, affine)


def test_reader_round_trip_and_damage() -> None:
    payload = bytes(range(256)) * 2000
    packed = gzipio.compress(payload)
    assert gzipio.reader(io.BytesIO(packed)).read() == payload
    with pytest.raises(EOFError):
        gzipio.reader(io.BytesIO(packed[: len(packed) // 2])).read()
    damaged = bytearray(packed)
    damaged[30:60] = b"\xff" * 30
    with pytest.raises((EOFError, *gzipio.CORRUPT_ERRORS)):
        gzipio.reader(io.BytesIO(bytes(damaged))).read()


def test_damaged_deflate_data_is_reported_as_corrupt(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = save_nifti(rng.normal(size=(30, 30, 30)).astype(np.float32), np.eye(4), tmp_path / "scan.nii.gz")
    blob = bytearray(path.read_bytes())
    blob[400:440] = b"\xff" * 40  # inside the deflate stream, past the gzip header
    path.write_bytes(bytes(blob))
    with pytest.raises(VolumeError, match=r"scan\.nii\.gz.*(corrupt gzip data|truncated)"):
        load_volume(path)
