"""Pages read only what they show: the SQL statements and the rows each dashboard interaction reads stay the
same whether a run holds 200 or 4,000 scans (real SQLite, and PostgreSQL when ``ANOMALY_TEST_PG_URL`` is
set; the real app script through Streamlit's ``AppTest``). SQLite also counts the virtual-machine steps
of every statement, which grow with the rows a statement scans, not only with those it returns."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.pool import Pool

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import anomaly.store as st  # noqa: E402
from anomaly.store import bulk  # noqa: E402

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

    def reset(self) -> None:
        self.statements, self.rows, self.steps = [], 0, 0


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


def _before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
    METER.statements.append(statement)


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
    """A calibrated run of ``n`` results (3 failed, 10 reviewed by two readers, one finding each)
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
            failed = i in (7, 57, 97)
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


def measure(url: str, meter: Meter, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[int, int, int]]:
    """(statements, rows, steps) of each interaction, after a first load."""
    monkeypatch.setenv("ANOMALY_DB", url)
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["reviewer"] = "cat"
    at.run()
    found: dict[str, tuple[int, int, int]] = {}
    for label, action in interactions(at):
        meter.reset()
        action()
        assert not at.exception, (label, [e.value for e in at.exception])
        found[label] = (len(meter.statements), meter.rows, meter.steps)
    return found


def check(small: dict[str, tuple[int, int, int]], large: dict[str, tuple[int, int, int]], steps: bool) -> None:
    for label, (n_small, rows_small, steps_small) in small.items():
        n_large, rows_large, steps_large = large[label]
        assert n_large == n_small, f"{label}: {n_small} statements at {SIZES[0]} scans, {n_large} at {SIZES[1]}"
        assert rows_large == rows_small, f"{label}: {rows_small} rows read at {SIZES[0]} scans, {rows_large} at {SIZES[1]}"
        if steps:  # B-tree depth grows with the run, and a filtered count reads up to 1,000 index entries
            # (the worklist's cap); work that scanned the run would grow 20 times
            assert steps_large <= 3 * steps_small + 20, f"{label}: {steps_small} VM steps at {SIZES[0]}, {steps_large} at {SIZES[1]}"


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
    base = make_url(st.normalize_db_url(PG_URL))
    names = [f"anomaly_scale_{uuid.uuid4().hex[:10]}" for _ in SIZES]
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        for name in names:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield [base.set(database=name).render_as_string(hide_password=False) for name in names]
    finally:
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_postgresql_reads_per_interaction_do_not_grow_with_the_run(
    tmp_path: Path, metered: Meter, monkeypatch: pytest.MonkeyPatch, pg_urls: list[str]
) -> None:
    found = {}
    for n, url in zip(SIZES, pg_urls, strict=True):
        seed(url, tmp_path / f"files{n}", n)
        found[n] = measure(url, metered, monkeypatch)
    check(found[SIZES[0]], found[SIZES[1]], steps=False)
