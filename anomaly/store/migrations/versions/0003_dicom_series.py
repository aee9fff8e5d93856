"""Where a scan came from: DICOM study and series identity, description, acquisition date, a salted
patient hash, and the source's acquisition facts (sequence, TR/TE/TI, BIDS entities) as JSON.

Revision ID: 0003_dicom
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_dicom"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the source columns to ``scans`` (all nullable: NIfTI files have no UIDs)."""
    with op.batch_alter_table("scans") as batch:
        batch.add_column(sa.Column("source", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("study_uid", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("series_uid", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("series_description", sa.String(length=255), nullable=True))
        batch.add_column(sa.Column("acquisition_date", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("patient_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("source_meta", sa.JSON(), nullable=True))
        batch.create_index(batch.f("ix_scans_series_uid"), ["series_uid"])
        batch.create_index(batch.f("ix_scans_study_uid"), ["study_uid"])


def downgrade() -> None:
    """Drop the source columns."""
    with op.batch_alter_table("scans") as batch:
        batch.drop_index(batch.f("ix_scans_study_uid"))
        batch.drop_index(batch.f("ix_scans_series_uid"))
        for column in ("source_meta", "patient_hash", "acquisition_date", "series_description", "series_uid",
                       "study_uid", "source"):
            batch.drop_column(column)
