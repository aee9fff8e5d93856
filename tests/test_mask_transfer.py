"""Brain masks of T2/FLAIR heads: the session T1's deepbet mask carried over by a real rigid registration
(ANTsPy), its automatic pairing in BIDS and plain folders, and the refusal when no method finds a brain."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to

from anomaly.brain_extraction import brain_fill, brain_mask_for
from anomaly.config import PreprocessConfig
from anomaly.mask_transfer import find_session_t1
from anomaly.volume import Volume, VolumeError, load_mask, load_volume
from pipelines.cli import main
from tests.conftest import SHARED_DATA, write_nifti

pytest.importorskip("deepbet")
pytest.importorskip("ants")

IXI = SHARED_DATA / "ixi-t1" / "IXI013-HH-1212"
FAST = "preprocess:\n  spacing: [2.0, 2.0, 2.0]\n  slice_size: 96\n  skull_strip_size: 128\n"
SIZE = 128
"""The extractor's cube: 128 voxels is finer than these 2 mm heads already, and keeps the tests fast."""


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def _rotation(deg: tuple[float, float, float], shift: tuple[float, float, float]) -> np.ndarray:
    out = np.eye(4)
    for axis, angle in enumerate(np.radians(deg)):
        c, s = np.cos(angle), np.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out[:3, :3] = r @ out[:3, :3]
    out[:3, 3] = shift
    return out


def _moved(data: np.ndarray, affine: np.ndarray, motion: np.ndarray, order: int) -> np.ndarray:
    """The subject moved inside the same scanner grid (content resampled, affine kept)."""
    out = resample_from_to(nib.Nifti1Image(data.astype(np.float32), affine), (data.shape, motion @ affine), order=order)
    return np.asarray(out.dataobj, dtype=np.float32)


@pytest.fixture(scope="module")
def session() -> tuple[Volume, Volume, np.ndarray]:
    """A real T1 head (IXI, 2 mm) and a second scan of the same session: contrast inverted inside the head
    (CSF bright, white matter dark, as on T2) after the subject moved 7 degrees and 8 mm; the reference is
    the intracranial DLMUSE mask moved alike."""
    if not (IXI / "t1_head.nii.gz").exists():
        pytest.skip("shared IXI data not available")
    t1 = load_volume(IXI / "t1_head.nii.gz")
    labels = load_mask(IXI / "dlmuse_labels.nii.gz", like=t1)
    motion = _rotation((7, -4, 3), (3, -5, 5))
    inside = t1.data > 0.1 * np.percentile(t1.data, 60)
    t2like = np.where(inside, t1.data.max() - t1.data, 0)
    scan = Volume(_moved(t2like, t1.affine, motion, 1), t1.affine, path=Path("sub-01_T2w.nii.gz"))
    return t1, scan, _moved(labels, t1.affine, motion, 0) > 0.5


def test_without_a_t1_the_head_template_stands_in_when_deepbet_finds_no_brain(
        session: tuple[Volume, Volume, np.ndarray]) -> None:
    """deepbet (trained on T1) takes much of the inverted head's scalp for brain: an implausible mask,
    so the stage falls back to the head template's brain carried over affinely."""
    _, scan, reference = session
    chosen, _ = brain_mask_for(scan, "force", head_ml=PreprocessConfig().skull_volume_ml, contrast="t2", size=SIZE)
    assert chosen is not None and chosen.method == "template"
    assert dice(chosen.mask, reference) > 0.85


def test_session_t1_is_found_in_bids_and_plain_folders(tmp_path: Path) -> None:
    anat = tmp_path / "sub-01" / "ses-1" / "anat"
    anat.mkdir(parents=True)
    for name in ("sub-01_ses-1_T1w.nii.gz", "sub-01_ses-1_FLAIR.nii.gz", "sub-01_ses-1_acq-fast_T2w.nii.gz"):
        (anat / name).write_bytes(b"")
    assert find_session_t1(anat / "sub-01_ses-1_FLAIR.nii.gz") == anat / "sub-01_ses-1_T1w.nii.gz"
    assert find_session_t1(anat / "sub-01_ses-1_acq-fast_T2w.nii.gz") == anat / "sub-01_ses-1_T1w.nii.gz"
    plain = tmp_path / "patient07"
    plain.mkdir()
    for name in ("p07_t2.nii.gz", "p07_t1.nii.gz", "flair.nii"):
        (plain / name).write_bytes(b"")
    assert find_session_t1(plain / "p07_t2.nii.gz") == plain / "p07_t1.nii.gz"
    assert find_session_t1(plain / "flair.nii") is None  # no t1.nii(.gz) beside it
    (plain / "t1.nii.gz").write_bytes(b"")
    assert find_session_t1(plain / "flair.nii") == plain / "t1.nii.gz"


def test_score_carries_the_session_t1_mask_onto_a_bids_t2(tmp_path: Path, session: tuple[Volume, Volume, np.ndarray]) -> None:
    t1, scan, reference = session
    anat = tmp_path / "sub-01" / "anat"
    write_nifti(anat / "sub-01_T1w.nii.gz", t1.data, t1.affine)
    src = write_nifti(anat / "sub-01_T2w.nii.gz", scan.data, scan.affine)
    config = tmp_path / "fast.yaml"
    config.write_text(FAST)
    out = tmp_path / "out"
    assert main(["score", str(src), "--out", str(out), "--model", "intensity", "--db", str(tmp_path / "a.db"),
                 "--quiet", "--config", str(config), "--csv", str(tmp_path / "s.csv")]) == 0
    written = np.asarray(nib.load(str(out / "sub-01_T2w_brain.nii.gz")).dataobj) > 0
    assert dice(written, reference) > 0.93  # deepbet on this scan alone takes the scalp (see the next test)
    assert 0.75 < brain_fill(written, scan.affine) < 1.1
    with sqlite3.connect(tmp_path / "a.db") as db:
        details = json.loads(db.execute("select details from results").fetchone()[0])
    assert details["skull_strip"] == "t1" and details["session_t1"].endswith("sub-01_T1w.nii.gz")
    # a named T1 that does not exist fails that scan with the reason, and the batch reports it
    assert main(["score", str(src), "--out", str(tmp_path / "out2"), "--model", "intensity", "--db",
                 str(tmp_path / "b.db"), "--quiet", "--config", str(config), "--csv", str(tmp_path / "f.csv"),
                 "--t1-for-mask", str(tmp_path / "missing_T1w.nii.gz")]) == 1
    assert "the T1 named by --t1-for-mask was not found" in (tmp_path / "f.csv").read_text()


def test_no_plausible_brain_is_refused_in_one_line_with_what_to_do() -> None:
    """A ball of noise 90 mm across (a phantom, no head): deepbet's mask is far too small a brain, and the
    head template would have to shrink to half its size to fit it."""
    rng = np.random.default_rng(0)
    grid = np.indices((64, 64, 64)).astype(np.float32)
    ball = ((grid - 31.5) ** 2).sum(axis=0) < 18**2
    data = np.where(ball, rng.uniform(50, 100, ball.shape), 0).astype(np.float32)
    volume = Volume(data, np.diag([2.5, 2.5, 2.5, 1.0]), path=Path("noise_flair.nii.gz"))
    with pytest.raises(VolumeError) as err:
        brain_mask_for(volume, "force", head_ml=PreprocessConfig().skull_volume_ml, contrast="flair", size=SIZE)
    message = str(err.value)
    assert "\n" not in message and message.startswith("noise_flair.nii.gz: brain extraction")
    assert "--t1-for-mask" in message and "--brain-mask" in message
