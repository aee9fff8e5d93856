"""The store's core round trip on PostgreSQL; runs when ``ANOMALY_TEST_PG_URL`` names a server.

Start a throwaway server with ``export ANOMALY_TEST_PG_URL="$(scripts/start_test_postgres.sh)"``.
Each test module works in a fresh database created on that server and dropped afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timezone
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, delete, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

import anomaly.store as st
from anomaly.store.schema import SEARCH_INDEXES, compared
from anomaly.store.scratch import scratch_database
from tests.conftest import child_env

PG_URL = os.environ.get("ANOMALY_TEST_PG_URL", "")
pytestmark = pytest.mark.skipif(not PG_URL, reason="set ANOMALY_TEST_PG_URL (scripts/start_test_postgres.sh)")


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def finding(rank: int, volume_ml: float) -> dict[str, object]:
    return {
        "rank": rank, "n_voxels": int(volume_ml * 1000), "volume_ml": volume_ml, "centroid_mm": (1.0, -2.0, 3.5),
        "peak_mm": (1.5, -2.5, 4.0), "peak": 0.8, "mean": 0.3, "region_centroid": "Precentral_L",
        "region_majority": None, "atlas": "aal",
    }  # fmt: skip


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a fresh, empty database on the test server (dropped afterwards)."""
    pytest.importorskip("psycopg")
    with scratch_database(PG_URL) as url:
        yield url


def test_migrations_match_orm_and_reopen_is_idempotent(pg_url: str) -> None:
    store = st.open_store(pg_url)
    with store.engine.connect() as conn:
        assert st.current_revision(conn) == st.head_revision()
        diffs = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True, "include_object": compared}),
            st.Base.metadata,
        )
    assert diffs == []
    assert st.upgrade_schema(store.engine) is False
    store.close()
    st.open_store(pg_url).close()


