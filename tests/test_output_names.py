"""Output names never collide: across batches, extensions and long names; existing folders migrate."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import nibabel as nib
import numpy as np
from alembic import command
from sqlalchemy import select

from anomaly.outputs import MAX_STEM_BYTES, output_path, stem_candidates
from anomaly.store import OutputName, alembic_config, create_store_engine, normalize_db_url, open_store
from pipelines.cli import main
from tests.conftest import phantom, write_nifti


def _brain(path: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """A phantom brain on a coarse 3 mm grid (a small array, a brain-sized volume)."""
    return write_nifti(path, phantom(shape, seed=seed), np.diag([3.0, 3.0, 3.0, 1.0]))


def _score(inputs: list[Path], out: Path, db: Path, table: Path | None = None) -> int:
    args = ["score", *map(str, inputs), "--out", str(out), "--db", str(db), "--model", "intensity", "--quiet"]
    if table is not None:
        args += ["--csv", str(table)]
    return main(args)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_same_name_from_two_folders_in_two_batches_keeps_two_maps(tmp_path: Path) -> None:
    a = _brain(tmp_path / "a" / "flair.nii.gz", (40, 48, 36), 1)
    b = _brain(tmp_path / "b" / "flair.nii.gz", (44, 40, 32), 2)
    out, db = tmp_path / "out", tmp_path / "r.db"
    assert _score([a], out, db, tmp_path / "1.csv") == 0
    assert _score([b], out, db, tmp_path / "2.csv") == 0
    first, second = _csv(tmp_path / "1.csv")[0], _csv(tmp_path / "2.csv")[0]
    assert Path(first["map_path"]).name == "flair_anomaly.nii.gz"  # the plain name when it is free
    assert first["map_path"] != second["map_path"]
    assert Path(second["map_path"]).name == f"flair_{second['scan_id'][:8]}_anomaly.nii.gz"
    assert nib.load(first["map_path"]).shape == (40, 48, 36)
    assert nib.load(second["map_path"]).shape == (44, 40, 32)

    assert _score([a], out, db, tmp_path / "3.csv") == 0  # a's map is still its own: skipped rightly
    again = _csv(tmp_path / "3.csv")[0]
    assert again["status"] == "skipped" and again["map_path"] == first["map_path"]
    assert nib.load(first["map_path"]).shape == (40, 48, 36)


def test_nii_and_nii_gz_of_one_name_in_one_batch_keep_their_own_maps(tmp_path: Path) -> None:
    plain = _brain(tmp_path / "in" / "scan_T1w.nii", (40, 48, 36), 3)
    packed = _brain(tmp_path / "in" / "scan_T1w.nii.gz", (36, 44, 40), 4)
    assert _score([tmp_path / "in"], tmp_path / "out", tmp_path / "r.db", tmp_path / "s.csv") == 0
    rows = {Path(r["path"]).name: r for r in _csv(tmp_path / "s.csv")}
    assert rows["scan_T1w.nii"]["map_path"] != rows["scan_T1w.nii.gz"]["map_path"]
    for name, source in (("scan_T1w.nii", plain), ("scan_T1w.nii.gz", packed)):
        assert rows[name]["status"] == "ok"
        assert nib.load(rows[name]["map_path"]).shape == nib.load(source).shape


def test_a_map_left_by_another_database_is_never_overwritten(tmp_path: Path) -> None:
    scan = _brain(tmp_path / "in" / "x.nii.gz", (40, 48, 36))
    out = tmp_path / "out"
    foreign = write_nifti(out / "x_anomaly.nii.gz", np.ones((8, 8, 8), np.float32))
    before = foreign.read_bytes()
    assert _score([scan], out, tmp_path / "r.db", tmp_path / "s.csv") == 0
    row = _csv(tmp_path / "s.csv")[0]
    assert Path(row["map_path"]) != foreign and foreign.read_bytes() == before
    assert nib.load(row["map_path"]).shape == (40, 48, 36)


def test_changed_settings_into_the_same_folder_keep_both_runs_maps(tmp_path: Path) -> None:
    scan = _brain(tmp_path / "in" / "x.nii.gz", (40, 48, 36))
    config = tmp_path / "s.yaml"
    config.write_text("postprocess:\n  median_size: 3\n")
    base = ["score", str(scan), "--out", str(tmp_path / "out"), "--db", str(tmp_path / "r.db"), "--model",
            "intensity", "--quiet"]
    assert main([*base, "--csv", str(tmp_path / "1.csv")]) == 0
    assert main([*base, "--config", str(config), "--csv", str(tmp_path / "2.csv")]) == 0
    one, two = _csv(tmp_path / "1.csv")[0]["map_path"], _csv(tmp_path / "2.csv")[0]["map_path"]
    assert one != two and Path(one).is_file() and Path(two).is_file()


def test_very_long_names_are_shortened_not_refused(tmp_path: Path) -> None:
    name = "s" * 236 + ".nii.gz"  # 243 bytes: the map name would need 251 + 15
    scan = _brain(tmp_path / "in" / name, (40, 48, 36))
    assert _score([scan], tmp_path / "out", tmp_path / "r.db", tmp_path / "s.csv") == 0
    row = _csv(tmp_path / "s.csv")[0]
    assert row["status"] == "ok", row["error"]
    assert len(Path(row["map_path"]).name.encode()) <= 255
    assert Path(row["map_path"]).name.startswith("s" * 100)
    stems = list(zip(range(4), stem_candidates("é" * 200, "ab" * 32, 7), strict=False))
    assert all(len(stem.encode()) <= MAX_STEM_BYTES for _, stem in stems)
    assert len({stem for _, stem in stems}) == 4


def test_existing_folders_are_migrated_and_an_overwritten_map_is_scored_again(tmp_path: Path) -> None:
    """A database of the first schema where two scans' rows point at one map file (the old collision):
    the migration gives the file to the scan that wrote it last; the other is scored again, under a new name."""
    out, db = tmp_path / "out", tmp_path / "r.db"
    a = _brain(tmp_path / "a" / "flair.nii.gz", (40, 48, 36), 1)
    b = _brain(tmp_path / "b" / "flair.nii.gz", (44, 40, 32), 2)
    assert _score([a], out, db) == 0
    assert _score([b], out, db) == 0
    con = sqlite3.connect(db)  # rewrite history into the pre-fix state: b's row also points at flair_anomaly
    shared = str(output_path(out.resolve(), "flair", "anomaly"))
    b_map = con.execute("select map_path from results where input_path = ?", (str(b.resolve()),)).fetchone()[0]
    Path(b_map).replace(shared)  # b's map now sits where a's was: a's map is gone, as before the fix
    con.execute("update results set map_path = ?, updated_at = '2030-01-01 00:00:00' where input_path = ?",
                (shared, str(b.resolve())))
    con.execute("drop table output_names")
    con.execute("drop index ix_scans_study_uid")  # back to the first schema: without the later source columns
    con.execute("drop index ix_scans_series_uid")
    for column in ("source_meta", "patient_hash", "acquisition_date", "series_description", "series_uid",
                   "study_uid", "source"):
        con.execute(f"alter table scans drop column {column}")
    for name in ("run_id_id", "run_id_scan_name_id", "run_id_updated_at_id", "run_id_timing_s_id", "run_id_score_id",
                 "run_id_status_score_id", "run_id_flagged_score_id", "run_id_verdict_score_id",
                 "run_id_reviewer_score_id"):
        con.execute(f"drop index ix_results_{name}")  # and without the listing copies and run counts
    con.execute("create index ix_results_run_id_score on results (run_id, score)")
    for table, columns in (("results", ("scan_name", "n_findings", "verdict", "reviewer", "reviewed_at", "review_id")),
                           ("runs", ("n_flagged", "n_reviewed", "n_findings", "n_reviews", "n_timed", "version",
                                     "timing_total_s"))):
        for column in columns:
            con.execute(f"alter table {table} drop column {column}")
    con.execute("update alembic_version set version_num = '0001'")
    con.commit()
    con.close()

    store = open_store(db)  # migrates to the newest revision
    with store.session() as s:
        claims = s.scalars(select(OutputName)).all()
    store.close()
    assert [(c.stem, c.scan_id) for c in claims] == [("flair", 2)]  # the last writer (b) holds the file

    assert _score([a], out, db, tmp_path / "again.csv") == 0
    row = _csv(tmp_path / "again.csv")[0]
    assert row["status"] == "ok"  # not "skipped": its recorded map held another scan
    assert Path(row["map_path"]).name != "flair_anomaly.nii.gz"
    assert nib.load(row["map_path"]).shape == (40, 48, 36)
    assert nib.load(shared).shape == (44, 40, 32)


def test_migration_from_the_first_schema_claims_recorded_maps(tmp_path: Path) -> None:
    url = normalize_db_url(tmp_path / "old.db")
    engine = create_store_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), "0001")
    engine.dispose()
    store = open_store(url)
    with store.session() as s:
        assert s.scalars(select(OutputName)).all() == []
    store.close()
