"""Flat tables of results, findings and reviews for CSV export (plain dicts, stable column order)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, String, and_, cast, func, select
from sqlalchemy.orm import Session

from anomaly.store.queries import finding_count_subquery, latest_review_subquery
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


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _rows(s: Session, stmt: Select, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    return [dict(zip(columns, map(_plain, row), strict=True)) for row in s.execute(stmt)]


def _calibration_ref() -> Any:
    return Calibration.name + "@" + cast(Calibration.version, String)


def results_table(s: Session, run_id: int | None = None) -> list[dict[str, Any]]:
    """One row per result (of one run or all), in ``RESULT_COLUMNS`` order."""
    latest, counts = latest_review_subquery(run_id), finding_count_subquery(run_id)
    stmt = (
        select(
            Result.input_path,
            Scan.content_hash,
            Result.status,
            Result.score,
            Result.map_path,
            Result.error,
            Result.flagged,
            Result.mask_path,
            Result.recon_path,
            Result.timing_s,
            func.coalesce(counts.c.n_findings, 0),
            latest.c.verdict,
            latest.c.reviewer,
            Scan.name,
            _calibration_ref(),
            Model.name,
            Result.run_id,
            Result.id,
            Result.updated_at,
        )  # fmt: skip
        .join(Scan, Scan.id == Result.scan_id)
        .join(Run, Run.id == Result.run_id)
        .join(Model, Model.id == Run.model_id)
        .outerjoin(Calibration, Calibration.id == Run.calibration_id)
        .outerjoin(latest, and_(latest.c.result_id == Result.id, latest.c.rn == 1))
        .outerjoin(counts, counts.c.result_id == Result.id)
        .order_by(Result.run_id, Result.id)
    )
    if run_id is not None:
        stmt = stmt.where(Result.run_id == run_id)
    return _rows(s, stmt, RESULT_COLUMNS)


def findings_table(s: Session, run_id: int | None = None) -> list[dict[str, Any]]:
    """One row per finding (of one run or all), in ``FINDING_COLUMNS`` order."""
    stmt = (
        select(
            Result.run_id,
            Result.id,
            Scan.content_hash,
            Result.input_path,
            Scan.name,
            Finding.rank,
            Finding.n_voxels,
            Finding.volume_ml,
            Finding.centroid_x,
            Finding.centroid_y,
            Finding.centroid_z,
            Finding.peak_x,
            Finding.peak_y,
            Finding.peak_z,
            Finding.peak,
            Finding.mean,
            Finding.region_centroid,
            Finding.region_majority,
            Finding.atlas,
        )  # fmt: skip
        .join(Result, Result.id == Finding.result_id)
        .join(Scan, Scan.id == Result.scan_id)
        .order_by(Result.run_id, Result.id, Finding.rank)
    )
    if run_id is not None:
        stmt = stmt.where(Result.run_id == run_id)
    return _rows(s, stmt, FINDING_COLUMNS)


def reviews_table(s: Session, run_id: int | None = None) -> list[dict[str, Any]]:
    """One row per review (of one run or all), in ``REVIEW_COLUMNS`` order."""
    stmt = (
        select(
            Result.run_id,
            Result.id,
            Scan.content_hash,
            Result.input_path,
            Scan.name,
            Result.score,
            Result.flagged,
            Review.reviewer,
            Review.verdict,
            Review.note,
            Review.created_at,
        )  # fmt: skip
        .join(Result, Result.id == Review.result_id)
        .join(Scan, Scan.id == Result.scan_id)
        .order_by(Result.run_id, Result.id, Review.created_at, Review.id)
    )
    if run_id is not None:
        stmt = stmt.where(Result.run_id == run_id)
    return _rows(s, stmt, REVIEW_COLUMNS)