def test_concurrent_first_opens_are_serialised(pg_url: str) -> None:
    """Several processes creating the schema of one new database at once all succeed."""
    code = "import sys; from anomaly.store import open_store; open_store(sys.argv[1]).close()"
    env = child_env()
    procs = [
        subprocess.Popen([sys.executable, "-c", code, pg_url], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], errors
    store = st.open_store(pg_url)
    with store.engine.connect() as conn:
        assert st.current_revision(conn) == st.head_revision()
    store.close()


def test_core_round_trip(pg_url: str) -> None:
    store = st.open_store(pg_url)
    with store.session() as s:
        model = st.get_or_create_model(s, "tiny-vae", sha("w"), {"channels": [32, 64]})
        assert st.get_or_create_model(s, "tiny-vae", sha("w"), {}).id == model.id
        cal = st.save_calibration(
            s, "healthy", model, "healthy-fpr", 0.3, target_fpr=0.01, metrics={"ci": [0.1, 0.2]}
        )
        cal2 = st.save_calibration(s, "healthy", model, "healthy-fpr", 0.35, metrics={"inf": float("inf")})
        assert (cal.version, cal2.version) == (1, 2)
        run = st.open_run(s, model, {"median": 3}, sha("s"), "/out", cal2)
        ids = {}
        for name, status, score, flagged in (
            ("a", "ok", 0.9, True),
            ("b", "ok", 0.2, False),
            ("c", "failed", None, None),
        ):
            scan = st.get_or_create_scan(
                s, sha(name), f"/d/{name}.nii.gz", name, shape=(4, 5, 6), spacing=(1, 1, 1)
            )
            result = st.upsert_result(
                s, run, scan, status=status, input_path=f"/d/{name}.nii.gz", score=score, flagged=flagged,
                error="bad file" if status == "failed" else None, details={"stages": {"decode": 0.5}},
                findings=[finding(1, 2.0), finding(2, 0.5)] if flagged else None,
            )  # fmt: skip
            ids[name] = result.id
        again = st.upsert_result(
            s, run, st.get_or_create_scan(s, sha("a"), "/d/a.nii.gz", "a"), status="ok",
            input_path="/d/a.nii.gz", score=0.95, flagged=True, findings=[finding(1, 3.0)], details={"v": 2},
        )  # fmt: skip
        assert again.id == ids["a"]
        st.add_review(s, ids["a"], "ann", "unsure")
        st.add_review(s, ids["a"], "bob", "confirmed finding", "clear")
        with pytest.raises(ValueError, match="unknown verdict"):
            st.add_review(s, ids["b"], "ann", "nope")
        st.finish_run(s, run)
        run_id = run.id
    store.close()

    store = st.open_store(pg_url)
    with store.session() as s:
        (summary,) = st.list_runs(s)
        assert (summary.n_results, summary.n_ok, summary.n_failed, summary.n_flagged, summary.n_reviewed) == (
            3,
            2,
            1,
            1,
            1,
        )
        assert summary.calibration == "healthy@2" and summary.finished
        assert st.get_calibration(s, "healthy").metrics == {"inf": None}  # type: ignore[union-attr]
        assert st.get_calibration(s, "healthy@1").metrics == {"ci": [0.1, 0.2]}  # type: ignore[union-attr]
        rows = st.run_results(s, run_id)
        assert [r.scan_name for r in rows] == ["a", "b", "c"]
        assert (rows[0].verdict, rows[0].reviewer, rows[0].n_findings, rows[0].score) == (
            "confirmed finding",
            "bob",
            1,
            0.95,
        )
        assert [r.scan_name for r in st.run_results(s, run_id, verdict="unreviewed")] == ["b", "c"]
        assert [r.scan_name for r in st.run_results(s, run_id, search="B")] == ["b"]
        assert [r.scan_name for r in st.run_results(s, run_id, order="score_asc")] == ["b", "a", "c"]
        assert st.neighbours(s, run_id, ids["b"]) == (ids["a"], ids["c"])
        assert st.review_progress(s, run_id) == (1, 2)
        detail = st.get_result_detail(s, ids["a"])
        assert detail is not None and detail.scan.shape == [4, 5, 6] and detail.out_dir == "/out"
        assert [f.volume_ml for f in detail.findings] == [3.0]
        assert (detail.findings[0].peak_x, detail.findings[0].centroid_z) == (1.5, 3.5)
        assert detail.result.details == {"v": 2}  # replaced by the second upsert
        assert detail.result.updated_at.tzinfo is not None
        assert detail.result.updated_at.utcoffset() == timezone.utc.utcoffset(None)
        table = st.results_table(s, run_id)
        assert [(r["path"], r["status"], r["calibration"]) for r in table][0] == (
            "/d/a.nii.gz",
            "ok",
            "healthy@2",
        )
        assert len(st.findings_table(s, run_id)) == 1 and len(st.reviews_table(s)) == 2
        s.execute(delete(st.Review))
        s.execute(
            delete(st.Result).where(st.Result.id == ids["a"])
        )  # findings go with it (ON DELETE CASCADE)
    with store.session() as s:
        assert s.scalars(select(st.Finding)).all() == []
    store.close()


_CALIBRATOR = """
import sys, time
import anomaly.store as st

store = st.open_store(sys.argv[1])
while time.time() < float(sys.argv[3]):
    pass
for i in range(15):
    with store.session() as s:
        model = st.get_or_create_model(s, "vae", "w" * 64, {})
        st.list_calibrations(s)
        st.save_calibration(s, "healthy", model, "manual", 0.1 + i, data={"by": sys.argv[2]})
store.close()
"""


def test_concurrent_calibrations_of_one_name_get_distinct_versions(pg_url: str) -> None:
    """Processes saving versions of one calibration at once never collide on a version number."""
    st.open_store(pg_url).close()
    start = time.time() + 4.0  # every process is connected and spinning before the first save
    env = child_env()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CALIBRATOR, pg_url, tag, str(start)], env=env, stderr=subprocess.PIPE, text=True
        )
        for tag in "abc"
    ]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], errors
    store = st.open_store(pg_url)
    with store.session() as s:
        saved = st.list_calibrations(s)
    store.close()
    assert [c.version for c in saved] == list(range(1, 46))
    assert sorted(c.data["by"] for c in saved) == sorted("abc" * 15)


SEARCH_NAMES = {  # name -> input path; "_" and "%" in a search are literal characters, not wildcards
    "Sub-01_T1w": "/data/in/Sub-01_T1w.nii.gz",
    "SUB-03xT1W": "/data/in/SUB-03xT1W.nii.gz",
    "sub-02%raw": "/data/in/sub-02%raw.nii.gz",
    "sub-04Xraw": "/data/in/sub-04Xraw.nii.gz",
    "plain": "/Other/Site_B/plain.nii.gz",
    **{f"scan{i:06d}": f"/data/in/scan{i:06d}.nii.gz" for i in range(300)},
}


def _fill_search_run(store: st.Store) -> int:
    from anomaly.store import bulk

    now = st.utcnow()
    with store.session() as s:
        model = st.get_or_create_model(s, "vae", sha("w"), {})
        run_id = st.open_run(s, model, {}, sha("s"), "/out").id
        scan_ids = bulk.add_scans(s, [{"content_hash": sha(n), "path": p, "name": n, "created_at": now}
                                      for n, p in SEARCH_NAMES.items()])
        bulk.add_results(s, run_id, [
            {"scan_id": scan_ids[sha(n)], "input_path": p, "status": "failed" if i % 7 == 3 else "ok",
             "score": None if i % 7 == 3 else (i * 37 % 101) / 100, "created_at": now, "updated_at": now}
            for i, (n, p) in enumerate(SEARCH_NAMES.items())])  # fmt: skip
        st.refresh_run(s, run_id)
        s.execute(text("ANALYZE results"))
    return run_id


