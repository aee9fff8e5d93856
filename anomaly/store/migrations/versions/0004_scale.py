"""Listings that read only what they show: copies on ``results`` (scan name, number of findings, the latest
review) and counts on ``runs`` kept up to date on write, and one index per worklist order and filter.

Existing rows are backfilled with set statements (no row-by-row work), so a large database migrates in
seconds.

Revision ID: 0004_scale
Revises: 0003_dicom
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_scale"
down_revision: str | Sequence[str] | None = "0003_dicom"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RESULT_INDEXES: tuple[tuple[str, ...], ...] = (
    ("run_id", "id"),
    ("run_id", "scan_name", "id"),
    ("run_id", "updated_at", "id"),
    ("run_id", "timing_s", "id"),
    ("run_id", "status", "score"),
    ("run_id", "flagged", "score"),
    ("run_id", "verdict", "score"),
    ("run_id", "reviewer", "score"),
)
RUN_COUNTS = ("n_flagged", "n_reviewed", "n_findings", "n_reviews", "n_timed", "version")

BACKFILL = (
    "UPDATE results SET scan_name = (SELECT scans.name FROM scans WHERE scans.id = results.scan_id)",
    "UPDATE results SET n_findings = (SELECT count(*) FROM findings WHERE findings.result_id = results.id)",
    # the latest review: newest created_at, then the highest id
    "UPDATE results SET review_id = (SELECT r.id FROM reviews r WHERE r.result_id = results.id "
    "ORDER BY r.created_at DESC, r.id DESC LIMIT 1)",
    "UPDATE results SET verdict = (SELECT r.verdict FROM reviews r WHERE r.id = results.review_id), "
    "reviewer = (SELECT r.reviewer FROM reviews r WHERE r.id = results.review_id), "
    "reviewed_at = (SELECT r.created_at FROM reviews r WHERE r.id = results.review_id) "
    "WHERE review_id IS NOT NULL",
)


def upgrade() -> None:
    """Add the copied columns and run counts, fill them from the existing rows, create the indexes."""
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("scan_name", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("n_findings", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("verdict", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("reviewer", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("review_id", sa.Integer(), nullable=True))
    with op.batch_alter_table("runs") as batch:
        for name in RUN_COUNTS:
            batch.add_column(sa.Column(name, sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("timing_total_s", sa.Float(), server_default="0", nullable=False))
    for statement in BACKFILL:
        op.execute(statement)
    op.execute(
        "UPDATE runs SET "
        "n_scored = (SELECT count(*) FROM results WHERE results.run_id = runs.id AND status = 'ok'), "
        "n_failed = (SELECT count(*) FROM results WHERE results.run_id = runs.id AND status = 'failed'), "
        "n_flagged = (SELECT count(*) FROM results WHERE results.run_id = runs.id AND flagged), "
        "n_reviewed = (SELECT count(*) FROM results WHERE results.run_id = runs.id AND status = 'ok' "
        "AND verdict IS NOT NULL), "
        "n_findings = (SELECT coalesce(sum(n_findings), 0) FROM results WHERE results.run_id = runs.id), "
        "n_reviews = (SELECT count(*) FROM reviews JOIN results ON results.id = reviews.result_id "
        "WHERE results.run_id = runs.id), "
        "n_timed = (SELECT count(timing_s) FROM results WHERE results.run_id = runs.id), "
        "timing_total_s = (SELECT coalesce(sum(timing_s), 0) FROM results WHERE results.run_id = runs.id)"
    )
    for columns in RESULT_INDEXES:
        op.create_index(op.f("ix_results_" + "_".join(columns)), "results", list(columns))


def downgrade() -> None:
    """Drop the indexes, the copied columns and the run counts."""
    for columns in RESULT_INDEXES:
        op.drop_index(op.f("ix_results_" + "_".join(columns)), table_name="results")
    with op.batch_alter_table("runs") as batch:
        for name in (*RUN_COUNTS, "timing_total_s"):
            batch.drop_column(name)
    with op.batch_alter_table("results") as batch:
        for name in ("review_id", "reviewed_at", "reviewer", "verdict", "n_findings", "scan_name"):
            batch.drop_column(name)
