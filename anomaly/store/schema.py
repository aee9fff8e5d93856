"""ORM models of the result store: scans, models, calibrations, runs, results, findings, reviews.

The Alembic migrations in ``anomaly/store/migrations`` create exactly this schema (plus, on PostgreSQL,
the optional search indexes of ``SEARCH_INDEXES``); a test checks that the two agree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

VERDICTS: tuple[str, ...] = ("confirmed finding", "false positive", "artefact", "normal", "unsure")
"""Allowed review verdicts; the latest review of a result is its current verdict."""

RESULT_STATUSES: tuple[str, ...] = ("ok", "failed")
"""Allowed values of ``Result.status``."""

CALIBRATION_METHODS: tuple[str, ...] = ("healthy-fpr", "labelled-dice", "manual")
"""Allowed values of ``Calibration.method``."""

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


SEARCH_INDEXES: tuple[str, ...] = ("ix_results_scan_name_trgm", "ix_results_input_path_trgm")
"""Trigram (pg_trgm GIN) indexes serving the worklist's substring search on PostgreSQL (migration
0005_search). Not modelled here: they exist only on PostgreSQL and only where pg_trgm could be created."""


def compared(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic ``include_object`` hook: compare everything but the optional ``SEARCH_INDEXES``."""
    return not (type_ == "index" and reflected and name in SEARCH_INDEXES)


def utcnow() -> datetime:
    """Current time as a timezone-aware UTC datetime."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamp on every backend (SQLite drops the zone, so it is restored on load)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC; SQLite stores it without the zone."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value!r} has no time zone; pass a timezone-aware UTC datetime")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach (or convert to) UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention so migrations are deterministic."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Scan(Base):
    """One input volume, identified by the SHA-256 of its file content (of its files, for a DICOM series)."""

    __tablename__ = "scans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String)
    name: Mapped[str] = mapped_column(String(255))
    shape: Mapped[list[Any] | None] = mapped_column(JSON)
    spacing: Mapped[list[Any] | None] = mapped_column(JSON)
    orientation: Mapped[str | None] = mapped_column(String(16))
    dtype: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # where the scan came from (migration 0003_dicom): nifti, dicom or bids; DICOM identity; never a
    # patient name or ID, only their salted hash
    source: Mapped[str | None] = mapped_column(String(16))
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_description: Mapped[str | None] = mapped_column(String(255))
    acquisition_date: Mapped[str | None] = mapped_column(String(32))
    patient_hash: Mapped[str | None] = mapped_column(String(64))
    source_meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    results: Mapped[list[Result]] = relationship(back_populates="scan")

    def __repr__(self) -> str:
        return f"Scan(id={self.id}, name={self.name!r}, content_hash={self.content_hash[:12]!r}...)"


class Model(Base):
    """A reconstructor as used for scoring: name, hash of its weights and its configuration."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "weights_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    weights_hash: Mapped[str] = mapped_column(String(128))
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    runs: Mapped[list[Run]] = relationship(back_populates="model")
    calibrations: Mapped[list[Calibration]] = relationship(back_populates="model")

    def __repr__(self) -> str:
        return f"Model(id={self.id}, name={self.name!r}, weights_hash={self.weights_hash[:12]!r})"


class Calibration(Base):
    """Versioned thresholds of a model (voxel and scan level) with the data and metrics behind them."""

    __tablename__ = "calibrations"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    version: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), index=True)
    method: Mapped[str] = mapped_column(String(32))
    voxel_threshold: Mapped[float] = mapped_column(Float)
    scan_threshold: Mapped[float | None] = mapped_column(Float)
    target_fpr: Mapped[float | None] = mapped_column(Float)
    settings_hash: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[Model] = relationship(back_populates="calibrations")

    @property
    def ref(self) -> str:
        """``name@version``, the form accepted by ``get_calibration`` and the command line."""
        return f"{self.name}@{self.version}"

    def __repr__(self) -> str:
        return f"Calibration(id={self.id}, ref={self.ref!r}, method={self.method!r})"


