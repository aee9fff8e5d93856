"""Brain extraction with the real extractor (deepbet) on a real small head (IXI, 2 mm), the user's own
masks, and the ``--skull-strip`` / ``--brain-mask`` options end to end."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly.brain_extraction import (
    BrainMaskResult,
    find_user_mask,
    foreground_ml,
    strip_skull,
    user_brain_mask,
)
from anomaly.config import ConfigError, PreprocessConfig
from anomaly.preprocess import InputSpec, prepare_scan, to_native
from anomaly.volume import Volume, VolumeError, load_mask, load_volume
from pipelines.cli import main
from tests.conftest import SHARED_DATA, write_nifti

pytest.importorskip("deepbet")

IXI = SHARED_DATA / "ixi-t1" / "IXI012-HH-1211"
SPEC = InputSpec(slice_size=96, spacing=(2.0, 2.0, 2.0))
FAST = "preprocess:\n  spacing: [2.0, 2.0, 2.0]\n  slice_size: 96\n"
"""Scoring on a 2 mm model grid: the scans are 2 mm, and the tests stay fast."""


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def head() -> tuple[Volume, np.ndarray]:
    """A real head with skull (IXI T1, 2 mm, PSR) and its intracranial reference (DLMUSE labels > 0)."""
    if not (IXI / "t1_head.nii.gz").exists():
        pytest.skip("shared IXI data not available")
    volume = load_volume(IXI / "t1_head.nii.gz")
    return volume, load_mask(IXI / "dlmuse_labels.nii.gz", like=volume)


@pytest.fixture(scope="module")
def stripped(head: tuple[Volume, np.ndarray]) -> BrainMaskResult:
    return strip_skull(head[0])


def test_deepbet_finds_the_brain_of_a_real_head(head: tuple[Volume, np.ndarray], stripped: BrainMaskResult) -> None:
    volume, reference = head
    assert stripped.method == "deepbet"
    assert stripped.mask.shape == volume.shape and stripped.mask.dtype == bool
    assert dice(stripped.mask, reference) > 0.95
    assert 1200 < stripped.volume_ml < 2000


def test_a_head_is_recognised_and_a_brain_is_not(head: tuple[Volume, np.ndarray]) -> None:
    volume, reference = head
    assert foreground_ml(volume) > PreprocessConfig().skull_volume_ml
    brain = Volume(np.where(reference, volume.data, 0).astype(np.float32), volume.affine)
    assert foreground_ml(brain) < PreprocessConfig().skull_volume_ml


def test_auto_strips_a_reoriented_head_and_maps_return_to_its_grid(head: tuple[Volume, np.ndarray],
                                                                    stripped: BrainMaskResult) -> None:
    """The same head in LAS (axes reordered and flipped) is recognised, stripped, scored without the
    skull warning, and its brain mask comes back on its own grid matching the PSR result."""
    volume, _ = head
    ornt = nib.orientations.ornt_transform(nib.io_orientation(volume.affine),
                                           nib.orientations.axcodes2ornt(("L", "A", "S")))
    data = nib.apply_orientation(volume.data, ornt)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    las = Volume(np.ascontiguousarray(data, dtype=np.float32), affine)
    assert las.orientation == "LAS"
    prepared = prepare_scan(las, PreprocessConfig(), SPEC)
    assert prepared.stages["skull_strip"] == "deepbet"
    assert not any("skull" in w for w in prepared.warnings)
    back = to_native(prepared.mask.astype(np.float32), prepared, mode="nearest") > 0.5
    assert back.shape == las.shape
    expected = nib.apply_orientation(stripped.mask, ornt) > 0
    assert dice(back, expected) > 0.9
    skipped = prepare_scan(las, PreprocessConfig(skull_strip="skip"), SPEC)
    assert any("head with skull" in w and "--skull-strip" in w for w in skipped.warnings)


def test_user_masks_are_found_by_scan_name(tmp_path: Path) -> None:
    scan = tmp_path / "sub-01_T1w.nii.gz"
    folder = tmp_path / "masks"
    folder.mkdir()
    (folder / "sub-01_T1w_mask.nii.gz").write_bytes(b"")
    assert find_user_mask(folder, scan) == folder / "sub-01_T1w_mask.nii.gz"
    with pytest.raises(VolumeError, match="no brain mask for this scan"):
        find_user_mask(folder, tmp_path / "sub-02_T1w.nii.gz")
    with pytest.raises(VolumeError, match="not found"):
        find_user_mask(tmp_path / "missing", scan)


def test_user_masks_must_fit_the_grid_and_look_like_a_brain(tmp_path: Path, head: tuple[Volume, np.ndarray]) -> None:
    volume, reference = head
    good = write_nifti(tmp_path / "good.nii.gz", reference.astype(np.uint8), volume.affine, dtype=np.uint8)
    assert user_brain_mask(good, volume).method == "user"
    tiny = np.zeros(volume.shape, np.uint8)
    tiny[50:55, 50:55, 40:45] = 1
    with pytest.raises(VolumeError, match="no plausible brain"):
        user_brain_mask(write_nifti(tmp_path / "tiny.nii.gz", tiny, volume.affine, dtype=np.uint8), volume)
    shifted = volume.affine.copy()
    shifted[0, 3] += 5
    with pytest.raises(VolumeError, match="another grid"):
        user_brain_mask(write_nifti(tmp_path / "moved.nii.gz", reference.astype(np.uint8), shifted, dtype=np.uint8),
                        volume)


def test_bad_skull_strip_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match="skull_strip"):
        PreprocessConfig(skull_strip="sometimes")
    with pytest.raises(ConfigError, match="register"):
        PreprocessConfig(register="talairach")


def test_score_writes_the_extracted_brain_mask_on_the_input_grid(tmp_path: Path, head: tuple[Volume, np.ndarray],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    volume, reference = head
    src = IXI / "t1_head.nii.gz"
    out = tmp_path / "out"
    config = tmp_path / "fast.yaml"
    config.write_text(FAST)
    common = ["--model", "intensity", "--db", str(tmp_path / "a.db"), "--quiet", "--config", str(config)]
    assert main(["score", str(src), "--out", str(out), *common, "--skull-strip", "auto"]) == 0
    assert "head with skull" not in capsys.readouterr().err
    written = nib.load(str(out / "t1_head_brain.nii.gz"))
    np.testing.assert_allclose(written.affine, volume.affine, atol=1e-5)
    assert written.shape == volume.shape
    assert dice(np.asarray(written.dataobj) > 0, reference) > 0.9
    assert nib.load(str(out / "t1_head_anomaly.nii.gz")).shape == volume.shape
    # the user's own mask: used instead of the extractor, and exclusive with --skull-strip force
    masks = tmp_path / "masks"
    masks.mkdir()
    write_nifti(masks / "t1_head_mask.nii.gz", reference.astype(np.uint8), volume.affine, dtype=np.uint8)
    out2 = tmp_path / "out2"
    assert main(["score", str(src), "--out", str(out2), *common, "--brain-mask", str(masks)]) == 0
    own = np.asarray(nib.load(str(out2 / "t1_head_brain.nii.gz")).dataobj) > 0
    assert dice(own, reference) > 0.9 and not (own & ~reference).any()
    assert main(["score", str(src), "--out", str(out2), *common, "--brain-mask", str(masks),
                 "--skull-strip", "force"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_calibrations_made_before_these_settings_still_apply() -> None:
    """A calibration stored without the new preprocessing keys counts them at their defaults; a real
    change of brain extraction is still named."""
    from anomaly.calibration import Calibration
    from anomaly.config import ScoringSettings

    old = ScoringSettings().to_dict()
    for key in ("skull_strip", "skull_strip_size", "register", "register_transform"):
        del old["preprocess"][key]
    cal = Calibration("manual", 1.0, settings=old, settings_hash="x", ref="c@1")
    now = ScoringSettings()
    assert cal.settings_problem(now.hash(), now.to_dict()) is None
    forced = ScoringSettings(preprocess=PreprocessConfig(skull_strip="force"))
    problem = cal.settings_problem(forced.hash(), forced.to_dict())
    assert problem is not None and "preprocess.skull_strip: 'auto' -> 'force'" in problem


def test_training_slices_of_a_head_without_mask_go_through_brain_extraction(head: tuple[Volume, np.ndarray]) -> None:
    """``data.skull_strip: auto`` strips a head that has no brain mask beside it with the scoring stage, so
    its training slices hold the brain alone (the skull would otherwise fill them)."""
    from dataclasses import replace

    from anomaly.training.config import DataConfig
    from anomaly.training.data import VolumeSource, healthy_slices

    source = VolumeSource(IXI / "t1_head.nii.gz", contrast="t1")
    raw, raw_masks = healthy_slices(source, SPEC)
    stripped_slices, masks = healthy_slices(source, SPEC, skull_strip="auto")
    assert float(stripped_slices.float()[~masks].abs().max()) == 0.0
    # a head with skull and scalp covers far more of each slice than the brain inside it
    assert float(raw_masks.float().mean()) > 1.3 * float(masks.float().mean())
    # the stripped brain agrees with the intracranial reference (labels > 0) carried the same way
    _, ref_masks = healthy_slices(replace(source, brain_mask=IXI / "dlmuse_labels.nii.gz"), SPEC)
    overlap = (masks & ref_masks).sum() * 2 / (masks.sum() + ref_masks.sum())
    assert float(overlap) > 0.85
    with pytest.raises(ValueError, match="skull_strip"):
        DataConfig(skull_strip="yes")

