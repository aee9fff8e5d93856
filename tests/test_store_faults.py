"""Database faults during a batch: SQLite locked beyond the timeout, a full database while committing,
PostgreSQL restarted mid-batch. Each time the batch reports one line, resumes when run again, and no
row says ``ok`` without its map on disk."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError

import anomaly.store as st
from anomaly.config import load_scoring_settings
from anomaly.models import load_model
from pipelines.batch import score_batch
from pipelines.cli import describe_error
from tests.conftest import REPO, phantom, write_nifti

SETTINGS = load_scoring_settings(preprocess={"spacing": [2.0, 2.0, 2.0], "slice_size": 128},
                                 save_reconstruction=False)


def _scans(folder: Path, n: int) -> list[Path]:
    return [write_nifti(folder / f"s{i:02d}.nii.gz", phantom((40, 48, 36), seed=i), np.diag([3.0, 3.0, 3.0, 1.0]))
            for i in range(n)]


def _ok_rows_have_maps(store: st.Store) -> int:
    """Every ok row's map is on disk; returns the number of ok rows."""
    with store.session() as s:
        rows = s.execute(text("select input_path, map_path from results where status = 'ok'")).all()
    for path, map_path in rows:
        assert map_path and Path(map_path).is_file(), f"{path}: ok without its map {map_path}"
    return len(rows)


def _batch(folder: Path, out: Path, store: st.Store, **kwargs: Any) -> Any:
    return score_batch([folder], out, load_model("intensity"), store, SETTINGS, progress=False, **kwargs)


def test_sqlite_locked_beyond_the_timeout_mid_batch(tmp_path: Path) -> None:
    folder, out, db = tmp_path / "in", tmp_path / "out", tmp_path / "r.db"
    _scans(folder, 4)
    store = st.open_store(db, busy_timeout_s=0.5)
    holder = sqlite3.connect(db, timeout=0.1, isolation_level=None)

    def lock_after_first(outcome: Any) -> None:
        if not holder.in_transaction:
            holder.execute("BEGIN EXCLUSIVE")  # another process's long write transaction

    with pytest.raises(DBAPIError) as info:
        _batch(folder, out, store, on_outcome=lock_after_first)
    message, code = describe_error(info.value, str(db))
    assert "locked" in message and "\n" not in message and code == 1
    holder.execute("ROLLBACK")
    holder.close()
    assert _ok_rows_have_maps(store) == 1

    summary = _batch(folder, out, store)  # run again: resumes
    assert summary.count("skipped") == 1 and summary.count("ok") == 3
    assert _ok_rows_have_maps(store) == 4
    store.close()


def test_database_full_while_committing(tmp_path: Path) -> None:
    """SQLite's own limit on the file's size (``max_page_count``) gives the real SQLITE_FULL path."""
    folder, out, db = tmp_path / "in", tmp_path / "out", tmp_path / "r.db"
    scans = _scans(folder, 10)
    store = st.open_store(db)
    first = score_batch(scans[:2], out, load_model("intensity"), store, SETTINGS, progress=False)
    assert first.count("ok") == 2
    with store.engine.connect() as conn:
        pages = int(conn.exec_driver_sql("PRAGMA page_count").scalar() or 0)
    store.close()

    engine = st.create_store_engine(st.normalize_db_url(db))

    @event.listens_for(engine, "connect")
    def _limit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    full = st.Store(engine)
    with pytest.raises(DBAPIError) as info:
        score_batch(scans, out, load_model("intensity"), full, SETTINGS, progress=False)
    message, _ = describe_error(info.value, str(db))
    assert "full" in message and "\n" not in message
    assert _ok_rows_have_maps(full) >= 2
    full.close()

    store = st.open_store(db)  # space again: the same command resumes
    summary = score_batch(scans, out, load_model("intensity"), store, SETTINGS, progress=False)
    assert summary.count("failed") == 0
    assert _ok_rows_have_maps(store) == 10
    store.close()


PG_URL = os.environ.get("ANOMALY_TEST_PG_URL", "")


@pytest.mark.skipif(not PG_URL, reason="set ANOMALY_TEST_PG_URL (scripts/start_test_postgres.sh)")
def test_postgresql_restarted_mid_batch(tmp_path: Path) -> None:
    pytest.importorskip("psycopg")
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from anomaly.store.scratch import scratch_database

    base = make_url(st.normalize_db_url(PG_URL))
    folder, out = tmp_path / "in", tmp_path / "out"
    _scans(folder, 4)
    restarted: list[str] = []
    with scratch_database(PG_URL, "anomaly_faults") as url:
        name = make_url(url).database

        def restart_after_first(outcome: Any) -> None:
            if restarted:
                return
            done = subprocess.run(["bash", str(REPO / "scripts" / "start_test_postgres.sh"), "restart"],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                restarted.append("server restarted")
                return
            # No server folder known here (a server started elsewhere): end every connection server-side.
            killer = create_engine(base, isolation_level="AUTOCOMMIT")
            with killer.connect() as conn:
                conn.execute(text("select pg_terminate_backend(pid) from pg_stat_activity where datname = :d"),
                             {"d": name})
            killer.dispose()
            restarted.append("connections terminated")

        store = st.open_store(url)
        try:
            try:
                _batch(folder, out, store, on_outcome=restart_after_first)
            except DBAPIError as exc:  # a commit that met the server down: one line, then resume
                message, _ = describe_error(exc, url)
                assert "\n" not in message
            assert restarted
            _ok_rows_have_maps(store)
            summary = _batch(folder, out, store)
            assert summary.count("failed") == 0
            assert _ok_rows_have_maps(store) == 4
        finally:
            store.close()
