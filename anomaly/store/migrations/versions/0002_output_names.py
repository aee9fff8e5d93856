"""Output names claimed per (run, scan), so no two scans or runs write the same map file.

Existing results are backfilled: each map file is claimed by the result that wrote it last (the most
recently updated one); older results that pointed at the same file are scored again when their run
is repeated, under a new name.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_MAP_SUFFIX = "_anomaly.nii.gz"


def _key(out_dir: str, stem: str) -> str:
    return hashlib.sha256(f"{out_dir}\0{stem.casefold()}".encode("utf-8", "surrogatepass")).hexdigest()


def upgrade() -> None:
    """Create ``output_names`` and claim the names of the maps already recorded."""
    op.create_table(
        "output_names",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("out_dir", sa.String(), nullable=False),
        sa.Column("stem", sa.String(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("scan_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_output_names_run_id_runs")),
        sa.ForeignKeyConstraint(["scan_id"], ["scans.id"], name=op.f("fk_output_names_scan_id_scans")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_output_names")),
        sa.UniqueConstraint("key", name=op.f("uq_output_names_key")),
        sa.UniqueConstraint("run_id", "scan_id", name=op.f("uq_output_names_run_id_scan_id")),
    )
    op.create_index(op.f("ix_output_names_scan_id"), "output_names", ["scan_id"])
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT run_id, scan_id, map_path FROM results WHERE map_path IS NOT NULL "
            "ORDER BY updated_at DESC, id DESC"
        )
    ).fetchall()
    table = sa.table(
        "output_names",
        sa.column("key", sa.String), sa.column("out_dir", sa.String), sa.column("stem", sa.String),
        sa.column("run_id", sa.Integer), sa.column("scan_id", sa.Integer),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )  # fmt: skip
    now = datetime.now(timezone.utc)
    if bind.dialect.name == "sqlite":
        now = now.replace(tzinfo=None)
    taken: set[str] = set()
    claimed: set[tuple[int, int]] = set()
    values = []
    for run_id, scan_id, map_path in rows:
        name = os.path.basename(map_path)
        if not name.endswith(_MAP_SUFFIX) or (run_id, scan_id) in claimed:
            continue
        out_dir, stem = os.path.dirname(map_path), name[: -len(_MAP_SUFFIX)]
        key = _key(out_dir, stem)
        if key in taken:
            continue
        taken.add(key)
        claimed.add((run_id, scan_id))
        values.append({"key": key, "out_dir": out_dir, "stem": stem, "run_id": run_id, "scan_id": scan_id,
                       "created_at": now})
    if values:
        op.bulk_insert(table, values)


def downgrade() -> None:
    """Drop the claims (maps stay where they are)."""
    op.drop_index(op.f("ix_output_names_scan_id"), table_name="output_names")
    op.drop_table("output_names")
