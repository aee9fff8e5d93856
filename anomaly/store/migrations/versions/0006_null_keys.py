"""Failed scans in key order: the score-led worklist indexes end with the result id, so that the rows without
a score (failed scans, listed after the others in id order) come out of the index already ordered.

Without the id, PostgreSQL read and sorted every failed scan of a run to show the first page of them (the
Worklist's failed-scans panel read 2,000 rows of a 100,000-scan run to show 21). SQLite's indexes end
with the row id anyway; the same indexes there keep one schema for both.

Revision ID: 0006_null_keys
Revises: 0005_search
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006_null_keys"
down_revision: str | Sequence[str] | None = "0005_search"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCORE_LED: tuple[tuple[str, ...], ...] = (
    ("run_id", "score"),
    ("run_id", "status", "score"),
    ("run_id", "flagged", "score"),
    ("run_id", "verdict", "score"),
    ("run_id", "reviewer", "score"),
)


def _name(columns: tuple[str, ...]) -> str:
    return "ix_results_" + "_".join(columns)


def upgrade() -> None:
    """Create each index with the id appended, then drop the one it replaces."""
    for columns in SCORE_LED:
        op.create_index(op.f(_name((*columns, "id"))), "results", [*columns, "id"])
        op.drop_index(op.f(_name(columns)), table_name="results")


def downgrade() -> None:
    """The indexes without the id again."""
    for columns in SCORE_LED:
        op.create_index(op.f(_name(columns)), "results", list(columns))
        op.drop_index(op.f(_name((*columns, "id"))), table_name="results")
