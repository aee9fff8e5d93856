"""Tests of the result store on real SQLite files: migrations, pragmas, every table and the query API."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import timezone
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, event, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError

import anomaly.store as st
from anomaly.store import (
    VERDICTS,
    Base,
    Finding,
    Result,
    Review,
    Store,
    add_review,
    finish_run,
    get_calibration,
    get_or_create_model,
    get_or_create_scan,
    open_run,
    open_store,
    run_results,
    upsert_result,
)
from tests.conftest import child_env

TABLES = {"scans", "models", "calibrations", "runs", "results", "findings", "reviews"}


def sha(text_: str) -> str:
    return hashlib.sha256(text_.encode()).hexdigest()


def finding(rank: int, volume_ml: float = 1.5, **extra: object) -> dict[str, object]:
    values: dict[str, object] = {
        "rank": rank,
        "n_voxels": int(volume_ml * 1000),
        "volume_ml": volume_ml,
        "centroid_mm": (10.0 * rank, -20.0, 30.5),
        "peak_x": 11.0,
        "peak_y": -19.0,
        "peak_z": 31.0,
        "peak": 0.9,
        "mean": 0.4,
        "region_centroid": "Left Thalamus",
        "region_majority": "Left Thalamus",
        "atlas": "aal",
    }
    values.update(extra)
    return values


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db" / "anomaly.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    store = open_store(db_path)
    yield store
    store.close()


@pytest.fixture
def populated(store: Store) -> dict[str, int]:
    """A run with six scans: four ok (scores 0.9, 0.5, 0.2, 0.7), one failed, one ok without score."""
    ids: dict[str, int] = {}
    with store.session() as s:
        model = get_or_create_model(s, "tiny-vae", sha("weights"), {"latent": 4})
        run = open_run(s, model, {"median": 3}, sha("settings"), "/tmp/out")
        specs = [
            ("alpha", "ok", 0.9, True),
            ("bravo", "ok", 0.5, False),
            ("charlie", "ok", 0.2, False),
            ("delta", "ok", 0.7, True),
            ("echo", "failed", None, None),
            ("foxtrot", "ok", None, None),
        ]
        for name, status, score, flagged in specs:
            scan = get_or_create_scan(s, sha(name), f"/data/{name}.nii.gz", name)
            result = upsert_result(
                s,
                run,
                scan,
                status=status,
                input_path=f"/data/{name}.nii.gz",
                score=score,
                flagged=flagged,
                error="cannot read header" if status == "failed" else None,
                map_path=None if status == "failed" else f"/tmp/out/{name}_anomaly.nii.gz",
                timing_s=1.0 + len(name) / 10,
                findings=[finding(1, 2.0), finding(2, 0.5)] if flagged else None,
            )
            ids[name] = result.id
        ids["run"] = run.id
    return ids


# ----------------------------------------------------------------------------------------------- opening


def test_open_creates_schema_and_reopen_is_idempotent(db_path: Path) -> None:
    store = open_store(db_path)
    tables = set(inspect(store.engine).get_table_names())
    assert tables >= TABLES | {"alembic_version"}
    with store.engine.connect() as conn:
        assert st.current_revision(conn) == st.head_revision()
    with store.session() as s:
        get_or_create_model(s, "m", sha("w"), {})
    store.close()

    statements: list[str] = []
    again = st.create_store_engine(st.normalize_db_url(db_path))
    event.listen(again, "before_cursor_execute", lambda *a: statements.append(a[2]))
    assert st.upgrade_schema(again) is False  # already current: nothing to do
    assert not any("CREATE" in sql.upper() for sql in statements)
    again.dispose()

    reopened = open_store(db_path)
    with reopened.session() as s:
        assert len(s.scalars(select(st.Model)).all()) == 1
    reopened.close()


def test_sqlite_pragmas_wal_foreign_keys_busy_timeout(store: Store, db_path: Path) -> None:
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    raw = sqlite3.connect(db_path)  # WAL is persistent in the file itself
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


def test_orm_metadata_matches_migrated_schema(store: Store) -> None:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diffs = compare_metadata(context, Base.metadata)
    assert diffs == []


def test_database_from_newer_version_is_refused(db_path: Path) -> None:
    open_store(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute("UPDATE alembic_version SET version_num = '9999_future'")
    raw.commit()
    raw.close()
    with pytest.raises(RuntimeError, match="9999_future.*upgrade the package"):
        open_store(db_path)


def test_in_memory_store_works() -> None:
    store = open_store("sqlite://")
    with store.session() as s:
        get_or_create_model(s, "m", sha("w"), {})
    with store.session() as s:
        assert s.scalars(select(st.Model.name)).all() == ["m"]
    store.close()


def test_normalize_and_default_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = st.normalize_db_url("results/x.db")
    assert url == "sqlite:///" + (tmp_path / "results" / "x.db").as_posix()
    assert (tmp_path / "results").is_dir()
    assert st.normalize_db_url("sqlite:///rel/y.db") == "sqlite:///" + (tmp_path / "rel" / "y.db").as_posix()
    assert (tmp_path / "rel").is_dir()
    assert st.normalize_db_url("postgres://u:p@h:5/d") == "postgresql+psycopg://u:p@h:5/d"
    assert st.normalize_db_url("postgresql+psycopg://u@h/d") == "postgresql+psycopg://u@h/d"
    assert st.normalize_db_url("sqlite://") == "sqlite://"
    with pytest.raises(ValueError, match="is a folder"):
        st.normalize_db_url(tmp_path)
    with pytest.raises(ValueError, match="empty database URL"):
        st.normalize_db_url("  ")

    monkeypatch.delenv("ANOMALY_DB", raising=False)
    assert st.default_db_url() == "sqlite:///" + (tmp_path / "anomaly.db").as_posix()
    monkeypatch.setenv("ANOMALY_DB", "sqlite:////elsewhere/a.db")
    assert st.default_db_url() == "sqlite:////elsewhere/a.db"
    monkeypatch.setenv("ANOMALY_DB", str(tmp_path / "env" / "e.db"))
    store = open_store()
    assert (tmp_path / "env" / "e.db").is_file()
    store.close()


# ----------------------------------------------------------------------------------------------- round trip


def test_round_trip_of_every_table(db_path: Path) -> None:
    store = open_store(db_path)
    with store.session() as s:
        model = get_or_create_model(
            s, "tiny-vae", sha("weights"), {"channels": (32, 64), "scale": np.float32(0.5)}
        )
        scan = get_or_create_scan(
            s, sha("scan"), "/data/a.nii.gz", "a", shape=np.array([64, 64, 48]), spacing=(1.0, 1.0, 1.2),
            orientation="RAS", dtype="float32",
        )  # fmt: skip
        cal = st.save_calibration(
            s, "healthy", model, "healthy-fpr", 0.31, scan_threshold=0.02, target_fpr=0.01,
            settings_hash=sha("settings"), data={"scans": ["a"]}, metrics={"fpr_ci": (0.005, 0.02)},
        )  # fmt: skip
        run = open_run(
            s, model, {"median": 3, "path": Path("/x")}, sha("settings"), "/tmp/out", cal, executor="dask"
        )
        result = upsert_result(
            s, run, scan, status="ok", input_path="/data/a.nii.gz", score=0.42, flagged=True,
            map_path="/tmp/out/a_anomaly.nii.gz", recon_path="/tmp/out/a_recon.nii.gz",
            mask_path="/tmp/out/a_mask.nii.gz", timing_s=6.5,
            details={"stages": {"encode": 1.25}, "warnings": [], "nan": float("nan")},
            findings=[finding(1, 2.0), finding(2, 0.25, region_centroid=None)],
        )  # fmt: skip
        add_review(s, result.id, "dr who", "confirmed finding", "left thalamus")
        ids = (model.id, scan.id, cal.id, run.id)
    store.close()

    store = open_store(db_path)  # a fresh engine reads back what the first wrote
    with store.session() as s:
        model = s.get(st.Model, ids[0])
        assert model is not None and model.config == {"channels": [32, 64], "scale": 0.5}
        scan = s.get(st.Scan, ids[1])
        assert scan is not None
        assert (scan.shape, scan.spacing, scan.orientation, scan.dtype) == (
            [64, 64, 48],
            [1.0, 1.0, 1.2],
            "RAS",
            "float32",
        )
        cal = s.get(st.Calibration, ids[2])
        assert cal is not None and cal.ref == "healthy@1" and cal.model_id == model.id
        assert (cal.method, cal.voxel_threshold, cal.scan_threshold, cal.target_fpr) == (
            "healthy-fpr",
            0.31,
            0.02,
            0.01,
        )
        assert cal.data == {"scans": ["a"]} and cal.metrics == {"fpr_ci": [0.005, 0.02]}
        run = s.get(st.Run, ids[3])
        assert run is not None and run.calibration_id == cal.id and run.executor == "dask"
        assert run.settings == {"median": 3, "path": "/x"} and os.path.isabs(run.out_dir)
        detail = st.get_result_detail(s, run.results[0].id)
        assert detail is not None and detail.out_dir == run.out_dir and detail.scan.id == scan.id
        result = detail.result
        assert (result.status, result.score, result.flagged, result.timing_s) == ("ok", 0.42, True, 6.5)
        assert result.mask_path == "/tmp/out/a_mask.nii.gz" and result.recon_path == "/tmp/out/a_recon.nii.gz"
        assert result.details == {"stages": {"encode": 1.25}, "warnings": [], "nan": None}
        assert [f.rank for f in detail.findings] == [1, 2]
        first = detail.findings[0]
        assert (first.centroid_x, first.centroid_y, first.centroid_z) == (10.0, -20.0, 30.5)
        assert (first.peak_x, first.peak_y, first.peak_z, first.peak, first.mean) == (
            11.0,
            -19.0,
            31.0,
            0.9,
            0.4,
        )
        assert (first.n_voxels, first.volume_ml, first.atlas) == (2000, 2.0, "aal")
        assert detail.findings[1].region_centroid is None
        assert detail.latest_review is not None and detail.latest_review.note == "left thalamus"
        for stamp in (model.created_at, scan.created_at, cal.created_at, run.started_at, result.created_at,
                      result.updated_at, detail.latest_review.created_at):  # fmt: skip
            assert stamp.tzinfo is not None and stamp.utcoffset() == timezone.utc.utcoffset(None)
    store.close()


def test_get_or_create_is_idempotent_and_updates_scan_facts(store: Store) -> None:
    with store.session() as s:
        m1 = get_or_create_model(s, "vae", sha("w"), {"a": 1})
        m2 = get_or_create_model(s, "vae", sha("w"), {"a": 2})
        m3 = get_or_create_model(s, "vae", sha("other"), {})
        assert m1.id == m2.id != m3.id
        scan = get_or_create_scan(s, sha("x"), "/old/x.nii", "x")
        again = get_or_create_scan(s, sha("x"), "/new/x.nii.gz", "x", shape=(4, 5, 6))
        assert again.id == scan.id and again.path == "/new/x.nii.gz" and again.shape == [4, 5, 6]
        with pytest.raises(ValueError, match="not a SHA-256"):
            get_or_create_scan(s, "", "/p.nii", "p")


def test_foreign_keys_enforced_and_findings_cascade(store: Store, populated: dict[str, int]) -> None:
    with store.session() as s:
        assert s.scalar(select(Finding.id).where(Finding.result_id == populated["alpha"])) is not None
        s.execute(
            delete(Result).where(Result.id == populated["alpha"])
        )  # SQL-level delete: ON DELETE CASCADE
    with store.session() as s:
        assert s.scalars(select(Finding).where(Finding.result_id == populated["alpha"])).all() == []
    with pytest.raises(IntegrityError), store.session() as s:
        s.execute(
            insert(Finding).values(
                result_id=999_999,
                rank=1,
                n_voxels=1,
                volume_ml=0.001,
                centroid_x=0,
                centroid_y=0,
                centroid_z=0,
                peak_x=0,
                peak_y=0,
                peak_z=0,
                peak=1,
                mean=1,
            )  # fmt: skip
        )


# ----------------------------------------------------------------------------------------------- runs


def test_upsert_keeps_one_row_and_replaces_findings(store: Store) -> None:
    with store.session() as s:
        model = get_or_create_model(s, "vae", sha("w"), {})
        run = open_run(s, model, {}, sha("s"), "/out")
        scan = get_or_create_scan(s, sha("a"), "/a.nii", "a")
        first = upsert_result(s, run, scan, status="failed", input_path="/a.nii", error="boom")
        second = upsert_result(
            s,
            run,
            scan,
            status="ok",
            input_path="/a.nii",
            score=0.3,
            findings=[finding(1), finding(2), finding(3)],
        )
        assert second.id == first.id and second.error is None and len(second.findings) == 3
        third = upsert_result(
            s, run, scan, status="ok", input_path="/a.nii", score=0.4, findings=[finding(1, 9.0)]
        )
        assert third.id == first.id
    with store.session() as s:
        assert len(s.scalars(select(Result)).all()) == 1
        rows = s.scalars(select(Finding)).all()
        assert [(f.rank, f.volume_ml) for f in rows] == [(1, 9.0)]
        assert s.scalars(select(Result.score)).one() == 0.4
        with pytest.raises(ValueError, match="status 'done'"):
            upsert_result(s, run.id, scan.id, status="done", input_path="/a.nii")
        with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
            upsert_result(
                s, run.id, scan.id, status="ok", input_path="/a.nii", findings=[finding(1, colour="red")]
            )
        with pytest.raises(ValueError, match=r"missing keys \['peak'\]"):
            bad = finding(1)
            del bad["peak"]
            upsert_result(s, run.id, scan.id, status="ok", input_path="/a.nii", findings=[bad])


def test_open_run_reuses_same_run_and_keeps_start(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with store.session() as s:
        model = get_or_create_model(s, "vae", sha("w"), {})
        cal = st.save_calibration(s, "c", model, "manual", 0.5)
        run = open_run(s, model, {"k": 1}, sha("s"), "out")
        assert run.out_dir == str(tmp_path / "out")
        finish_run(s, run)
        started = run.started_at
    with store.session() as s:
        again = open_run(s, model, {"k": 1}, sha("s"), tmp_path / "out")
        assert again.id == run.id and again.finished_at is None and again.started_at == started
        assert open_run(s, model, {"k": 2}, sha("s2"), "out").id != run.id
        with_cal = open_run(s, model, {"k": 1}, sha("s"), "out", cal)
        assert (
            with_cal.id != run.id and open_run(s, model, {"k": 1}, sha("s"), "out", cal.id).id == with_cal.id
        )
        assert open_run(s, model, {"k": 1}, sha("s"), "elsewhere").id not in (run.id, with_cal.id)


def test_finish_run_counts_and_list_runs(store: Store, populated: dict[str, int]) -> None:
    with store.session() as s:
        add_review(s, populated["alpha"], "ann", "confirmed finding")
        add_review(s, populated["alpha"], "bob", "artefact")
        add_review(s, populated["bravo"], "ann", "normal")
        run = finish_run(s, populated["run"], n_skipped=3)
        assert (run.n_scored, run.n_failed, run.n_skipped) == (5, 1, 3) and run.finished_at is not None
        assert st.review_progress(s, populated["run"]) == (2, 5)
        empty = open_run(s, run.model_id, {}, sha("other"), "/other")
        summaries = st.list_runs(s)
    assert [r.run_id for r in summaries] == [empty.id, populated["run"]]
    summary = summaries[1]
    assert (summary.n_results, summary.n_ok, summary.n_failed, summary.n_flagged, summary.n_reviewed) == (
        6,
        5,
        1,
        2,
        2,
    )
    assert summary.model_name == "tiny-vae" and summary.calibration is None and summary.finished
    assert summary.n_skipped == 3 and summary.mean_timing_s == pytest.approx(
        1.0 + (5 + 5 + 7 + 5 + 4 + 7) / 60
    )
    assert (summaries[0].n_results, summaries[0].mean_timing_s, summaries[0].finished) == (0, None, False)


# ----------------------------------------------------------------------------------------------- calibrations


def test_calibration_versions_increment_and_refs(store: Store) -> None:
    with store.session() as s:
        m1 = get_or_create_model(s, "a", sha("1"), {})
        m2 = get_or_create_model(s, "b", sha("2"), {})
        versions = [st.save_calibration(s, "healthy", m1, "healthy-fpr", t).version for t in (0.1, 0.2, 0.3)]
        other = st.save_calibration(s, "lesions", m2, "labelled-dice", 0.5, scan_threshold=0.1)
        assert versions == [1, 2, 3] and other.version == 1
        assert get_calibration(s, "healthy").voxel_threshold == 0.3  # type: ignore[union-attr]
        assert get_calibration(s, "healthy@2").voxel_threshold == 0.2  # type: ignore[union-attr]
        assert get_calibration(s, "healthy", 1).voxel_threshold == 0.1  # type: ignore[union-attr]
        assert get_calibration(s, "healthy@latest").version == 3  # type: ignore[union-attr]
        assert get_calibration(s, "healthy@7") is None and get_calibration(s, "nothing") is None
        assert [c.ref for c in st.list_calibrations(s)] == [
            "healthy@1",
            "healthy@2",
            "healthy@3",
            "lesions@1",
        ]
        assert [c.ref for c in st.list_calibrations(s, m2)] == ["lesions@1"]
        with pytest.raises(ValueError, match="method 'guess'"):
            st.save_calibration(s, "x", m1, "guess", 0.1)
        with pytest.raises(ValueError, match="without '@'"):
            st.save_calibration(s, "x@1", m1, "manual", 0.1)
    assert st.parse_calibration_ref("healthy@12") == ("healthy", 12)
    assert st.parse_calibration_ref("healthy") == ("healthy", None)
    for bad in ("healthy@two", "healthy@0", "@3", "", "a@1@2"):
        with pytest.raises(ValueError, match="calibration reference"):
            st.parse_calibration_ref(bad)


# ----------------------------------------------------------------------------------------------- reviews


def test_review_validation_and_latest_verdict(store: Store, populated: dict[str, int]) -> None:
    with store.session() as s:
        with pytest.raises(ValueError) as info:
            add_review(s, populated["alpha"], "ann", "looks odd")
        message = str(info.value)
        assert "'looks odd'" in message and all(v in message for v in VERDICTS)
        with pytest.raises(ValueError, match="reviewer name"):
            add_review(s, populated["alpha"], "  ", "normal")
        with pytest.raises(st.NotFoundError, match="result 424242"):
            add_review(s, 424242, "ann", "normal")
        add_review(s, populated["alpha"], "ann", "unsure", "check later")
        add_review(s, populated["alpha"], "bob", "false positive", "vessel")
    with store.session() as s:
        detail = st.get_result_detail(s, populated["alpha"])
        assert detail is not None and [r.verdict for r in detail.reviews] == ["unsure", "false positive"]
        row = next(r for r in run_results(s, populated["run"]) if r.result_id == populated["alpha"])
        assert (row.verdict, row.reviewer, row.note) == ("false positive", "bob", "vessel")
        assert row.reviewed_at is not None and row.reviewed_at.tzinfo is not None
        assert s.scalar(select(text("count(*)")).select_from(Review)) == 2


# ----------------------------------------------------------------------------------------------- listings


def names(rows: list[st.ResultRow]) -> list[str]:
    return [r.scan_name for r in rows]


def test_run_results_filters_and_sorting(store: Store, populated: dict[str, int]) -> None:
    run_id = populated["run"]
    with store.session() as s:
        add_review(s, populated["alpha"], "ann", "confirmed finding")
        add_review(s, populated["delta"], "ann", "artefact")
        add_review(s, populated["delta"], "bob", "normal")

        assert names(run_results(s, run_id)) == ["alpha", "delta", "bravo", "charlie", "echo", "foxtrot"]
        assert names(run_results(s, run_id, order="score_asc")) == [
            "charlie",
            "bravo",
            "delta",
            "alpha",
            "echo",
            "foxtrot",
        ]
        assert names(run_results(s, run_id, order="name_desc"))[:2] == ["foxtrot", "echo"]
        assert names(run_results(s, run_id, order="timing_desc"))[:2] == ["charlie", "foxtrot"]
        assert names(run_results(s, run_id, status="failed")) == ["echo"]
        assert names(run_results(s, run_id, flagged=True)) == ["alpha", "delta"]
        assert names(run_results(s, run_id, flagged=False)) == ["bravo", "charlie", "echo", "foxtrot"]
        assert names(run_results(s, run_id, verdict="normal")) == ["delta"]
        assert names(run_results(s, run_id, verdict="artefact")) == []  # superseded by bob's verdict
        assert names(run_results(s, run_id, verdict="unreviewed", status="ok")) == [
            "bravo",
            "charlie",
            "foxtrot",
        ]
        assert names(run_results(s, run_id, verdict=["unreviewed", "normal"], flagged=True)) == ["delta"]
        assert names(run_results(s, run_id, reviewer="ann")) == ["alpha"]
        assert names(run_results(s, run_id, search="RAV")) == ["bravo"]
        assert names(run_results(s, run_id, search="%")) == []  # wildcards are literal
        assert names(run_results(s, run_id, order="name", limit=2, offset=1)) == ["bravo", "charlie"]
        assert st.count_results(s, run_id, verdict="unreviewed") == 4

        rows = {r.scan_name: r for r in run_results(s, run_id)}
        assert rows["alpha"].n_findings == 2 and rows["bravo"].n_findings == 0
        assert rows["echo"].error == "cannot read header" and rows["echo"].map_path is None
        assert rows["alpha"].content_hash == sha("alpha") and rows["alpha"].input_path == "/data/alpha.nii.gz"
        with pytest.raises(ValueError, match="unknown order 'best'"):
            run_results(s, run_id, order="best")
        with pytest.raises(ValueError, match="verdict filter"):
            run_results(s, run_id, verdict="great")
        assert run_results(s, 999) == []


def test_neighbours(store: Store, populated: dict[str, int]) -> None:
    run_id, ids = populated["run"], populated
    with store.session() as s:
        # score_desc order: alpha, delta, bravo, charlie, echo, foxtrot
        assert st.neighbours(s, run_id, ids["alpha"]) == (None, ids["delta"])
        assert st.neighbours(s, run_id, ids["bravo"]) == (ids["delta"], ids["charlie"])
        assert st.neighbours(s, run_id, ids["foxtrot"]) == (ids["echo"], None)
        assert st.neighbours(s, run_id, ids["bravo"], order="name") == (ids["alpha"], ids["charlie"])
        assert st.neighbours(s, run_id, 424242) == (None, None)
        add_review(s, ids["delta"], "ann", "normal")
        # within "unreviewed": delta itself no longer matches but still anchors the position
        assert st.neighbours(s, run_id, ids["delta"], verdict="unreviewed") == (ids["alpha"], ids["bravo"])
        assert st.neighbours(s, run_id, ids["alpha"], flagged=True) == (None, ids["delta"])


def test_thousand_results_listed_in_one_statement(store: Store) -> None:
    n = 1200
    with store.session() as s:
        model = get_or_create_model(s, "vae", sha("w"), {})
        run = open_run(s, model, {}, sha("s"), "/out")
        now = st.utcnow()
        s.execute(
            insert(st.Scan),
            [
                {"content_hash": sha(f"s{i}"), "path": f"/d/s{i}.nii", "name": f"s{i:04d}", "created_at": now}
                for i in range(n)
            ],
        )
        scan_ids = {name: id_ for name, id_ in s.execute(select(st.Scan.name, st.Scan.id))}
        s.execute(
            insert(Result),
            [
                {
                    "run_id": run.id,
                    "scan_id": scan_ids[f"s{i:04d}"],
                    "input_path": f"/d/s{i}.nii",
                    "status": "ok",
                    "score": (i * 7919 % n) / n,
                    "flagged": i % 3 == 0,
                    "details": {},
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(n)
            ],  # fmt: skip
        )
        result_ids = s.scalars(select(Result.id).order_by(Result.id)).all()
        s.execute(
            insert(Review),
            [
                {
                    "result_id": rid,
                    "reviewer": "ann",
                    "verdict": VERDICTS[i % 5],
                    "note": "",
                    "created_at": now,
                }
                for i, rid in enumerate(result_ids[::2])
            ],  # fmt: skip
        )
        s.execute(insert(Finding), [{"result_id": rid, **_finding_columns()} for rid in result_ids[::3]])
        st.refresh_run(s, run)  # rows inserted in bulk, past the write API: rebuild the listing copies and counts
        run_id = run.id
        assert (run.n_scored, run.n_reviewed, run.n_findings, run.n_reviews) == (n, n // 2, n // 3, n // 2)

    statements: list[str] = []
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(store.engine, "before_cursor_execute", listener)
    try:
        with store.session() as s:
            rows = run_results(s, run_id)
            unreviewed = run_results(s, run_id, verdict="unreviewed", flagged=True, order="name")
    finally:
        event.remove(store.engine, "before_cursor_execute", listener)
    assert len(rows) == n and len(statements) == 2
    scores = [r.score for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert sum(r.verdict is not None for r in rows) == n // 2 and sum(r.n_findings for r in rows) == n // 3
    assert unreviewed and all(r.verdict is None and r.flagged for r in unreviewed)


def _finding_columns() -> dict[str, object]:
    values = finding(1)
    values.pop("centroid_mm")
    values.update(centroid_x=1.0, centroid_y=2.0, centroid_z=3.0)
    return values


def test_export_tables(store: Store, populated: dict[str, int]) -> None:
    with store.session() as s:
        add_review(s, populated["alpha"], "ann", "unsure")
        add_review(s, populated["alpha"], "bob", "confirmed finding", "clear")
        results = st.results_table(s, populated["run"])
        findings = st.findings_table(s)
        reviews = st.reviews_table(s, populated["run"])
        assert st.results_table(s, 999) == []
    assert len(results) == 6 and all(list(r) == list(st.RESULT_COLUMNS) for r in results)
    assert list(st.RESULT_COLUMNS)[:6] == ["path", "scan_id", "status", "score", "map_path", "error"]
    alpha = next(r for r in results if r["name"] == "alpha")
    assert alpha["scan_id"] == sha("alpha") and alpha["model"] == "tiny-vae" and alpha["calibration"] is None
    assert (alpha["verdict"], alpha["n_findings"], alpha["run_id"]) == (
        "confirmed finding",
        2,
        populated["run"],
    )
    assert isinstance(alpha["updated_at"], str)
    assert len(findings) == 4 and all(list(f) == list(st.FINDING_COLUMNS) for f in findings)
    assert [f["rank"] for f in findings if f["result_id"] == populated["alpha"]] == [1, 2]
    assert [(r["reviewer"], r["verdict"]) for r in reviews] == [
        ("ann", "unsure"),
        ("bob", "confirmed finding"),
    ]
    assert all(list(r) == list(st.REVIEW_COLUMNS) for r in reviews)


def test_newest_reviews_walk_back_through_windows(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Export preview's newest reviews of a run, read a few review ids at a time, equal the newest of
    the full table, across windows and with another run's reviews in between."""
    import anomaly.store.tables as tables

    monkeypatch.setattr(tables, "REVIEW_WINDOW", 3)
    with store.session() as s:
        model = get_or_create_model(s, "vae", sha("w"), {})
        runs = [open_run(s, model, {}, sha(f"s{k}"), f"/out{k}") for k in range(2)]
        results = {}
        for k, run in enumerate(runs):
            for i in range(4):
                scan = get_or_create_scan(s, sha(f"scan{i}"), f"/scan{i}.nii", f"scan{i}")
                results[k, i] = upsert_result(s, run, scan, status="ok", input_path=f"/scan{i}.nii", score=0.1 * i).id
        for step in range(14):  # run 0 gets two reviews for each one of run 1
            add_review(s, results[int(step % 3 == 0), step % 4], f"r{step}", "normal", f"note {step}")
        for run in runs:
            everything = sorted(st.reviews_table(s, run.id), key=lambda r: r["note"].split()[1].zfill(3), reverse=True)
            for limit in (1, 4, 20):
                assert st.reviews_table(s, run.id, limit=limit) == everything[:limit]
        assert [r["note"] for r in st.reviews_table(s, None, limit=2)] == ["note 13", "note 12"]


