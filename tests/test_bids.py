"""BIDS in, BIDS derivatives out: ``anomaly bids BIDS_DIR OUTPUT_DIR participant|group`` on a small
two-subject dataset written here, checked with the BIDS schema's derivative rules (bidsschematools)."""

from __future__ import annotations

import csv
import json
import re
import sqlite3
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly.io.bids import derivative_names, derivative_problems, sibling_name, split_name
from anomaly.outputs import sibling
from anomaly.store import get_or_create_model, open_store, save_calibration
from pipelines.cli import main
from tests.conftest import phantom, write_nifti

SHAPE = (40, 44, 36)


def _affine(flip: bool = False) -> np.ndarray:
    affine = np.diag([-1.3 if flip else 1.3, 1.2, 1.4, 1.0])
    affine[:3, 3] = (25 if flip else -25, -26, -25)
    return affine


def _dataset(root: Path) -> dict[str, Path]:
    """sub-01 (ses-1: T1w, FLAIR), sub-02 (ses-1: T2w and a damaged T1w), sub-03 (not chosen)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0",
                                                               "DatasetType": "raw"}))
    (root / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    files = {
        "t1": write_nifti(root / "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz", phantom(SHAPE, seed=1), _affine()),
        "flair": write_nifti(root / "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_FLAIR.nii.gz",
                             phantom(SHAPE, seed=2, lesion=True), _affine(flip=True)),
        "t2": write_nifti(root / "sub-02/ses-1/anat/sub-02_ses-1_run-1_T2w.nii.gz", phantom(SHAPE, seed=3, lesion=True),
                          _affine()),
        "other": write_nifti(root / "sub-03/ses-1/anat/sub-03_ses-1_T1w.nii.gz", phantom(SHAPE, seed=4), _affine()),
    }
    bad = root / "sub-02/ses-1/anat/sub-02_ses-1_run-2_T1w.nii.gz"
    bad.write_bytes(b"\x1f\x8b" + b"\0" * 40)
    files["bad"] = bad
    for key, tr, te, ti in (("t1", 2.3, 0.003, 0.9), ("flair", 9.0, 0.09, 2.5), ("t2", 4.0, 0.1, None)):
        meta = {"RepetitionTime": tr, "EchoTime": te, "SeriesDescription": f"{key} series"}
        if ti is not None:
            meta["InversionTime"] = ti
        files[key].with_name(files[key].name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))
    return files


def _tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_names_keep_the_source_entities() -> None:
    names = derivative_names("sub-01/ses-1/anat/sub-01_ses-1_acq-ax_run-2_FLAIR.nii.gz")
    assert names["anomaly"] == "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_run-2_desc-anomaly_FLAIR.nii.gz"
    assert names["brain"] == "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_run-2_desc-brainFLAIR_mask.nii.gz"
    assert names["mask"] == "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_run-2_desc-anomalyFLAIR_mask.nii.gz"
    assert sibling(Path(names["anomaly"]), "brain") == Path(names["brain"])
    assert sibling_name("x_anomaly.nii.gz", "brain") is None
    assert split_name("sub-01_T1w.nii") == ("sub-01", "T1w", ".nii")
    with pytest.raises(ValueError, match="no BIDS suffix"):
        split_name("T1w.nii.gz")


def test_participant_and_group_levels_make_a_valid_derivatives_dataset(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bids, out, db = tmp_path / "ds", tmp_path / "ds" / "derivatives" / "anomaly", tmp_path / "r.db"
    files = _dataset(bids)
    from anomaly.models import load_model

    identity = load_model("intensity").identity()
    store = open_store(str(db))
    with store.session() as s:
        model = get_or_create_model(s, identity.name, identity.weights_hash, identity.config)
        save_calibration(s, "tiny", model, "manual", voxel_threshold=1.05, scan_threshold=0.5)
    store.close()
    args = ["bids", str(bids), str(out), "participant", "--participant-label", "sub-01", "02", "--model",
            "intensity", "--db", str(db), "--calibration", "tiny", "--atlas", "none", "--quiet"]
    assert main(args) == 1, "the damaged image fails, the others are scored"
    err = capsys.readouterr().err
    assert "sub-02_ses-1_run-2_T1w.nii.gz" in err and "FAILED" in err

    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    made = description["GeneratedBy"][0]
    assert made["Name"] == "brain-anomaly" and made["Version"] and made["ModelName"] == "intensity"
    assert made["ModelHash"] == identity.weights_hash and description["SourceDatasets"][0]["URL"].startswith("file://")

    for key in ("t1", "flair", "t2"):
        rel = files[key].relative_to(bids).as_posix()
        names = derivative_names(rel)
        source = nib.load(files[key])
        amap = nib.load(out / names["anomaly"])
        assert amap.shape == source.shape and np.allclose(amap.affine, source.affine, atol=1e-4)
        for kind in ("brain", "mask"):
            assert nib.load(out / names[kind]).shape == source.shape
            sidecar = json.loads((out / names[kind].replace(".nii.gz", ".json")).read_text())
            assert sidecar["Sources"][0] == f"bids:raw:{rel}" and sidecar["Model"]["Name"] == "intensity"
        meta = json.loads((out / names["anomaly"].replace(".nii.gz", ".json")).read_text())
        assert meta["Calibration"] == {"Name": "tiny@1", "VoxelThreshold": 1.05, "ScanThreshold": 0.5}
        assert isinstance(meta["ScanScore"], float) and meta["SettingsHash"]
        assert meta["Contrast"] == {"t1": "t1", "flair": "flair", "t2": "t2"}[key]
        assert meta["ContrastSource"].startswith("BIDS suffix")
    assert not list(out.glob("sub-03*")), "a subject not chosen is not scored"

    for subject in ("01", "02"):
        page = (out / f"sub-{subject}.html").read_text()
        assert page.count("data:image/png;base64,") >= 5 and "scan score" in page
        assert not re.search(r"""(src|href)=['"]?https?:""", page), "the report needs no network"
    assert "failed" in (out / "sub-02.html").read_text()
    assert derivative_problems(out) == []

    rows = sqlite3.connect(db).execute("select source, json_extract(source_meta, '$.suffix') from scans "
                                       "where source = 'bids'").fetchall()
    assert sorted(r[1] for r in rows) == ["FLAIR", "T1w", "T1w", "T2w"]

    assert main(["bids", str(bids), str(out), "group"]) == 0
    scans = _tsv(out / "group_scans.tsv")
    assert sorted(r["suffix"] for r in scans) == ["FLAIR", "T1w", "T2w"]
    assert {r["subject"] for r in scans} == {"01", "02"}
    findings = _tsv(out / "group_findings.tsv")
    assert len(findings) == sum(int(r["n_findings"]) for r in scans)
    assert derivative_problems(out) == []

    # the validator does catch a name the derivative rules do not allow
    (out / "sub-01" / "ses-1" / "anat" / "sub-01_ses-1_anomalymap.nii.gz").write_bytes(b"")
    assert derivative_problems(out) == ["sub-01/ses-1/anat/sub-01_ses-1_anomalymap.nii.gz: not a valid BIDS "
                                        "derivative file name"]


def test_unknown_participant_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bids = tmp_path / "ds"
    _dataset(bids)
    assert main(["bids", str(bids), str(tmp_path / "out"), "participant", "--participant-label", "07",
                 "--model", "intensity", "--db", str(tmp_path / "r.db"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "participant(s) 07 not found" in err and "01, 02, 03" in err
    assert main(["bids", str(bids), str(tmp_path / "out"), "participant", "--session-label", "ses-9",
                 "--model", "intensity", "--db", str(tmp_path / "r.db"), "--quiet"]) == 2
    assert "session(s) 9 not found (the dataset has 1)" in capsys.readouterr().err


def test_description_fields_are_checked_against_the_schema(tmp_path: Path) -> None:
    (tmp_path / "dataset_description.json").write_text(json.dumps({
        "Name": "x", "BIDSVersion": "1.10.0", "DatasetType": "derivative", "GeneratedBy": [{"Version": "1"}],
        "SourceDatasets": "not a list"}))
    assert derivative_problems(tmp_path) == ["dataset_description.json: GeneratedBy[0] lacks Name",
                                             "dataset_description.json: SourceDatasets should be a JSON array"]


def test_an_annexed_image_keeps_its_bids_name(tmp_path: Path) -> None:
    """datalad and git-annex datasets link each image to a content key under .git/annex/objects."""
    from anomaly.io.bids import find_anatomical

    bids = tmp_path / "ds"
    files = _dataset(bids)
    key = "MD5E-s4321--00112233445566778899aabbccddeeff.nii.gz"
    store = bids / ".git" / "annex" / "objects" / "Ab" / "Cd" / key
    store.mkdir(parents=True)
    files["t1"].rename(store / key)
    files["t1"].symlink_to(Path("../../../.git/annex/objects/Ab/Cd") / key / key)
    assert files["t1"].is_file()
    images = {im.relpath: im for im in find_anatomical(bids, participants=["01"])}
    rel = "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz"
    assert set(images) == {rel, "sub-01/ses-1/anat/sub-01_ses-1_acq-ax_FLAIR.nii.gz"}
    assert images[rel].suffix == "T1w" and images[rel].path.name == "sub-01_ses-1_T1w.nii.gz"
