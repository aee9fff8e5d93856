"""Atlases from mricron-data and the MNI-space test, checked against the files read directly."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly import atlas as A

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_atlases = pytest.mark.skipif(
    sorted(A.available_atlases()) != sorted(A.ATLASES), reason="mricron-data (atlases) not installed")


def _label_by_hand(image_path: Path, table: Path, world: tuple[float, float, float]) -> str:
    """Look a point up without the module: nearest voxel, then the matching line of the label file."""
    image = nib.load(str(image_path))
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(image.affine), world)).astype(int)
    value = int(np.asarray(image.dataobj)[tuple(ijk)])
    for line in table.read_text().splitlines():
        fields = line.split("\t") if "\t" in line else line.split()
        if fields and fields[0] == str(value):
            return fields[1].strip()
    raise AssertionError(f"value {value} not in {table}")


@needs_atlases
def test_label_tables_and_known_points() -> None:
    aal = A.load_atlas("aal")
    assert len(aal.labels) == 116 and aal.labels[1] == "Precentral_L"
    assert A.load_atlas("aal") is aal  # cached
    point = (-39.0, -6.0, 51.0)  # left precentral gyrus
    assert aal.label_at(point) == "Precentral_L"
    assert aal.label_at(point) == _label_by_hand(aal.path, A.TEMPLATE_DIR / "aal.nii.txt", point)
    assert aal.label_at((0.0, 0.0, 0.0)) == A.OUTSIDE  # the anterior commissure: unlabelled in AAL
    assert aal.label_at((500.0, 0.0, 0.0)) is None  # off the grid

    ho = A.load_atlas("harvard-oxford-cortical")
    assert len(ho.labels) == 48
    assert ho.label_at(point) == "Precentral Gyrus"
    assert ho.label_at((-10.0, -100.0, 5.0)) == "Occipital Pole"
    jhu = A.load_atlas("jhu-white-matter")
    assert jhu.label_at((0.0, 20.0, 18.0)) == "Genu_of_corpus_callosum"
    assert jhu.label_at((0.0, 20.0, 18.0)) == _label_by_hand(
        jhu.path, A.TEMPLATE_DIR / "JHU-WhiteMatter-labels-1mm.nii.txt", (0.0, 20.0, 18.0))


@needs_atlases
def test_majority_label() -> None:
    aal = A.load_atlas("aal")
    points = np.array([[-39, -6, 51]] * 3 + [[39, -6, 51]] * 2 + [[900, 0, 0]] * 9, dtype=float)
    assert aal.majority_label(points) == "Precentral_L"  # off-grid points do not vote
    assert aal.majority_label(np.array([[900.0, 0, 0]])) is None
    assert aal.majority_label(np.array([[0.0, 0, 0]] * 2 + [[-39, -6, 51]])) == A.OUTSIDE


def test_unknown_or_missing_atlas(tmp_path) -> None:
    with pytest.raises(A.AtlasError, match="unknown atlas 'talairach'"):
        A.load_atlas("talairach")
    with pytest.raises(A.AtlasError, match="apt-get install mricron-data"):
        A.load_atlas("aal", template_dir=tmp_path)
    assert A.load_atlas("aal", template_dir=tmp_path, missing_ok=True) is None
    assert A.available_atlases(tmp_path) == []


def _template_mask_2mm() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 grey+white matter mask read straight from nilearn's files, on a 2 mm grid."""
    folder = A._nilearn_data_dir()
    images = [nib.load(str(folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz")) for k in ("gm", "wm")]
    tissue = sum(np.asarray(i.dataobj, dtype=np.float32) / 255.0 for i in images)
    affine = images[0].affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    return tissue[::2, ::2, ::2] > 0.5, affine


def test_mni_space_detection_on_template_and_moved_copies() -> None:
    mask, affine = _template_mask_2mm()
    assert A.is_mni_space(mask, affine)
    measures = A.mni_overlap(mask, affine)
    assert measures["scan_in_mni"] > 0.95 and measures["centroid_shift_mm"] < 2
    moved = affine.copy()
    moved[:3, 3] += [0.0, 25.0, 0.0]  # 25 mm forward: same brain, wrong coordinates
    assert not A.is_mni_space(mask, moved)
    scanner = np.diag([-2.0, 2.0, 2.0, 1.0])  # array corner at the origin, as many scanner headers
    assert not A.is_mni_space(mask, scanner)
    with pytest.raises(ValueError, match="non-empty 3D"):
        A.is_mni_space(np.zeros((4, 4, 4), bool), np.eye(4))


@pytest.mark.skipif(not (A.TEMPLATE_DIR / "ch2bet.nii.gz").is_file(), reason="mricron-data not installed")
def test_colin27_is_in_mni_space() -> None:
    image = nib.load(str(A.TEMPLATE_DIR / "ch2bet.nii.gz"))
    assert A.is_mni_space(np.asarray(image.dataobj) > 0, image.affine)


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data folder not present")
def test_real_scans_mni_or_not() -> None:
    ms = sorted(DATA.glob("ms-open/*/t1.nii.gz"))
    brats = sorted(DATA.glob("brats2013/*/brain_mask.nii.gz"))
    if not ms or not brats:
        pytest.skip("ms-open or brats2013 data missing")
    image = nib.load(str(ms[0]))
    assert A.is_mni_space(np.asarray(image.dataobj) > 0, image.affine)  # registered to MNI
    image = nib.load(str(brats[0]))
    assert not A.is_mni_space(np.asarray(image.dataobj) > 0, image.affine)  # SRI24 grid, header not MNI