def test_export_names_calibration(store: Store) -> None:
    with store.session() as s:
        model = get_or_create_model(s, "vae", sha("w"), {})
        cal = st.save_calibration(s, "healthy", model, "manual", 0.5)
        cal = st.save_calibration(s, "healthy", model, "manual", 0.6)
        run = open_run(s, model, {}, sha("s"), "/out", cal)
        upsert_result(
            s, run, get_or_create_scan(s, sha("a"), "/a.nii", "a"), status="ok", input_path="/a.nii"
        )
        assert [r["calibration"] for r in st.results_table(s)] == ["healthy@2"]
        assert st.list_runs(s)[0].calibration == "healthy@2"


# ----------------------------------------------------------------------------------------------- processes

_WORKER = textwrap.dedent(
    """
    import hashlib, sys
    from anomaly.store import get_or_create_model, get_or_create_scan, open_run, open_store, upsert_result

    db, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = open_store(db)
    for i in range(count):
        with store.session() as s:
            model = get_or_create_model(s, "vae", "w" * 64, {})
            run = open_run(s, model, {}, "s" * 64, "/out")
            name = f"{tag}{i}"
            scan = get_or_create_scan(s, hashlib.sha256(name.encode()).hexdigest(), "/" + name, name)
            upsert_result(s, run, scan, status="ok", input_path="/" + name, score=i / count)
    store.close()
    """
)