class Run(Base):
    """One batch of scoring with fixed model, settings, output folder and calibration."""

    __tablename__ = "runs"
    __table_args__ = (Index(None, "model_id", "settings_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    settings_hash: Mapped[str] = mapped_column(String(64))
    out_dir: Mapped[str] = mapped_column(String)
    calibration_id: Mapped[int | None] = mapped_column(ForeignKey("calibrations.id"), index=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column()
    n_scored: Mapped[int] = mapped_column(Integer, default=0)
    n_failed: Mapped[int] = mapped_column(Integer, default=0)
    n_skipped: Mapped[int] = mapped_column(Integer, default=0)
    executor: Mapped[str] = mapped_column(String(32), default="local")
    # counts kept up to date on every write (migration 0004_scale), so that no page counts a whole run;
    # n_scored and n_failed are the ok and failed results, n_reviewed the ok results with a verdict
    n_flagged: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_reviewed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_findings: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_reviews: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    n_timed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    timing_total_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Bumped by every write to the run's results or reviews: what caches of the run are keyed by."""

    model: Mapped[Model] = relationship(back_populates="runs")
    calibration: Mapped[Calibration | None] = relationship()
    results: Mapped[list[Result]] = relationship(back_populates="run")

    def __repr__(self) -> str:
        return f"Run(id={self.id}, model_id={self.model_id}, out_dir={self.out_dir!r})"


class Result(Base):
    """The outcome of scoring one scan in one run: status, score, map paths, timing and findings."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("run_id", "scan_id"),
        # one index per order and per filter the worklist offers (migration 0004_scale), each ending with the
        # id so that ties (and the NULL keys of failed scans) come out in id order (0006_null_keys)
        Index(None, "run_id", "score", "id"),
        Index(None, "run_id", "id"),
        Index(None, "run_id", "scan_name", "id"),
        Index(None, "run_id", "updated_at", "id"),
        Index(None, "run_id", "timing_s", "id"),
        Index(None, "run_id", "status", "score", "id"),
        Index(None, "run_id", "flagged", "score", "id"),
        Index(None, "run_id", "verdict", "score", "id"),
        Index(None, "run_id", "reviewer", "score", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id"), index=True)
    input_path: Mapped[str] = mapped_column(String)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    score: Mapped[float | None] = mapped_column(Float)
    flagged: Mapped[bool | None] = mapped_column(Boolean)
    map_path: Mapped[str | None] = mapped_column(String)
    recon_path: Mapped[str | None] = mapped_column(String)
    mask_path: Mapped[str | None] = mapped_column(String)
    timing_s: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # copies kept up to date on write (migration 0004_scale), so that listings filter and sort on
    # indexed columns of this table alone: the scan's name, the number of findings and the latest review
    scan_name: Mapped[str | None] = mapped_column(String(255))
    n_findings: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    verdict: Mapped[str | None] = mapped_column(String(32))
    reviewer: Mapped[str | None] = mapped_column(String(255))
    reviewed_at: Mapped[datetime | None] = mapped_column()
    review_id: Mapped[int | None] = mapped_column(Integer)

    run: Mapped[Run] = relationship(back_populates="results")
    scan: Mapped[Scan] = relationship(back_populates="results")
    findings: Mapped[list[Finding]] = relationship(
        back_populates="result",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="Finding.rank",
    )
    reviews: Mapped[list[Review]] = relationship(
        back_populates="result", order_by=lambda: [Review.created_at, Review.id]
    )

    def __repr__(self) -> str:
        return f"Result(id={self.id}, run_id={self.run_id}, scan_id={self.scan_id}, status={self.status!r})"


class OutputName(Base):
    """The stem one scan's outputs carry in one output folder, claimed before they are written.

    ``key`` (SHA-256 of the folder and the case-folded stem) is unique, so no two scans or runs can
    ever write the same file; a scan keeps its claim when its run is resumed.
    """

    __tablename__ = "output_names"
    __table_args__ = (UniqueConstraint("run_id", "scan_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    out_dir: Mapped[str] = mapped_column(String)
    stem: Mapped[str] = mapped_column(String)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    scan_id: Mapped[int] = mapped_column(ForeignKey("scans.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"OutputName(run_id={self.run_id}, scan_id={self.scan_id}, stem={self.stem!r})"


class Finding(Base):
    """One connected component of a thresholded anomaly map (rank 1 = the largest)."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)
    n_voxels: Mapped[int] = mapped_column(Integer)
    volume_ml: Mapped[float] = mapped_column(Float)
    centroid_x: Mapped[float] = mapped_column(Float)
    centroid_y: Mapped[float] = mapped_column(Float)
    centroid_z: Mapped[float] = mapped_column(Float)
    peak_x: Mapped[float] = mapped_column(Float)
    peak_y: Mapped[float] = mapped_column(Float)
    peak_z: Mapped[float] = mapped_column(Float)
    peak: Mapped[float] = mapped_column(Float)
    mean: Mapped[float] = mapped_column(Float)
    region_centroid: Mapped[str | None] = mapped_column(String(255))
    region_majority: Mapped[str | None] = mapped_column(String(255))
    atlas: Mapped[str | None] = mapped_column(String(255))

    result: Mapped[Result] = relationship(back_populates="findings")

    def __repr__(self) -> str:
        return f"Finding(id={self.id}, result_id={self.result_id}, rank={self.rank}, volume_ml={self.volume_ml:.3f})"


class Review(Base):
    """A reviewer's verdict on a result; several per result form its history."""

    __tablename__ = "reviews"
    __table_args__ = (Index(None, "result_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"))
    reviewer: Mapped[str] = mapped_column(String(255))
    verdict: Mapped[str] = mapped_column(String(32))
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    result: Mapped[Result] = relationship(back_populates="reviews")

    def __repr__(self) -> str:
        return f"Review(id={self.id}, result_id={self.result_id}, verdict={self.verdict!r})"
