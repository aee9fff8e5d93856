"""Tests for NIfTI loading: every unusable input gets a clear reason; good inputs keep their values."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly.volume import (
    Volume,
    VolumeError,
    file_sha256,
    is_nifti_path,
    load_mask,
    load_volume,
    save_nifti,
    scan_name,
)

SHAPE = (20, 24, 16)


def _brain(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> np.ndarray:
    """A blob of varied positive values in a zero background."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape[:3]).astype(np.float32)
    centre = (np.asarray(shape[:3], dtype=np.float32) - 1) / 2
    radius = np.sqrt(sum(((g - c) / (s / 2.5)) ** 2 for g, c, s in zip(grid, centre, shape[:3], strict=True)))
    data = np.where(radius < 1, 100 + 50 * rng.random(shape[:3]), 0).astype(np.float32)
    return data


def _write(path: Path, data: np.ndarray, affine: np.ndarray | None = None, **header_fields: object) -> Path:
    image = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    for key, value in header_fields.items():
        image.header[key] = value
    nib.save(image, str(path))
    return path


def _reason(path: Path) -> str:
    with pytest.raises(VolumeError) as info:
        load_volume(path)
    error = info.value
    assert error.path == str(path)
    assert error.hint, "every error tells the user what to do"
    assert str(path) in str(error)
    return error.reason


# ---------------------------------------------------------------- good inputs


def test_ras_volume_values_and_geometry(tmp_path: Path) -> None:
    data = _brain()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-10, -12, -8)
    volume = load_volume(_write(tmp_path / "ras.nii.gz", data, affine))
    assert isinstance(volume, Volume)
    assert volume.shape == SHAPE
    assert volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data, data)
    np.testing.assert_allclose(volume.affine, affine)
    assert volume.orientation == "RAS"
    assert volume.spacing == (1.0, 1.0, 1.0)
    assert volume.name == "ras"
    assert volume.source_dtype == "float32"
    assert volume.warnings == ()


def test_las_anisotropic_volume(tmp_path: Path) -> None:
    data = _brain()
    affine = np.diag([-0.9, 1.2, 3.0, 1.0])
    volume = load_volume(_write(tmp_path / "las.nii", data, affine))
    assert volume.orientation == "LAS"
    np.testing.assert_allclose(volume.spacing, (0.9, 1.2, 3.0), rtol=1e-6)
    np.testing.assert_allclose(volume.voxel_volume_ml, 0.9 * 1.2 * 3.0 / 1000, rtol=1e-6)
    np.testing.assert_array_equal(volume.data, data)


def test_oblique_affine_is_kept(tmp_path: Path) -> None:
    angle = np.deg2rad(12)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 1.0, 2.0])
    volume = load_volume(_write(tmp_path / "oblique.nii.gz", _brain(), affine))
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    np.testing.assert_allclose(volume.spacing, (1.0, 1.0, 2.0), atol=1e-5)


def test_int16_with_scale_slope_and_intercept(tmp_path: Path) -> None:
    stored = (_brain() * 10).astype(np.int16)
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_data_dtype(np.int16)
    image.header.set_slope_inter(2.5, -7.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, str(path))
    # nibabel writes the array unscaled when it fits; check what is on disk, then what we read
    on_disk = nib.load(str(path))
    assert on_disk.header.get_data_dtype() == np.int16
    raw = np.asarray(on_disk.dataobj.get_unscaled())
    volume = load_volume(path)
    assert volume.source_dtype == "int16"
    assert volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.data, raw.astype(np.float64) * 2.5 - 7.0, rtol=1e-6)
    np.testing.assert_allclose(volume.data, on_disk.get_fdata(), rtol=1e-6)
    assert volume.data.min() == pytest.approx(-7.0)


def test_nii_and_nii_gz_read_the_same(tmp_path: Path) -> None:
    data = _brain(seed=3)
    plain = load_volume(_write(tmp_path / "a.nii", data))
    packed = load_volume(_write(tmp_path / "a.nii.gz", data))
    np.testing.assert_array_equal(plain.data, packed.data)
    np.testing.assert_array_equal(plain.affine, packed.affine)
    assert plain.name == packed.name == "a"


def test_single_volume_4d_and_5d_are_squeezed_with_a_note(tmp_path: Path) -> None:
    data = _brain()
    four = load_volume(_write(tmp_path / "four.nii.gz", data[..., None]))
    assert four.shape == SHAPE
    np.testing.assert_array_equal(four.data, data)
    assert any("single volume" in note for note in four.warnings)
    five = load_volume(_write(tmp_path / "five.nii.gz", data[..., None, None]))
    assert five.shape == SHAPE
    np.testing.assert_array_equal(five.data, data)


