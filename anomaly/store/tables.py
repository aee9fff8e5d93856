"""Flat tables of results, findings and reviews for CSV export (plain dicts, stable column order).

``iter_*`` stream the rows in batches (memory stays bounded at any size, on PostgreSQL through a
server-side cursor); ``*_table`` return lists (``limit`` rows at most when given).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, Select, String, cast, select
from sqlalchemy.orm import Session

from anomaly.store.schema import Calibration, Finding, Model, Result, Review, Run, Scan

RESULT_COLUMNS: tuple[str, ...] = (
    "path", "scan_id", "status", "score", "map_path", "error", "flagged", "mask_path", "recon_path",
    "timing_s", "n_findings", "verdict", "reviewer", "name", "calibration", "model", "run_id", "result_id",
    "updated_at",
)  # fmt: skip
"""Columns of ``results_table``; ``scan_id`` is the scan's content hash, ``path`` the input path."""

FINDING_COLUMNS: tuple[str, ...] = (
    "run_id", "result_id", "scan_id", "path", "name", "rank", "n_voxels", "volume_ml",
    "centroid_x", "centroid_y", "centroid_z", "peak_x", "peak_y", "peak_z", "peak", "mean",
    "region_centroid", "region_majority", "atlas",
)  # fmt: skip
"""Columns of ``findings_table`` (coordinates in world mm)."""

REVIEW_COLUMNS: tuple[str, ...] = (
    "run_id", "result_id", "scan_id", "path", "name", "score", "flagged", "reviewer", "verdict", "note",
    "created_at",
)  # fmt: skip
"""Columns of ``reviews_table`` (every review, oldest first per result)."""

BATCH = 1000
"""Rows fetched at a time while streaming."""


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _stream(s: Session, stmt: Select, columns: tuple[str, ...], limit: int | None) -> Iterator[dict[str, Any]]:
    if limit is not None:
        stmt = stmt.limit(limit)
    labelled = stmt.execution_options(yield_per=BATCH)
    for row in s.execute(labelled):
        values = row._mapping
        yield {name: _plain(values[name]) for name in columns}


def _results_select(run_id: int | None) -> Select:
    stmt = (
        select(
            Result.input_path.label("path"), Scan.content_hash.label("scan_id"), Result.status.label("status"),
            Result.score.label("score"), Result.map_path.label("map_path"), Result.error.label("error"),
            Result.flagged.label("flagged"), Result.mask_path.label("mask_path"),
            Result.recon_path.label("recon_path"), Result.timing_s.label("timing_s"),
            cast(Result.n_findings, Integer).label("n_findings"), Result.verdict.label("verdict"),
            Result.reviewer.label("reviewer"), Scan.name.label("name"),
            (Calibration.name + "@" + cast(Calibration.version, String)).label("calibration"),
            Model.name.label("model"), Result.run_id.label("run_id"), Result.id.label("result_id"),
            Result.updated_at.label("updated_at"),
        )  # fmt: skip
        .join(Scan, Scan.id == Result.scan_id)
        .join(Run, Run.id == Result.run_id)
        .join(Model, Model.id == Run.model_id)
        .outerjoin(Calibration, Calibration.id == Run.calibration_id)
        .order_by(Result.run_id, Result.id)
    )
    return stmt if run_id is None else stmt.where(Result.run_id == run_id)


def _findings_select(run_id: int | None) -> Select:
    stmt = (
        select(
            Result.run_id.label("run_id"), Result.id.label("result_id"), Scan.content_hash.label("scan_id"),
            Result.input_path.label("path"), Scan.name.label("name"),
            *(getattr(Finding, name).label(name) for name in FINDING_COLUMNS[5:]),
        )
        .join(Result, Result.id == Finding.result_id)
        .join(Scan, Scan.id == Result.scan_id)
        .order_by(Result.run_id, Result.id, Finding.rank)
    )
    return stmt if run_id is None else stmt.where(Result.run_id == run_id)


def _reviews_select(run_id: int | None) -> Select:
    stmt = (
        select(
            Result.run_id.label("run_id"), Result.id.label("result_id"), Scan.content_hash.label("scan_id"),
            Result.input_path.label("path"), Scan.name.label("name"), Result.score.label("score"),
            Result.flagged.label("flagged"), Review.reviewer.label("reviewer"), Review.verdict.label("verdict"),
            Review.note.label("note"), Review.created_at.label("created_at"),
        )  # fmt: skip
        .join(Result, Result.id == Review.result_id)
        .join(Scan, Scan.id == Result.scan_id)
    )
    return stmt if run_id is None else stmt.where(Result.run_id == run_id)


REVIEW_WINDOW = 500
"""Reviews looked at per statement while walking back from the newest (``iter_reviews_table`` with a limit)."""


def _newest_reviews(s: Session, run_id: int | None, limit: int) -> Iterator[dict[str, Any]]:
    """The ``limit`` newest reviews (of one run or all), newest first: each statement takes the next
    ``REVIEW_WINDOW`` review ids back from the newest and keeps those of the run, so it reads that window
    and never the run's results (left to itself, a planner may walk the run's results to find a few reviews)."""
    before: int | None = None
    while limit > 0:
        window = select(Review.id, Review.result_id).order_by(Review.id.desc()).limit(REVIEW_WINDOW)
        if before is not None:
            window = window.where(Review.id < before)
        pairs = s.execute(window).all()
        if not pairs:
            return
        ids = [review for review, _ in pairs]
        # both id lists: each side is looked up by its primary key, whatever the planner thinks of the run
        stmt = (_reviews_select(run_id).where(Review.id.in_(ids), Result.id.in_({result for _, result in pairs}))
                .order_by(Review.id.desc()).limit(limit))
        for row in _stream(s, stmt, REVIEW_COLUMNS, None):
            limit -= 1
            yield row
        if len(ids) < REVIEW_WINDOW:
            return
        before = ids[-1]


def iter_results_table(s: Session, run_id: int | None = None, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """One row per result (of one run or all), in ``RESULT_COLUMNS`` order, streamed."""
    return _stream(s, _results_select(run_id), RESULT_COLUMNS, limit)


def iter_findings_table(s: Session, run_id: int | None = None, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """One row per finding (of one run or all), in ``FINDING_COLUMNS`` order, streamed."""
    return _stream(s, _findings_select(run_id), FINDING_COLUMNS, limit)


def iter_reviews_table(s: Session, run_id: int | None = None, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """One row per review (of one run or all), in ``REVIEW_COLUMNS`` order, streamed; with ``limit``, the
    newest reviews (walked from the newest review back, so a preview never walks a run's results)."""
    if limit is not None:
        return _newest_reviews(s, run_id, limit)
    stmt = _reviews_select(run_id).order_by(Result.run_id, Result.id, Review.created_at, Review.id)
    return _stream(s, stmt, REVIEW_COLUMNS, None)


def results_table(s: Session, run_id: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per result (of one run or all), in ``RESULT_COLUMNS`` order."""
    return list(iter_results_table(s, run_id, limit))


def findings_table(s: Session, run_id: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per finding (of one run or all), in ``FINDING_COLUMNS`` order."""
    return list(iter_findings_table(s, run_id, limit))


def reviews_table(s: Session, run_id: int | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """One row per review (of one run or all), in ``REVIEW_COLUMNS`` order."""
    return list(iter_reviews_table(s, run_id, limit))
