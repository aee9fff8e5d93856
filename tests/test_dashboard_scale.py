"""Pages read only what they show: the SQL statements and the rows each dashboard interaction reads stay the
same whether a run holds 200 or 4,000 scans (real SQLite, and PostgreSQL when ``ANOMALY_TEST_PG_URL`` is
set; the real app script through Streamlit's ``AppTest``). Every 50th scan failed, so the failed scans grow
with the run as well (beyond a page of them). Rows returned are not enough: a statement may read and sort many rows to return a few.
SQLite therefore also counts the virtual-machine steps of every statement, and PostgreSQL replays each
query under ``EXPLAIN ANALYZE`` and counts the rows its scans read (filtered-out rows included)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import anomaly.store as st  # noqa: E402
from anomaly.store import bulk  # noqa: E402
from anomaly.store.scratch import scratch_databases  # noqa: E402
from dashboard.views.worklist import COUNT_LIMIT  # noqa: E402

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
PG_URL = os.environ.get("ANOMALY_TEST_PG_URL", "")
SIZES = (200, 4000)
STEP_EVERY = 50  # SQLite progress-handler period, in virtual-machine instructions


@dataclass
class Meter:
    """Statements, rows returned and (SQLite) VM steps since the last reset, for every engine in the process."""

    statements: list[str] = field(default_factory=list)
    rows: int = 0
    steps: int = 0
    queries: list[tuple[str, Any]] = field(default_factory=list)  # PostgreSQL reads, replayed under EXPLAIN

    def reset(self) -> None:
        self.statements, self.rows, self.steps, self.queries = [], 0, 0, []


METER = Meter()


def _count_row(cursor: Any, row: tuple[Any, ...]) -> tuple[Any, ...]:
    METER.rows += 1
    return row


def _tick() -> int:
    METER.steps += 1
    return 0


def _on_connect(dbapi_connection: Any, _record: Any) -> None:
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.row_factory = _count_row
        dbapi_connection.set_progress_handler(_tick, STEP_EVERY)


def _before(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
    METER.statements.append(statement)
    if conn.dialect.name == "postgresql" and statement.lstrip().upper().startswith(("SELECT", "WITH")):
        METER.queries.append((statement, parameters))


def _after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
    if conn.dialect.name != "sqlite" and statement.lstrip().upper().startswith(("SELECT", "WITH")):
        METER.rows += max(cursor.rowcount, 0)


@pytest.fixture
def metered() -> Iterator[Meter]:
    event.listen(Pool, "connect", _on_connect)
    event.listen(Engine, "before_cursor_execute", _before)
    event.listen(Engine, "after_cursor_execute", _after)
    try:
        yield METER
    finally:
        event.remove(Engine, "after_cursor_execute", _after)
        event.remove(Engine, "before_cursor_execute", _before)
        event.remove(Pool, "connect", _on_connect)


def _nifti(path: Path, data: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    return str(path)


def seed(url: str, root: Path, n: int) -> int:
    """A calibrated run of ``n`` results (30 of the first 150 failed, then every 50th; 10 reviewed by two
    readers; one finding each)
    inserted in bulk; all share three small NIfTI files in the run's folder. Returns the run id."""
    rng = np.random.default_rng(0)
    out = root / "out"
    brain = np.zeros((16, 16, 16), np.float32)
    brain[3:13, 3:13, 3:13] = 100.0
    files = {kind: _nifti(out / f"shared_{kind}.nii.gz", data) for kind, data in
             (("input", brain), ("anomaly", brain / 200 + rng.random(brain.shape) * 0.1), ("recon", brain))}
    store = st.open_store(url)
    with store.session() as s:
        model = st.get_or_create_model(s, "scale-vae", "0" * 64)
        calibration = st.save_calibration(s, "scale", model, "healthy-fpr", 0.5, scan_threshold=0.3)
        run = st.open_run(s, model, {}, "1" * 64, out, calibration)
        now = st.utcnow()
        hashes = [hashlib.sha256(f"scan{i}".encode()).hexdigest() for i in range(n)]
        scan_ids = bulk.add_scans(s, [{"content_hash": h, "path": f"/in/scan{i:05d}.nii.gz", "name": f"scan{i:05d}",
                                       "created_at": now} for i, h in enumerate(hashes)])
        scores = rng.random(n)
        rows = []
        for i, h in enumerate(hashes):
            failed = i % 5 == 2 if i < 150 else i % 50 == 7  # more than a page of them at either size
            rows.append({"scan_id": scan_ids[h], "input_path": f"/in/scan{i:05d}.nii.gz",
                         "status": "failed" if failed else "ok", "error": "damaged file" if failed else None,
                         "score": None if failed else float(scores[i]), "flagged": None if failed else scores[i] > 0.3,
                         "map_path": None if failed else files["anomaly"], "recon_path": None if failed else files["recon"],
                         "timing_s": 6.5, "created_at": now, "updated_at": now + timedelta(microseconds=i)})
        result_ids = bulk.add_results(s, run, rows)
        ordered = [result_ids[scan_ids[h]] for h in hashes]
        bulk.add_findings(s, [{"result_id": rid, "rank": 1, "n_voxels": 8, "volume_ml": 0.008, "centroid_x": 1.0,
                               "centroid_y": 2.0, "centroid_z": 3.0, "peak_x": 1.0, "peak_y": 2.0, "peak_z": 3.0,
                               "peak": 0.9, "mean": 0.7} for rid in ordered])
        bulk.add_reviews(s, [{"result_id": rid, "reviewer": "ann" if k % 2 else "bob", "verdict": "normal", "note": "",
                              "created_at": now} for k, rid in enumerate(ordered[:10])])
        st.refresh_run(s, run)
        run_id = run.id
    store.close()
    return run_id


