"""Acceptance of ``anomaly score``: a mixed folder of good and bad files, re-runs, and interruption."""

from __future__ import annotations

import csv
import gzip
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.batch import CSV_COLUMNS, discover_inputs, unique_stems
from pipelines.cli import main
from tests.conftest import REPO, phantom, write_nifti

GOOD = ("ras", "las", "aniso", "int16_slope", "plain_nii", "single_4d")
BAD = {
    "corrupt_gzip": "gzip", "zero_bytes": "empty", "text": "not a NIfTI", "flat2d": "2D",
    "multi4d": "3 volumes", "nan_filled": "NaN",
}


def _mixed_folder(root: Path) -> Path:
    data = phantom(lesion=True)
    las = np.diag([-1.0, 1.0, 1.0, 1.0])
    las[:3, 3] = [30.0, -20.0, -15.0]
    write_nifti(root / "ras.nii.gz", data)
    write_nifti(root / "las.nii.gz", data[::-1].copy(), las)
    write_nifti(root / "sub" / "aniso.nii.gz", data[:, :, ::2], np.diag([1.0, 1.0, 2.0, 1.0]))
    write_nifti(root / "int16_slope.nii.gz", np.round(data / 2.5).astype(np.int16), np.diag([0.9, 0.9, 1.1, 1]),
                dtype=np.int16, slope=2.5)
    write_nifti(root / "plain_nii.nii", data)
    write_nifti(root / "single_4d.nii.gz", data[..., None])
    raw = gzip.compress(nib.Nifti1Image(data, np.eye(4)).to_bytes())
    (root / "corrupt_gzip.nii.gz").write_bytes(raw[: len(raw) // 2])
    (root / "zero_bytes.nii.gz").write_bytes(b"")
    (root / "text.nii.gz").write_text("this is not an image\n")
    write_nifti(root / "flat2d.nii.gz", data[:, :, 20])
    write_nifti(root / "multi4d.nii.gz", np.stack([data] * 3, axis=-1))
    nan = data.copy()
    nan[:] = np.nan
    write_nifti(root / "nan_filled.nii.gz", nan)
    return root


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {Path(r["path"]).name.split(".")[0]: r for r in csv.DictReader(handle)}


def _db_rows(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_mixed_folder_scores_good_files_and_reports_bad_ones(tmp_path: Path, tiny_vae_folder: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    inputs = _mixed_folder(tmp_path / "in")
    out, db, table = tmp_path / "out", tmp_path / "results.db", tmp_path / "scores.csv"
    args = ["score", str(inputs), "--out", str(out), "--model", str(tiny_vae_folder), "--db", str(db),
            "--csv", str(table), "--quiet"]
    assert main(args) == 1
    rows = _rows(table)
    assert set(rows) == set(GOOD) | set(BAD)
    assert table.read_text().splitlines()[0].split(",") == list(CSV_COLUMNS)
    for name in GOOD:
        row = rows[name]
        assert row["status"] == "ok", row["error"]
        source = nib.load(row["path"])
        amap = nib.load(row["map_path"])
        assert Path(row["map_path"]).name == f"{name}_anomaly.nii.gz"
        assert amap.shape == source.shape[:3]
        np.testing.assert_allclose(amap.affine, source.affine, atol=1e-4)
        values = np.asarray(amap.dataobj)
        assert np.isfinite(values).all() and values.max() > 0
        assert float(row["score"]) > 0
        assert nib.load(row["recon_path"]).shape == source.shape[:3]
    for name, reason in BAD.items():
        row = rows[name]
        assert row["status"] == "failed" and row["map_path"] == ""
        assert name in row["error"] and reason.lower() in row["error"].lower(), row["error"]
    err = capsys.readouterr().err
    assert "FAILED" in err and "corrupt_gzip" in err

    first = _db_rows(db, "select id, scan_id, status, score, updated_at from results order by id")
    assert len(first) == len(GOOD) + len(BAD)
    maps_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*_anomaly.nii.gz")}

    assert main(args) == 1  # the bad files still fail, and say so again
    again = _rows(table)
    assert {n for n, r in again.items() if r["status"] == "skipped"} == set(GOOD)
    assert all(again[n]["map_path"] == rows[n]["map_path"] for n in GOOD)
    second = _db_rows(db, "select id, scan_id, status, score, updated_at from results order by id")
    ok_first = [r for r in first if r[2] == "ok"]
    assert [r for r in second if r[2] == "ok"] == ok_first  # scored nothing new, kept every result
    assert len(second) == len(first)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_anomaly.nii.gz")} == maps_before
    assert _db_rows(db, "select count(*) from runs")[0][0] == 1


def test_changed_settings_score_again_in_a_new_run(tmp_path: Path) -> None:
    write_nifti(tmp_path / "in" / "a.nii.gz", phantom())
    base = ["score", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", "intensity",
            "--db", str(tmp_path / "r.db"), "--quiet"]
    assert main(base) == 0
    config = tmp_path / "s.yaml"
    config.write_text("postprocess:\n  median_size: 3\n")
    assert main([*base, "--config", str(config)]) == 0
    assert _db_rows(tmp_path / "r.db", "select count(*) from runs")[0][0] == 2
    assert _db_rows(tmp_path / "r.db", "select count(*) from results where status='ok'")[0][0] == 2


def test_each_scan_records_the_contrast_it_was_scored_as(tmp_path: Path) -> None:
    import json

    for seed, name in enumerate(("sub-01_T1w", "sub-01_FLAIR", "scan")):
        write_nifti(tmp_path / "in" / f"{name}.nii.gz", phantom(seed=seed))
    base = ["score", str(tmp_path / "in"), "--model", "intensity", "--db", str(tmp_path / "r.db"), "--quiet"]
    assert main([*base, "--out", str(tmp_path / "auto")]) == 0
    assert main([*base, "--out", str(tmp_path / "t2"), "--contrast", "t2"]) == 0
    rows = _db_rows(tmp_path / "r.db", "select run_id, input_path, details from results order by run_id, input_path")
    seen = {(run, Path(path).name): json.loads(details)["contrast"] for run, path, details in rows}
    assert seen == {(1, "scan.nii.gz"): None, (1, "sub-01_FLAIR.nii.gz"): "flair", (1, "sub-01_T1w.nii.gz"): "t1",
                    (2, "scan.nii.gz"): "t2", (2, "sub-01_FLAIR.nii.gz"): "t2", (2, "sub-01_T1w.nii.gz"): "t2"}


def test_unknown_setting_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_nifti(tmp_path / "a.nii.gz", phantom())
    config = tmp_path / "s.yaml"
    config.write_text("postprocess:\n  median: 3\n")
    code = main(["score", str(tmp_path / "a.nii.gz"), "--out", str(tmp_path / "o"), "--config", str(config),
                 "--db", str(tmp_path / "r.db"), "--model", "intensity"])
    assert code == 2
    assert "postprocess.median" in capsys.readouterr().err


def test_missing_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["score", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--db", str(tmp_path / "r.db")])
    assert code == 2 and "no such file or folder" in capsys.readouterr().err


def test_repeated_file_names_get_unique_outputs(tmp_path: Path) -> None:
    paths = [tmp_path / "p07" / "flair.nii.gz", tmp_path / "p19" / "flair.nii.gz", tmp_path / "t2.nii"]
    assert unique_stems(paths) == ["p07_flair", "p19_flair", "t2"]
    for i, p in enumerate(paths):
        write_nifti(p, phantom(seed=i))
    assert [p.name for p in discover_inputs([tmp_path])] == ["flair.nii.gz", "flair.nii.gz", "t2.nii"]


def test_export_writes_results_csv(tmp_path: Path) -> None:
    write_nifti(tmp_path / "in" / "a.nii.gz", phantom())
    db = tmp_path / "r.db"
    assert main(["score", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--model", "intensity",
                 "--db", str(db), "--quiet"]) == 0
    assert main(["export", "--db", str(db), "--csv", str(tmp_path / "all.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "all.csv").read_text().splitlines()))
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["map_path"].endswith("a_anomaly.nii.gz")


def test_interrupted_batch_resumes_without_duplicates(tmp_path: Path, tiny_healer_folder: Path) -> None:
    """Kill the process mid-batch, run it again: every scan once, no half-written map. Enough scans that a
    busy machine's slow polling still catches the batch midway; stopped the moment two results are seen."""
    n = 24
    for i in range(n):
        write_nifti(tmp_path / "in" / f"scan{i:02d}.nii.gz", phantom(seed=i, lesion=i % 2 == 0))
    db, out = tmp_path / "r.db", tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.cli", "score", str(tmp_path / "in"), "--out", str(out),
           "--model", str(tiny_healer_folder), "--db", str(db), "--quiet", "--batch-size", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                done = _db_rows(db, "select count(*) from results")[0][0]
            except sqlite3.OperationalError:
                done = 0
            if done >= 2:
                proc.send_signal(signal.SIGSTOP)  # frozen at once; killed below
                break
        time.sleep(0.02)
    assert proc.poll() is None, f"batch ended before it could be interrupted: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _db_rows(db, "select count(*) from results")[0][0]
    assert 2 <= killed_at < n
    for path in out.glob("*_anomaly.nii.gz"):
        assert np.isfinite(np.asarray(nib.load(path).dataobj)).all()  # every visible map is complete

    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    rows = _db_rows(db, "select scan_id, count(*) from results group by scan_id")
    assert len(rows) == n and all(count == 1 for _, count in rows)
    assert _db_rows(db, "select count(*) from results where status='ok'")[0][0] == n
    assert len(list(out.glob("*_anomaly.nii.gz"))) == n
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_read_ahead_gives_the_same_outcomes_in_order(tmp_path: Path, tiny_vae_folder: Path) -> None:
    from anomaly.config import ScoringSettings
    from anomaly.models import load_model
    from anomaly.volume import file_sha256
    from pipelines.executors import LocalExecutor
    from pipelines.work import ScanTask

    paths = [write_nifti(tmp_path / f"s{i}.nii.gz", phantom(seed=i)) for i in range(3)]
    (tmp_path / "bad.nii.gz").write_text("x")
    paths.insert(1, tmp_path / "bad.nii.gz")
    model = load_model(tiny_vae_folder)
    runs = {}
    for ahead in (0, 2):
        tasks = [ScanTask(p, f"{p.name.split('.')[0]}", file_sha256(p), tmp_path / f"out{ahead}") for p in paths]
        runs[ahead] = list(LocalExecutor(prefetch=ahead).map(tasks, model, ScoringSettings()))
    assert [o.task.path for o in runs[0]] == [o.task.path for o in runs[2]] == paths
    assert [o.status for o in runs[2]] == ["ok", "failed", "ok", "ok"]
    assert [o.score for o in runs[0]] == [o.score for o in runs[2]]


def test_unknown_contrast_is_a_warning_when_the_map_depends_on_it(tmp_path: Path, tiny_vae_folder: Path) -> None:
    from anomaly.config import ScoringSettings
    from anomaly.models import MapConfig, load_model
    from pipelines.work import ScanTask, score_scan

    model = load_model(tiny_vae_folder)
    paths = [write_nifti(tmp_path / name, phantom()) for name in ("scan.nii.gz", "t1.nii.gz")]
    tasks = [ScanTask(p, p.name.split(".")[0], str(i), tmp_path / "out") for i, p in enumerate(paths)]

    def warned(task: ScanTask) -> list[str]:
        outcome = score_scan(task, model, ScoringSettings())
        assert outcome.status == "ok", outcome.error
        return [w for w in outcome.details.warnings if "contrast unknown" in w]

    assert not warned(tasks[0])  # a map without per-contrast terms does not care
    model.map_config = MapConfig(intensity_weight=1.5, intensity_floor={"t1": 99})
    assert "--contrast t1" in warned(tasks[0])[0] and not warned(tasks[1])
