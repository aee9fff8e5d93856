"""Initial schema: scans, models, calibrations, runs, results, findings, reviews.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create all tables and their indexes."""
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("weights_hash", sa.String(length=128), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", "weights_hash", name=op.f("uq_models_name_weights_hash")),
    )
    op.create_table(
        "scans",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=True),
        sa.Column("spacing", sa.JSON(), nullable=True),
        sa.Column("orientation", sa.String(length=16), nullable=True),
        sa.Column("dtype", sa.String(length=32), nullable=True),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_scans")),
        sa.UniqueConstraint("content_hash", name=op.f("uq_scans_content_hash")),
    )
    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("voxel_threshold", sa.Float(), nullable=False),
        sa.Column("scan_threshold", sa.Float(), nullable=True),
        sa.Column("target_fpr", sa.Float(), nullable=True),
        sa.Column("settings_hash", sa.String(length=64), nullable=True),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_calibrations_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibrations")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_calibrations_name_version")),
    )
    op.create_index(op.f("ix_calibrations_model_id"), "calibrations", ["model_id"])
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("settings_hash", sa.String(length=64), nullable=False),
        sa.Column("out_dir", sa.String(), nullable=False),
        sa.Column("calibration_id", sa.Integer(), nullable=True),
        _timestamp("started_at"),
        _timestamp("finished_at", nullable=True),
        sa.Column("n_scored", sa.Integer(), nullable=False),
        sa.Column("n_failed", sa.Integer(), nullable=False),
        sa.Column("n_skipped", sa.Integer(), nullable=False),
        sa.Column("executor", sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(
            ["calibration_id"], ["calibrations.id"], name=op.f("fk_runs_calibration_id_calibrations")
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_runs_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_calibration_id"), "runs", ["calibration_id"])
    op.create_index(op.f("ix_runs_model_id_settings_hash"), "runs", ["model_id", "settings_hash"])
    op.create_table(
        "results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("scan_id", sa.Integer(), nullable=False),
        sa.Column("input_path", sa.String(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=True),
        sa.Column("map_path", sa.String(), nullable=True),
        sa.Column("recon_path", sa.String(), nullable=True),
        sa.Column("mask_path", sa.String(), nullable=True),
        sa.Column("timing_s", sa.Float(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name=op.f("fk_results_run_id_runs")),
        sa.ForeignKeyConstraint(["scan_id"], ["scans.id"], name=op.f("fk_results_scan_id_scans")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_results")),
        sa.UniqueConstraint("run_id", "scan_id", name=op.f("uq_results_run_id_scan_id")),
    )
    op.create_index(op.f("ix_results_run_id_score"), "results", ["run_id", "score"])
    op.create_index(op.f("ix_results_scan_id"), "results", ["scan_id"])
    op.create_table(
        "findings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("n_voxels", sa.Integer(), nullable=False),
        sa.Column("volume_ml", sa.Float(), nullable=False),
        sa.Column("centroid_x", sa.Float(), nullable=False),
        sa.Column("centroid_y", sa.Float(), nullable=False),
        sa.Column("centroid_z", sa.Float(), nullable=False),
        sa.Column("peak_x", sa.Float(), nullable=False),
        sa.Column("peak_y", sa.Float(), nullable=False),
        sa.Column("peak_z", sa.Float(), nullable=False),
        sa.Column("peak", sa.Float(), nullable=False),
        sa.Column("mean", sa.Float(), nullable=False),
        sa.Column("region_centroid", sa.String(length=255), nullable=True),
        sa.Column("region_majority", sa.String(length=255), nullable=True),
        sa.Column("atlas", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["result_id"], ["results.id"], name=op.f("fk_findings_result_id_results"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
    )
    op.create_index(op.f("ix_findings_result_id"), "findings", ["result_id"])
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.String(length=255), nullable=False),
        sa.Column("verdict", sa.String(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], name=op.f("fk_reviews_result_id_results")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
    )
    op.create_index(op.f("ix_reviews_result_id_created_at"), "reviews", ["result_id", "created_at"])


def downgrade() -> None:
    """Drop all tables (children first)."""
    for table in ("reviews", "findings", "results", "runs", "calibrations", "scans", "models"):
        op.drop_table(table)
