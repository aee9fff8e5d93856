"""DICOM series in: real series written with pydicom from NIfTI-like volumes, scored by ``anomaly score``."""

from __future__ import annotations

import csv
import hashlib
import hmac
import sqlite3
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from anomaly.contrast import contrast_from_metadata
from anomaly.io.dicom import DicomSeriesError, find_series, load_series
from pipelines.cli import main
from tests.conftest import phantom
from tests.dicom_fixture import write_series

SHAPE = (40, 44, 36)


def _rotation(axis: int, degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    c, s = np.cos(angle), np.sin(angle)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    out = np.eye(4)
    out[i, i] = out[j, j] = c
    out[i, j], out[j, i] = -s, s
    return out


def _affines() -> dict[str, np.ndarray]:
    ras = np.diag([1.0, 1.2, 1.5, 1.0])
    ras[:3, 3] = (-20, -25, -30)
    las = np.diag([-1.3, 1.2, 1.4, 1.0])
    las[:3, 3] = (20, -25, -30)
    rai = np.diag([1.3, 1.2, -1.5, 1.0])
    rai[:3, 3] = (-20, -25, 30)
    coronal = np.array([[1.3, 0, 0, -20], [0, 0, -1.5, 30], [0, 1.1, 0, -20], [0, 0, 0, 1]])
    sagittal = np.array([[0, 0, -1.3, 20], [1.3, 0, 0, -20], [0, 1.0, 0, -20], [0, 0, 0, 1]])
    return {"ras": ras, "las": las, "rai": rai, "coronal": coronal, "sagittal": sagittal,
            "oblique": _rotation(0, 17) @ _rotation(2, 8) @ ras}


def _db(path: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_orientation_reads_back_on_the_source_grid(tmp_path: Path) -> None:
    data = phantom(SHAPE, lesion=True)
    for number, (name, affine) in enumerate(_affines().items(), start=1):
        write_series(tmp_path / name, data, affine, series_number=number, compress=name == "las")
    series, notes = find_series([tmp_path])
    assert len(series) == len(_affines()) and notes == []
    for one in series:
        volume = load_series(one)
        affine = _affines()[Path(one.container).name]
        assert volume.shape == SHAPE and np.allclose(volume.affine, affine, atol=1e-4), one.container
        assert np.allclose(volume.data, np.round(data / 0.1) * 0.1, atol=1e-3), "values keep the rescale slope"


SCORED = ("ras", "rai", "oblique")


def test_series_are_scored_into_maps_on_the_series_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANOMALY_PATIENT_SALT", "test-salt")
    data = phantom(SHAPE, lesion=True)
    study = tmp_path / "study"
    uids = {}
    for number, name in enumerate(SCORED, start=1):
        write_series(study / name, data, _affines()[name], series_number=number, description=f"{name} T1 MPRAGE",
                     compress=name == "rai", series_uid=f"1.2.826.0.1.3680043.8.498.{number}")
        uids[name] = f"1.2.826.0.1.3680043.8.498.{number}"
    out, db, table = tmp_path / "out", tmp_path / "r.db", tmp_path / "s.csv"
    assert main(["score", str(study), "--out", str(out), "--model", "intensity", "--db", str(db),
                 "--csv", str(table), "--quiet"]) == 0
    rows = {r["series_uid"]: r for r in _csv(table)}
    assert set(rows) == set(uids.values())
    for name in SCORED:
        affine = _affines()[name]
        row = rows[uids[name]]
        assert row["status"] == "ok", row["error"]
        image = nib.load(row["map_path"])
        assert image.shape == SHAPE, name
        assert np.allclose(image.affine, affine, atol=1e-4), (name, image.affine, affine)
        assert Path(row["map_path"]).name.startswith(f"{name}_s")
    scans = _db(db, "select series_uid, study_uid, series_description, acquisition_date, patient_hash, source, "
                    "source_meta from scans")
    assert {r[0] for r in scans} == set(uids.values())
    expected_hash = hmac.new(b"test-salt", b"PAT-0042", hashlib.sha256).hexdigest()
    for _uid, study_uid, description, date, patient, source, meta in scans:
        assert source == "dicom" and study_uid and date == "2024-01-31" and description.endswith("T1 MPRAGE")
        assert patient == expected_hash
        assert '"contrast": "t1"' in meta and '"inversion_time_ms": 900.0' in meta
    raw = db.read_bytes()
    assert b"PAT-0042" not in raw and b"Doe" not in raw, "patient name and ID are never stored in clear"
    contrasts = _db(db, "select details from results")
    assert all('"contrast": "t1"' in d[0] and "contrast_source" in d[0] for d in contrasts)
    # a second run skips every series: same content, same model and settings
    assert main(["score", str(study), "--out", str(out), "--model", "intensity", "--db", str(db),
                 "--csv", str(table), "--quiet"]) == 0
    assert {r["status"] for r in _csv(table)} == {"skipped"}


def test_a_study_with_bad_series_reports_each_and_scores_the_rest(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ANOMALY_PATIENT_SALT", "test-salt")
    data = phantom(SHAPE)
    affine = _affines()["ras"]
    study = tmp_path / "study"
    mixed = study / "mixed"  # two good series in one folder, and a text file
    write_series(mixed, data, affine, series_number=2, description="T1 MPRAGE SAG", prefix="A")
    write_series(mixed, data, affine, series_number=5, description="Ax 5", tr=9000.0, te=90.0, ti=2500.0,
                 prefix="B")
    (mixed / "README.txt").write_text("exported from the PACS\n")
    write_series(study / "gap", data, affine, series_number=6, description="T2 TSE", skip=(17,))
    write_series(study / "scout", data[:, :, :3], affine, series_number=1, description="AAHead_Scout",
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(study / "mpr", data, affine, series_number=7, description="T1 MPR cor",
                 image_type=("DERIVED", "SECONDARY", "MPR"))
    write_series(study / "tilt", data, affine, series_number=8, description="T2 tilted", tilt_mm=0.3)
    packed = write_series(tmp_path / "zipped", data, affine, series_number=9, description="FLAIR",
                          tr=9000.0, te=85.0, ti=2500.0)
    archive = study / "flair.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in packed:
            zf.write(file, f"DICOM/{file.name}")
        zf.writestr("DICOMDIR.txt", "not an image")
    out, db, table = tmp_path / "out", tmp_path / "r.db", tmp_path / "s.csv"
    assert main(["score", str(study), "--out", str(out), "--model", "intensity", "--db", str(db),
                 "--csv", str(table), "--quiet"]) == 1
    rows = {Path(r["map_path"]).name.split("_anomaly")[0] if r["map_path"] else r["error"].split(": ")[1]: r
            for r in _csv(table)}
    ok = {k: r for k, r in rows.items() if r["status"] == "ok"}
    failed = [r["error"] for r in rows.values() if r["status"] == "failed"]
    assert sorted(ok) == ["flair_s009_FLAIR", "mixed_s002_T1_MPRAGE_SAG", "mixed_s005_Ax_5"]
    for row in ok.values():
        image = nib.load(row["map_path"])
        assert image.shape == SHAPE and np.allclose(image.affine, affine, atol=1e-4)
    assert len(failed) == 4
    joined = "\n".join(failed)
    assert "1 slice(s) missing" in joined and "series 6 (T2 TSE)" in joined
    assert "localiser" in joined and "derived images" in joined and "sheared" in joined
    contrast = dict(_db(db, "select s.series_description, json_extract(r.details, '$.contrast') from results r "
                            "join scans s on s.id = r.scan_id where r.status = 'ok'"))
    assert contrast == {"T1 MPRAGE SAG": "t1", "Ax 5": "flair", "FLAIR": "flair"}
    err = capsys.readouterr().err
    assert "neither DICOM nor NIfTI ignored" in err
    assert err.count("FAILED") == 4


def test_load_series_errors_name_the_series(tmp_path: Path) -> None:
    data = phantom(SHAPE)
    write_series(tmp_path / "a", data[:, :, :2], _affines()["ras"], series_number=4, description="tiny")
    (series,), _ = find_series([tmp_path / "a"])
    with pytest.raises(DicomSeriesError) as info:
        load_series(series)
    assert "series 4 (tiny)" in str(info.value) and "only 2 image(s)" in str(info.value)
    assert series.patient_hash is None, "no salt, no hash"


@pytest.mark.parametrize(("texts", "timing", "expected"), [
    (("T2_FLAIR_SAG",), (9000, 90, 2500), "flair"),
    (("t1_mprage_sag_p2",), (2300, 3, 900), "t1"),
    (("t1_mprage_sag_p2 POST GD",), (2300, 3, 900), "t1c"),
    (("AX T2 TSE",), (4000, 100, None), "t2"),
    (("Dark Fluid",), (None, None, None), "flair"),
    (("series 12", "*tfl3d1_16ns"), (None, None, None), "t1"),
    (("series 7",), (9000, 90, 2500), "flair"),
    (("series 7",), (500, 12, None), "t1"),
    (("series 7",), (5000, 110, None), "t2"),
    (("series 7",), (30, 5, None), "t1"),
    (("DWI b1000",), (5000, 80, 2200), "flair"),
    (("localizer",), (None, 5, None), None),
])
def test_contrast_from_series_metadata(texts: tuple[str, ...], timing: tuple, expected: str | None) -> None:
    contrast, reason = contrast_from_metadata(texts, *timing)
    assert contrast == expected, reason
    assert reason


def test_patient_salt_comes_from_the_environment_or_a_private_file(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.privacy import ENV_VAR, patient_salt, salt_file

    monkeypatch.setenv(ENV_VAR, "shared-secret")
    assert patient_salt() == b"shared-secret"
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    first = patient_salt()
    assert len(first) == 64 and patient_salt() == first, "made once, then reused"
    assert salt_file() == tmp_path / "anomaly" / "patient-salt"
    assert (salt_file().stat().st_mode & 0o777) == 0o600