def interactions(at: AppTest) -> list[tuple[str, Callable[[], AppTest]]]:
    """What a reviewer does, in order, each one script run of the app."""
    def save_and_next() -> AppTest:
        at.radio(key="rv_verdict").set_value("artefact")
        next(b for b in at.button if b.label == "Save & next").click()
        return at.run()

    return [
        ("switch to Worklist", lambda: at.sidebar.radio[0].set_value("Worklist").run()),
        ("worklist next page", lambda: at.button(key="wl_next_page").click().run()),
        ("worklist unreviewed", lambda: at.selectbox(key="wl_verdict").set_value("unreviewed").run()),
        ("switch to Viewer", lambda: at.sidebar.radio[0].set_value("Viewer").run()),
        ("next scan", lambda: at.button(key="vw_next").click().run()),
        ("move a slice slider", lambda: at.slider(key="vw_z").set_value(5).run()),
        ("move the threshold", lambda: at.slider(key="vw_threshold").set_value(0.2).run()),
        ("save verdict and open next", save_and_next),
        ("switch to Export", lambda: at.sidebar.radio[0].set_value("Export").run()),
        ("switch to Runs", lambda: at.sidebar.radio[0].set_value("Runs").run()),
    ]


SCANS = ("Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan")


def rows_scanned(plan: dict[str, Any]) -> int:
    """Rows the scans of a PostgreSQL plan read: those they passed on and those their filters removed."""
    loops = plan.get("Actual Loops", 1)
    own = 0
    if plan["Node Type"] in SCANS:
        own = (plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
               + plan.get("Rows Removed by Index Recheck", 0)) * loops
    return own + sum(rows_scanned(child) for child in plan.get("Plans", []))


def replay(url: str, queries: list[tuple[str, Any]]) -> list[int]:
    """Rows read by each query, from ``EXPLAIN (ANALYZE, FORMAT JSON)`` on the same database: the fewer of as
    planned and with sequential scans discouraged, i.e. what the indexes allow (on a small run the planner
    would rather read a whole tiny table than walk an index)."""
    engine = create_engine(url)
    found: list[list[int]] = [[] for _ in queries]
    try:
        with engine.connect() as conn:
            for setting in ("on", "off"):
                conn.exec_driver_sql(f"SET enable_seqscan = {setting}")
                for row, (sql, params) in zip(found, queries, strict=True):
                    plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).scalar_one()
                    row.append(rows_scanned(plan[0]["Plan"]))
    finally:
        engine.dispose()
    return [min(row) for row in found]


