"""Adding many records at once (executemany batches, on PostgreSQL multi-row INSERTs): importing the
results of another system, or filling a database for a benchmark. Rows go in as given (validated by the
database's constraints only); :func:`anomaly.store.writes.refresh_run` then builds the copies and counts
that the write API keeps up to date one result at a time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from anomaly.store.dialect import record_id
from anomaly.store.schema import Finding, Result, Review, Run, Scan

_CHUNK = 500


def add_scans(s: Session, rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Insert scans (``content_hash``, ``path``, ``name``, ``created_at``, ...); returns their ids by hash."""
    if rows:
        s.execute(insert(Scan), list(rows))
    hashes = [str(r["content_hash"]) for r in rows]
    ids: dict[str, int] = {}
    for start in range(0, len(hashes), _CHUNK):
        chunk = hashes[start : start + _CHUNK]
        ids.update(s.execute(select(Scan.content_hash, Scan.id).where(Scan.content_hash.in_(chunk))).all())
    return ids


def add_results(s: Session, run: Run | int, rows: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Insert results of ``run`` (``scan_id``, ``status``, ``input_path``, ``created_at``, ``updated_at``, ...);
    returns their ids by scan id."""
    run_id = record_id(run, "run")
    if rows:
        s.execute(insert(Result), [{"details": {}, **r, "run_id": run_id} for r in rows])
    scan_ids = [int(r["scan_id"]) for r in rows]
    ids: dict[int, int] = {}
    for start in range(0, len(scan_ids), _CHUNK):
        chunk = scan_ids[start : start + _CHUNK]
        ids.update(s.execute(select(Result.scan_id, Result.id).where(Result.run_id == run_id,
                                                                     Result.scan_id.in_(chunk))).all())
    return ids


def add_findings(s: Session, rows: Iterable[Mapping[str, Any]]) -> None:
    """Insert findings (``result_id`` and the columns of :class:`anomaly.store.schema.Finding`)."""
    values = list(rows)
    if values:
        s.execute(insert(Finding), values)


def add_reviews(s: Session, rows: Iterable[Mapping[str, Any]]) -> None:
    """Insert reviews (``result_id``, ``reviewer``, ``verdict``, ``note``, ``created_at``)."""
    values = list(rows)
    if values:
        s.execute(insert(Review), values)