SEARCHES = ("_t1w", "%RAW", "sub-0", "02%r", "SITE_b", "scan00029", "x", "T1W", "nothing here")


def _expected(query: str) -> set[str]:
    q = query.lower()
    return {n for n, p in SEARCH_NAMES.items() if q in n.lower() or q in p.lower()}


def test_search_indexes_serve_the_worklist_search(pg_url: str) -> None:
    """After the upgrade the trigram indexes exist, the search uses them, and it finds exactly the results
    whose name or input path holds the text (any case; % and _ literal), page by page and counted."""
    store = st.open_store(pg_url)
    run_id = _fill_search_run(store)
    with store.engine.connect() as conn:
        defs = dict(conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'results'")).all())
    for name, column in zip(SEARCH_INDEXES, ("scan_name", "input_path"), strict=True):
        assert "USING gin" in defs[name] and f"{column} gin_trgm_ops" in defs[name], defs.get(name)
    assert _expected("_t1w") == {"Sub-01_T1w"} and _expected("%RAW") == {"sub-02%raw"}
    with store.session() as s:
        for query in SEARCHES:
            rows = st.run_results(s, run_id, search=query)
            assert {r.scan_name for r in rows} == _expected(query), query
            assert st.count_results(s, run_id, search=query) == len(rows)
            walked, start = [], None
            while True:
                page = st.result_page(s, run_id, search=query, start=start, size=4)
                walked += [r.result_id for r in page.rows]
                if (start := page.next_start) is None:
                    break
            assert walked == [r.result_id for r in rows], query
    statements: list[tuple[str, Any]] = []

    def grab(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        statements.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", grab)
    with store.session() as s:
        assert st.count_results(s, run_id, search="sub-02%raw", most=1000) == 1
    event.remove(store.engine, "before_cursor_execute", grab)
    with store.engine.connect() as conn:
        # a small table is best read whole, so leave the planner nothing else: without the run's b-tree
        # indexes and with sequential and plain index scans off, the statement can only use indexes that
        # serve its search condition (else the planner falls back to the disabled sequential scan)
        for name in [n for n in defs if n.startswith("ix_results_run_id_")]:
            conn.execute(text(f"DROP INDEX {name}"))
        conn.execute(text("ALTER TABLE results DROP CONSTRAINT uq_results_run_id_scan_id"))
        conn.execute(text("SET LOCAL enable_seqscan = off"))
        conn.execute(text("SET LOCAL enable_indexscan = off"))
        plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + statements[0][0], statements[0][1]).scalars())
        conn.rollback()
    assert "ix_results_scan_name_trgm" in plan and "ix_results_input_path_trgm" in plan, plan
    store.close()


def test_upgrade_goes_on_without_pg_trgm_when_it_cannot_be_created(pg_url: str, caplog: Any) -> None:
    """A user who may not create extensions still gets the whole schema; search works without the indexes."""
    role = f"limited_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            try:
                conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
            except DBAPIError:
                pytest.skip("the test server does not let this user create roles")
            conn.execute(text(f'GRANT CREATE, USAGE ON SCHEMA public TO "{role}"'))
            conn.execute(text(f'REVOKE CREATE ON DATABASE "{make_url(pg_url).database}" FROM PUBLIC'))
        url = make_url(pg_url).set(username=role).render_as_string(hide_password=False)
        with caplog.at_level(logging.WARNING, logger="anomaly.store"):
            store = st.open_store(url)
        assert "worklist search indexes not created" in caplog.text and "pg_trgm" in caplog.text
        with store.engine.connect() as conn:
            assert st.current_revision(conn) == st.head_revision()
            names = set(conn.execute(text("SELECT indexname FROM pg_indexes WHERE tablename = 'results'")).scalars())
            assert not names & set(SEARCH_INDEXES) and "ix_results_run_id_score_id" in names
        run_id = _fill_search_run(store)
        with store.session() as s:
            assert {r.scan_name for r in st.run_results(s, run_id, search="%RAW")} == {"sub-02%raw"}
        store.close()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP OWNED BY "{role}"'))
            conn.execute(text(f'DROP ROLE IF EXISTS "{role}"'))
        admin.dispose()