def test_several_processes_share_one_sqlite_file(db_path: Path) -> None:
    """Two writer processes create the database at the same moment and write while this one reads."""
    env = child_env()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(db_path), tag, "40"],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    reads = 0
    while any(w.poll() is None for w in workers):
        time.sleep(0.05)
        if db_path.exists():
            store = open_store(db_path)
            with store.session() as s:
                runs = st.list_runs(s)
                if runs:
                    run_results(s, runs[0].run_id)
                    reads += 1
            store.close()
    errors = [w.communicate()[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    store = open_store(db_path)
    with store.session() as s:
        (run,) = st.list_runs(s)
        assert run.n_results == 80 and st.get_or_create_model(s, "vae", "w" * 64).id == run.model_id
    store.close()


_OPENER = textwrap.dedent(
    """
    import sys, time
    from sqlalchemy import text
    from anomaly.store.engine import create_store_engine, normalize_db_url

    first, paths = float(sys.argv[1]), sys.argv[2:]
    engines = [create_store_engine(normalize_db_url(p)) for p in paths]
    for i, engine in enumerate(engines):
        while time.time() < first + 0.15 * i:
            pass
        with engine.connect() as conn:
            conn.execute(text("SELECT count(*) FROM sqlite_master")).scalar_one()
        engine.dispose()
    """
)


def test_processes_opening_a_new_file_at_the_same_instant_all_switch_it_to_wal(tmp_path: Path) -> None:
    """SQLite skips its busy handler for a journal-mode change; the engine must retry it itself."""
    env = child_env()
    paths = [str(tmp_path / f"new{i}.db") for i in range(16)]
    first = time.time() + 4.0  # every process is imported and spinning before the first file is opened
    openers = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, str(first), *paths], env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in openers]
    assert [p.returncode for p in openers] == [0] * 4, errors
    for path in paths:
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_concurrent_calibrations_of_one_name_get_distinct_versions(db_path: Path) -> None:
    """Two stores saving versions of the same calibration at once never collide on a version."""
    stores = [open_store(db_path), open_store(db_path)]
    with stores[0].session() as s:
        model_id = get_or_create_model(s, "vae", sha("w"), {}).id
    errors: list[BaseException] = []

    def save(store: Store, tag: str) -> None:
        try:
            for i in range(8):
                with store.session() as s:
                    st.list_calibrations(s)  # a read first, as the calibrate pipeline does
                    time.sleep(0.002)
                    st.save_calibration(s, "healthy", model_id, "manual", 0.1 + i, data={"by": tag})
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(store, tag)) for store, tag in zip(stores, "ab", strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with stores[0].session() as s:
        saved = st.list_calibrations(s)
    assert [c.version for c in saved] == list(range(1, 17))
    assert sorted(c.data["by"] for c in saved) == ["a"] * 8 + ["b"] * 8
    for store in stores:
        store.close()


def test_migration_0004_fills_listing_copies_and_run_counts(tmp_path: Path) -> None:
    """A database written before 0004_scale gets its results' copies (scan name, findings, latest review)
    and its runs' counts from the rows already there, with set statements."""
    from anomaly.store import alembic_config, create_store_engine, normalize_db_url

    url = normalize_db_url(tmp_path / "old.db")
    engine = create_store_engine(url)
    with engine.begin() as conn:
        from alembic import command

        command.upgrade(alembic_config(connection=conn), "0003_dicom")
        now = "2026-11-01 10:00:00.000000"
        conn.execute(text("INSERT INTO models (id, name, weights_hash, config, created_at) "
                          "VALUES (1, 'm', 'w', '{}', :t)"), {"t": now})
        conn.execute(text("INSERT INTO runs (id, model_id, settings, settings_hash, out_dir, started_at, n_scored, "
                          "n_failed, n_skipped, executor) VALUES (1, 1, '{}', 's', '/o', :t, 0, 0, 0, 'local')"),
                     {"t": now})
        for i, (status, score, flagged, timing) in enumerate(
                [("ok", 0.9, 1, 2.0), ("ok", 0.1, 0, 4.0), ("failed", None, None, None)], start=1):
            conn.execute(text("INSERT INTO scans (id, content_hash, path, name, created_at) "
                              "VALUES (:i, :h, '/p', :n, :t)"), {"i": i, "h": sha(str(i)), "n": f"scan{i}", "t": now})
            conn.execute(text("INSERT INTO results (id, run_id, scan_id, input_path, status, score, flagged, "
                              "timing_s, details, created_at, updated_at) VALUES (:i, 1, :i, '/p', :s, :sc, :f, :tm, "
                              "'{}', :t, :t)"), {"i": i, "s": status, "sc": score, "f": flagged, "tm": timing, "t": now})
        conn.execute(text("INSERT INTO findings (result_id, rank, n_voxels, volume_ml, centroid_x, centroid_y, "
                          "centroid_z, peak_x, peak_y, peak_z, peak, mean) VALUES (1, 1, 5, 0.1, 0, 0, 0, 0, 0, 0, 1, 1)"))
        for rid, who, verdict, at in ((1, "ann", "unsure", "2026-11-02 10:00:00.000000"),
                                      (1, "bob", "normal", "2026-11-03 10:00:00.000000"),
                                      (3, "ann", "artefact", "2026-11-02 10:00:00.000000")):
            conn.execute(text("INSERT INTO reviews (result_id, reviewer, verdict, note, created_at) "
                              "VALUES (:r, :w, :v, 'n', :t)"), {"r": rid, "w": who, "v": verdict, "t": at})
    engine.dispose()
    store = open_store(url)  # migrates to the newest revision
    try:
        with store.session() as s:
            summary = st.list_runs(s)[0]
            rows = {r.scan_name: r for r in run_results(s, 1)}
            assert st.review_progress(s, 1) == (1, 2)
            assert [r.scan_name for r in st.result_page(s, 1, verdict="unreviewed").rows] == ["scan2"]
            assert st.reviewers(s, 1) == ["ann", "bob"]
    finally:
        store.close()
    assert (summary.n_results, summary.n_ok, summary.n_failed, summary.n_flagged) == (3, 2, 1, 1)
    assert (summary.n_reviewed, summary.n_reviews, summary.n_findings) == (1, 3, 1)
    assert summary.mean_timing_s == pytest.approx(3.0)
    assert (rows["scan1"].verdict, rows["scan1"].reviewer, rows["scan1"].n_findings) == ("normal", "bob", 1)
    assert rows["scan3"].verdict == "artefact" and rows["scan2"].verdict is None


def test_keyset_pages_walk_every_order_like_one_statement(store: Store, populated: dict[str, int]) -> None:
    """Pages of two (keyset) and neighbours give the same sequence as the one-statement listing."""
    run_id = populated["run"]
    with store.session() as s:
        add_review(s, populated["delta"], "ann", "normal")
        for order in st.ORDERS:
            for filters in ({}, {"status": "ok"}, {"verdict": "unreviewed"}, {"flagged": False}):
                expected = [r.result_id for r in run_results(s, run_id, order=order, **filters)]
                walked, start = [], None
                while True:
                    page = st.result_page(s, run_id, order=order, start=start, size=2, **filters)
                    walked += [r.result_id for r in page.rows]
                    if page.next_start is None:
                        break
                    start = page.next_start
                assert walked == expected, (order, filters)
                for i, rid in enumerate(expected):
                    prev_id = expected[i - 1] if i else None
                    next_id = expected[i + 1] if i + 1 < len(expected) else None
                    assert st.neighbours(s, run_id, rid, order, **filters) == (prev_id, next_id), (order, filters, i)