Found = tuple[int, int, int, list[tuple[str, int]]]


def measure(url: str, meter: Meter, monkeypatch: pytest.MonkeyPatch) -> dict[str, Found]:
    """(statements, rows, steps, PostgreSQL rows read per query) of each interaction, after a first load."""
    monkeypatch.setenv("ANOMALY_DB", url)
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["reviewer"] = "cat"
    at.run()
    found: dict[str, Found] = {}
    for label, action in interactions(at):
        meter.reset()
        action()
        assert not at.exception, (label, [e.value for e in at.exception])
        counted, queries = (len(meter.statements), meter.rows, meter.steps), list(meter.queries)
        read = replay(url, queries) if queries else []  # after the counting: the replay is metered too
        found[label] = (*counted, [(sql, n) for (sql, _), n in zip(queries, read, strict=True)])
    return found


def check(small: dict[str, Found], large: dict[str, Found], steps: bool) -> None:
    for label, (n_small, rows_small, steps_small, read_small) in small.items():
        n_large, rows_large, steps_large, read_large = large[label]
        assert n_large == n_small, f"{label}: {n_small} statements at {SIZES[0]} scans, {n_large} at {SIZES[1]}"
        assert rows_large == rows_small, f"{label}: {rows_small} rows read at {SIZES[0]} scans, {rows_large} at {SIZES[1]}"
        if steps:  # B-tree depth grows with the run, and a filtered count reads up to 1,000 index entries
            # (the worklist's cap); work that scanned the run would grow 20 times
            assert steps_large <= 3 * steps_small + 20, f"{label}: {steps_small} VM steps at {SIZES[0]}, {steps_large} at {SIZES[1]}"
        for (sql, small_n), (_, large_n) in zip(read_small, read_large, strict=True):
            # a filtered count stops after the worklist's cap of matches (plus one, to say "more than"), whatever
            # the run; a scan may pass over some rows that do not match on the way
            allowed = max(small_n, 2 * (COUNT_LIMIT + 1)) if "count(" in sql else small_n
            assert large_n <= allowed, (f"{label}: a query read {small_n} rows at {SIZES[0]} scans and {large_n} at "
                                        f"{SIZES[1]}: {' '.join(sql.split())[-400:]}")


def test_sqlite_reads_per_interaction_do_not_grow_with_the_run(
    tmp_path: Path, metered: Meter, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = {}
    for n in SIZES:
        url = "sqlite:///" + (tmp_path / f"db{n}" / "anomaly.db").as_posix()
        (tmp_path / f"db{n}").mkdir()
        seed(url, tmp_path / f"files{n}", n)
        found[n] = measure(url, metered, monkeypatch)
    assert found[SIZES[0]]["next scan"][0] > 0  # the meter sees the app's statements
    check(found[SIZES[0]], found[SIZES[1]], steps=True)


@pytest.fixture
def pg_urls() -> Iterator[list[str]]:
    """Two fresh databases on the test server (dropped afterwards)."""
    if not PG_URL:
        pytest.skip("set ANOMALY_TEST_PG_URL (scripts/start_test_postgres.sh)")
    pytest.importorskip("psycopg")
    with scratch_databases(PG_URL, "anomaly_scale", len(SIZES)) as urls:
        yield urls


def test_postgresql_reads_per_interaction_do_not_grow_with_the_run(
    tmp_path: Path, metered: Meter, monkeypatch: pytest.MonkeyPatch, pg_urls: list[str]
) -> None:
    found = {}
    for n, url in zip(SIZES, pg_urls, strict=True):
        seed(url, tmp_path / f"files{n}", n)
        engine = create_engine(url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))  # as autovacuum does after a bulk fill: the planner sees the run's size
        engine.dispose()
        found[n] = measure(url, metered, monkeypatch)
    assert any(read for *_, read in found[SIZES[0]].values())  # the replay saw the app's queries
    check(found[SIZES[0]], found[SIZES[1]], steps=False)
