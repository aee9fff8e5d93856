"""Worklist search on an index (PostgreSQL): trigram GIN indexes on the scan name and input path of
``results``, which serve the search's ``ILIKE '%text%'`` so that it reads only the matching results.

PostgreSQL only (SQLite: nothing to do). The indexes need the ``pg_trgm`` extension (shipped with
PostgreSQL, trusted: a database owner may create it); where it cannot be created the upgrade goes on
without the indexes and logs a warning (search then works as before, reading the run's results).
``fastupdate = off``: a search never reads a list of pending entries; results are written one scan at a
time, so the dearer insert does not matter.

Revision ID: 0005_search
Revises: 0004_scale
Create Date: 2026-11-29
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from alembic import op
from sqlalchemy.exc import DBAPIError

revision: str = "0005_search"
down_revision: str | Sequence[str] | None = "0004_scale"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# the columns the search compares (``Filters.search``: ILIKE on the plain columns), by index name
SEARCH_INDEXES = {"ix_results_scan_name_trgm": "scan_name", "ix_results_input_path_trgm": "input_path"}

log = logging.getLogger("anomaly.store")


def upgrade() -> None:
    """Create pg_trgm (if missing) and the indexes in a savepoint; on failure warn and go on without them."""
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    statements = ["CREATE EXTENSION IF NOT EXISTS pg_trgm"] + [
        f"CREATE INDEX IF NOT EXISTS {name} ON results USING gin ({column} gin_trgm_ops) WITH (fastupdate = off)"
        for name, column in SEARCH_INDEXES.items()
    ]
    try:
        with conn.begin_nested():  # a failure rolls back to here, not the whole upgrade
            for statement in statements:
                op.execute(statement)
    except DBAPIError as exc:
        reason = " ".join(str(getattr(exc, "orig", exc)).split())
        log.warning("worklist search indexes not created (%s); search works but reads a run's results. "
                    "To add them, have a database owner run: %s", reason, "; ".join(statements))


def downgrade() -> None:
    """Drop the indexes (the extension stays: other schemas may use it)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in SEARCH_INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