def test_missing_orientation_warns_and_uses_pixdim(tmp_path: Path) -> None:
    image = nib.Nifti1Image(_brain(), np.diag([2.0, 2.0, 3.0, 1.0]))
    image.header.set_zooms((2.0, 2.0, 3.0))
    image.set_sform(None, code=0)
    image.set_qform(None, code=0)
    path = tmp_path / "noform.nii.gz"
    nib.save(image, str(path))
    volume = load_volume(path)
    np.testing.assert_allclose(volume.spacing, (2.0, 2.0, 3.0))
    assert any("qform_code and sform_code are 0" in note for note in volume.warnings)


def test_unusable_sform_falls_back_on_qform(tmp_path: Path) -> None:
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    image = nib.Nifti1Image(_brain(), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path = tmp_path / "badsform.nii"
    nib.save(image, str(path))
    raw = bytearray(path.read_bytes())
    raw[280:328] = bytes(48)  # srow_x, srow_y, srow_z: an all-zero sform with sform_code 1
    path.write_bytes(bytes(raw))
    volume = load_volume(path)
    np.testing.assert_allclose(volume.affine, affine)
    assert any("sform is unusable (it is all zero)" in note for note in volume.warnings)


def test_gzip_content_with_nii_name_is_read(tmp_path: Path) -> None:
    data = _brain()
    packed = _write(tmp_path / "x.nii.gz", data)
    misnamed = tmp_path / "x_misnamed.nii"
    misnamed.write_bytes(packed.read_bytes())
    volume = load_volume(misnamed)
    np.testing.assert_array_equal(volume.data, data)
    assert any("gzip-compressed" in note for note in volume.warnings)


def test_load_mask_any_label_is_true_and_grid_is_checked(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    scan = load_volume(_write(tmp_path / "scan.nii.gz", _brain(), affine))
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[3:6, 4:8, 2:4] = 1
    labels[10:12, 10:12, 10:12] = 4
    mask = load_mask(_write(tmp_path / "labels.nii.gz", labels, affine), like=scan)
    assert mask.dtype == bool
    assert mask.sum() == (labels > 0).sum()
    empty = load_mask(_write(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.uint8), affine), like=scan)
    assert not empty.any()

    with pytest.raises(VolumeError, match=r"mask shape \(20, 24, 10\) differs"):
        load_mask(_write(tmp_path / "short.nii.gz", labels[:, :, :10], affine), like=scan)
    shifted = affine.copy()
    shifted[0, 3] = 0.5
    with pytest.raises(VolumeError, match="mask affine differs") as info:
        load_mask(_write(tmp_path / "shifted.nii.gz", labels, shifted), like=scan)
    assert "resample" in info.value.hint
    nearly = affine.copy()
    nearly[0, 3] = 5e-4
    assert load_mask(_write(tmp_path / "nearly.nii.gz", labels, nearly), like=scan).any()


def test_helpers(tmp_path: Path) -> None:
    assert scan_name("/a/b/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert scan_name("x.NII") == "x"
    assert is_nifti_path("a.nii.gz") and is_nifti_path("a.NII") and not is_nifti_path("a.png")
    path = save_nifti(_brain(), np.eye(4), tmp_path / "sub" / "s.nii.gz")
    assert path.exists() and not list(path.parent.glob(".s.nii.gz*"))
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(path.read_bytes())
    assert file_sha256(path) == file_sha256(copy)


# ---------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path: Path) -> None:
    assert "file not found" in _reason(tmp_path / "nope.nii.gz")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    assert "empty (0 bytes)" in _reason(path)


def test_text_file_named_nii_gz(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii.gz"
    path.write_text("subject 12, T1 weighted, see scanner log\n")
    reason = _reason(path)
    assert "not a NIfTI file" in reason and "text file" in reason


def test_png_named_nii(tmp_path: Path) -> None:
    path = tmp_path / "picture.nii"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(600))
    assert "PNG picture" in _reason(path)


def test_gzipped_text_is_not_nifti(tmp_path: Path) -> None:
    path = tmp_path / "text_inside.nii.gz"
    path.write_bytes(gzip.compress(b"<!DOCTYPE html><html>404 not found</html>" * 20))
    assert "HTML" in _reason(path)


def test_truncated_gzip(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.nii.gz", _brain(seed=1))
    path = tmp_path / "cut.nii.gz"
    blob = good.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    assert "truncated" in _reason(path)


def test_gzip_cut_inside_the_header(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.nii.gz", _brain(seed=1))
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(good.read_bytes()[:40])
    assert "truncated" in _reason(path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.nii.gz", _brain(seed=1))
    blob = bytearray(good.read_bytes())
    for i in range(len(blob) // 3, len(blob) // 3 + 64):
        blob[i] ^= 0xA5
    path = tmp_path / "bitrot.nii.gz"
    path.write_bytes(bytes(blob))
    reason = _reason(path)
    assert "corrupt gzip" in reason or "truncated" in reason


def test_truncated_uncompressed_data(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.nii", _brain())
    path = tmp_path / "cut.nii"
    path.write_bytes(good.read_bytes()[:2000])
    reason = _reason(path)
    assert "truncated" in reason and "bytes of voxel data" in reason


def test_truncated_data_inside_a_complete_gzip(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.nii", _brain())
    path = tmp_path / "cut_inside.nii.gz"
    path.write_bytes(gzip.compress(good.read_bytes()[:3000]))
    reason = _reason(path)
    assert "truncated" in reason and "decompressed file has" in reason


def test_2d_image(tmp_path: Path) -> None:
    reason = _reason(_write(tmp_path / "flat.nii.gz", _brain()[:, :, 8]))
    assert "2D image" in reason


def test_single_slice_volume(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((256, 256, 1)).astype(np.float32)
    reason = _reason(_write(tmp_path / "slice.nii.gz", data))
    assert "single 2D slice" in reason and "(256, 256, 1)" in reason


def test_4d_with_several_volumes(tmp_path: Path) -> None:
    data = np.stack([_brain(seed=i) for i in range(3)], axis=-1)
    with pytest.raises(VolumeError) as info:
        load_volume(_write(tmp_path / "series.nii.gz", data))
    assert "4D series with 3 volumes" in info.value.reason
    assert "fslsplit" in info.value.hint and "nibabel" in info.value.hint


def test_nan_and_inf_are_counted(tmp_path: Path) -> None:
    data = _brain()
    data[0, 0, :5] = np.nan
    data[1, 1, :2] = np.inf
    data[2, 2, 0] = -np.inf
    reason = _reason(_write(tmp_path / "nan.nii.gz", data))
    assert "5 NaN" in reason and "3 infinite" in reason


def test_all_zero_volume(tmp_path: Path) -> None:
    assert "all" in (reason := _reason(_write(tmp_path / "zero.nii.gz", np.zeros(SHAPE, np.float32))))
    assert "are zero" in reason


def test_constant_volume(tmp_path: Path) -> None:
    reason = _reason(_write(tmp_path / "flat.nii.gz", np.full(SHAPE, 7, np.int16)))
    assert "same value 7" in reason


@pytest.mark.parametrize(("zooms", "expected"), [
    ((0.05, 1.0, 1.0), "implausible voxel size"),
    ((1.0, 1.0, 12.0), "implausible voxel size"),
])
def test_absurd_voxel_sizes(tmp_path: Path, zooms: tuple[float, float, float], expected: str) -> None:
    affine = np.diag([*zooms, 1.0])
    assert expected in _reason(_write(tmp_path / "vox.nii.gz", _brain(), affine))


@pytest.mark.parametrize("pixdim", [(1.0, 0.0, 1.0), (-1.0, 1.0, 1.0)])
def test_zero_or_negative_pixdim(tmp_path: Path, pixdim: tuple[float, float, float]) -> None:
    image = nib.Nifti1Image(_brain(), np.eye(4))
    image.header["pixdim"][1:4] = pixdim
    path = tmp_path / "pixdim.nii"
    nib.save(image, str(path))
    assert "invalid voxel size" in _reason(path)


@pytest.mark.parametrize("shape", [(6, 40, 40), (4000, 8, 8)])
def test_absurd_shapes(tmp_path: Path, shape: tuple[int, int, int]) -> None:
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    assert "implausible shape" in _reason(_write(tmp_path / "shape.nii", data))


@pytest.mark.parametrize(("srow", "expected"), [
    ([0.0] * 12, "all zero"),
    ([1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0], "singular"),
    ([np.nan, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0], "non-finite"),
])
def test_unusable_affine(tmp_path: Path, srow: list[float], expected: str) -> None:
    path = _write(tmp_path / "aff.nii", _brain())
    header = nib.load(str(path)).header
    assert int(header["sform_code"]) > 0 and int(header["qform_code"]) == 0
    raw = bytearray(path.read_bytes())
    raw[280:328] = np.asarray(srow, dtype="<f4").tobytes()
    path.write_bytes(bytes(raw))
    reason = _reason(path)
    assert "unusable affine" in reason and expected in reason


def test_hdr_img_pair_header_is_rejected(tmp_path: Path) -> None:
    image = nib.Nifti1Pair(_brain(), np.eye(4))
    nib.save(image, str(tmp_path / "pair.img"))
    path = tmp_path / "pair_header.nii"
    path.write_bytes((tmp_path / "pair.hdr").read_bytes())
    assert ".hdr/.img pair" in _reason(path)


def test_rgb_image_is_rejected(tmp_path: Path) -> None:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 10
    path = tmp_path / "rgb.nii"
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))
    assert "colour" in _reason(path)
