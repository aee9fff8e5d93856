"""Query API of the store: get-or-create records, run bookkeeping, result listings, reviews, calibrations.

Every function takes an open ``Session`` first and never commits; the caller's ``Store.session()``
block does. Listing functions return plain dataclasses built from one SQL statement each.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, Table, and_, case, false, func, literal, or_, select, text
from sqlalchemy.orm import Session, joinedload, selectinload

from anomaly.jsonio import to_jsonable
from anomaly.store.schema import (
    CALIBRATION_METHODS,
    RESULT_STATUSES,
    VERDICTS,
    Calibration,
    Finding,
    Model,
    OutputName,
    Result,
    Review,
    Run,
    Scan,
    utcnow,
)

UNREVIEWED = "unreviewed"
"""Pseudo-verdict accepted by the ``verdict`` filters: results without any review."""

ORDERS: tuple[str, ...] = ("score_desc", "score_asc", "name", "name_desc", "recent", "timing_desc", "id")
"""Orderings accepted by ``run_results`` and ``neighbours``."""

FINDING_FIELDS: tuple[str, ...] = (
    "rank", "n_voxels", "volume_ml", "centroid_x", "centroid_y", "centroid_z",
    "peak_x", "peak_y", "peak_z", "peak", "mean", "region_centroid", "region_majority", "atlas",
)  # fmt: skip
"""Keys of a finding dict given to ``upsert_result`` (``centroid_mm``/``peak_mm`` 3-sequences also accepted)."""

_OPTIONAL_FINDING_FIELDS = {"rank", "region_centroid", "region_majority", "atlas"}
_CALIBRATION_REF = re.compile(r"^(?P<name>[^@\s][^@]*?)(?:@(?P<version>[^@]*))?$")
_CALIBRATION_LOCK_SPACE = 731_024_862  # first key of the two-int4 advisory locks on calibration names


class NotFoundError(LookupError):
    """A record asked for by id or name does not exist."""


# ----------------------------------------------------------------------------------------------- helpers


def _id(obj: Any, what: str) -> int:
    if isinstance(obj, int):
        return obj
    value = getattr(obj, "id", None)
    if value is None:
        raise ValueError(f"{what} {obj!r} has no id yet; add it to the session and flush first")
    return int(value)


def _insert_ignore(s: Session, entity: type, values: dict[str, Any], keys: Sequence[str]) -> None:
    """INSERT that silently does nothing when a row with the same unique ``keys`` exists.

    Makes get-or-create safe when several processes create the same record at once.
    """
    dialect = s.get_bind().dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    else:  # other backends: a plain insert (a concurrent duplicate raises IntegrityError)
        s.add(entity(**values))
        s.flush()
        return
    table = entity.__table__  # type: ignore[attr-defined]
    s.execute(insert(table).values(**values).on_conflict_do_nothing(index_elements=list(keys)))


# ----------------------------------------------------------------------------------------------- records


def get_or_create_model(
    s: Session, name: str, weights_hash: str, config: Mapping[str, Any] | None = None
) -> Model:
    """The model row for (``name``, ``weights_hash``), created with ``config`` when new."""
    if not name or not weights_hash:
        raise ValueError(
            f"a model needs a name and a weights hash, got name={name!r}, weights_hash={weights_hash!r}"
        )
    stmt = select(Model).where(Model.name == name, Model.weights_hash == weights_hash)
    model = s.scalars(stmt).one_or_none()
    if model is None:
        _insert_ignore(
            s,
            Model,
            {
                "name": name,
                "weights_hash": weights_hash,
                "config": to_jsonable(dict(config or {})),
                "created_at": utcnow(),
            },
            ("name", "weights_hash"),
        )
        model = s.scalars(stmt).one()
    return model


def get_or_create_scan(
    s: Session,
    content_hash: str,
    path: str | os.PathLike[str],
    name: str,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    orientation: str | None = None,
    dtype: str | None = None,
) -> Scan:
    """The scan with this content hash; created when new, else its path, name and the given facts updated."""
    if not content_hash or len(content_hash) > 64:
        raise ValueError(
            f"scan {os.fspath(path)!r}: content hash {content_hash!r} is not a SHA-256 hex digest "
            "(expected at most 64 characters)"
        )
    facts: dict[str, Any] = {"path": os.fspath(path), "name": name}
    if shape is not None:
        facts["shape"] = [int(v) for v in shape]
    if spacing is not None:
        facts["spacing"] = [float(v) for v in spacing]
    if orientation is not None:
        facts["orientation"] = str(orientation)
    if dtype is not None:
        facts["dtype"] = str(dtype)
    stmt = select(Scan).where(Scan.content_hash == content_hash)
    scan = s.scalars(stmt).one_or_none()
    if scan is None:
        _insert_ignore(
            s, Scan, {"content_hash": content_hash, "created_at": utcnow(), **facts}, ("content_hash",)
        )
        scan = s.scalars(stmt).one()
    for key, value in facts.items():
        if getattr(scan, key) != value:
            setattr(scan, key, value)
    return scan


def open_run(
    s: Session,
    model: Model | int,
    settings: Mapping[str, Any],
    settings_hash: str,
    out_dir: str | os.PathLike[str],
    calibration: Calibration | int | None = None,
    executor: str = "local",
) -> Run:
    """The run for (model, settings hash, output folder, calibration), so a repeated or interrupted
    batch continues it; created when none exists. A reopened run is marked unfinished."""
    model_id = _id(model, "model")
    calibration_id = None if calibration is None else _id(calibration, "calibration")
    out = os.path.abspath(os.fspath(out_dir))
    stmt = (
        select(Run)
        .where(
            Run.model_id == model_id,
            Run.settings_hash == settings_hash,
            Run.out_dir == out,
            Run.calibration_id.is_(None) if calibration_id is None else Run.calibration_id == calibration_id,
        )
        .order_by(Run.id.desc())
        .limit(1)
    )
    run = s.scalars(stmt).first()
    if run is not None:
        run.finished_at = None
        return run
    run = Run(
        model_id=model_id,
        settings=to_jsonable(dict(settings)),
        settings_hash=settings_hash,
        out_dir=out,
        calibration_id=calibration_id,
        started_at=utcnow(),
        executor=executor,
        n_scored=0,
        n_failed=0,
        n_skipped=0,
    )
    s.add(run)
    s.flush()
    return run


def get_run(s: Session, run_id: int) -> Run:
    """The run with this id (model and calibration loaded), or NotFoundError."""
    run = s.get(Run, run_id, options=[joinedload(Run.model), joinedload(Run.calibration)])
    if run is None:
        raise NotFoundError(f"run {run_id} does not exist in this database; list runs with list_runs()")
    return run


def get_result(s: Session, run: Run | int, scan: Scan | int) -> Result | None:
    """The result of ``scan`` in ``run``, or None when not scored there yet."""
    stmt = select(Result).where(Result.run_id == _id(run, "run"), Result.scan_id == _id(scan, "scan"))
    return s.scalars(stmt).one_or_none()


def claimed_stem(s: Session, run: Run | int, scan: Scan | int) -> str | None:
    """The output stem ``scan`` holds in ``run``'s folder, or None when it has claimed none."""
    stmt = select(OutputName.stem).where(OutputName.run_id == _id(run, "run"), OutputName.scan_id == _id(scan, "scan"))
    return s.scalars(stmt).one_or_none()


def claim_output_name(
    s: Session,
    run: Run | int,
    scan: Scan | int,
    out_dir: str | os.PathLike[str],
    candidates: Iterable[str],
    in_use: Callable[[str], bool] = lambda stem: False,
) -> str:
    """Claim the first free stem among ``candidates`` for the outputs of ``scan`` in ``run`` (in
    ``out_dir``): free means no other (run, scan) holds it in this database and ``in_use(stem)`` is
    False (e.g. no such file on disk). A scan that already holds a stem in this run keeps it.
    Safe when several processes claim at once (a unique key; the loser tries the next candidate)."""
    from anomaly.outputs import output_key

    run_id, scan_id = _id(run, "run"), _id(scan, "scan")
    held = claimed_stem(s, run_id, scan_id)
    if held is not None:
        return held
    folder = os.fspath(out_dir)
    dialect = s.get_bind().dialect.name
    for stem in candidates:
        key = output_key(folder, stem)
        if s.scalars(select(OutputName.id).where(OutputName.key == key)).first() is not None or in_use(stem):
            continue
        values = {"key": key, "out_dir": folder, "stem": stem, "run_id": run_id, "scan_id": scan_id,
                  "created_at": utcnow()}
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            s.execute(sqlite_insert(cast(Table, OutputName.__table__)).values(**values).on_conflict_do_nothing())
        elif dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            s.execute(pg_insert(cast(Table, OutputName.__table__)).values(**values).on_conflict_do_nothing())
        else:  # pragma: no cover - other backends: a concurrent duplicate raises IntegrityError
            s.add(OutputName(**values))
            s.flush()
        held = claimed_stem(s, run_id, scan_id)
        if held is not None:
            return held
    raise RuntimeError("no free output name")  # pragma: no cover - the candidates never end


def _finding_from_dict(data: Mapping[str, Any], default_rank: int, where: str) -> Finding:
    values = dict(data)
    for alias, prefix in (("centroid_mm", "centroid"), ("peak_mm", "peak")):
        if alias in values:
            xyz = values.pop(alias)
            if xyz is None or len(xyz) != 3:
                raise ValueError(f"{where}: '{alias}' must be 3 world coordinates in mm, got {xyz!r}")
            for axis, v in zip("xyz", xyz, strict=True):
                values[f"{prefix}_{axis}"] = v
    unknown = sorted(set(values) - set(FINDING_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; a finding takes {list(FINDING_FIELDS)}")
    missing = sorted(set(FINDING_FIELDS) - _OPTIONAL_FINDING_FIELDS - set(values))
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    values.setdefault("rank", default_rank)
    converted: dict[str, Any] = {}
    for key, v in values.items():
        if key in ("rank", "n_voxels"):
            converted[key] = int(v)
        elif key in ("region_centroid", "region_majority", "atlas"):
            converted[key] = None if v is None else str(v)
        else:
            converted[key] = float(v)
    return Finding(**converted)


def upsert_result(
    s: Session,
    run: Run | int,
    scan: Scan | int,
    *,
    status: str,
    input_path: str | os.PathLike[str],
    error: str | None = None,
    score: float | None = None,
    flagged: bool | None = None,
    map_path: str | os.PathLike[str] | None = None,
    recon_path: str | os.PathLike[str] | None = None,
    mask_path: str | os.PathLike[str] | None = None,
    timing_s: float | None = None,
    details: Mapping[str, Any] | None = None,
    findings: Iterable[Mapping[str, Any]] | None = None,
) -> Result:
    """Record the outcome of ``scan`` in ``run``: one row per (run, scan), updated in place; all
    fields and the findings are replaced by the given ones."""
    if status not in RESULT_STATUSES:
        raise ValueError(
            f"result status {status!r} for {os.fspath(input_path)!r} is not one of {list(RESULT_STATUSES)}"
        )
    run_id, scan_id = _id(run, "run"), _id(scan, "scan")
    where = f"result of {os.fspath(input_path)!r} in run {run_id}"
    new_findings = [
        _finding_from_dict(f, i + 1, f"{where}, finding {i + 1}") for i, f in enumerate(findings or [])
    ]
    now = utcnow()
    result = get_result(s, run_id, scan_id)
    if result is None:
        _insert_ignore(
            s,
            Result,
            {
                "run_id": run_id, "scan_id": scan_id, "status": status, "input_path": os.fspath(input_path),
                "details": {}, "created_at": now, "updated_at": now,
            },
            ("run_id", "scan_id"),
        )  # fmt: skip
        result = get_result(s, run_id, scan_id)
        assert result is not None
    result.status = status
    result.input_path = os.fspath(input_path)
    result.error = error
    result.score = None if score is None else float(score)
    result.flagged = None if flagged is None else bool(flagged)
    result.map_path = None if map_path is None else os.fspath(map_path)
    result.recon_path = None if recon_path is None else os.fspath(recon_path)
    result.mask_path = None if mask_path is None else os.fspath(mask_path)
    result.timing_s = None if timing_s is None else float(timing_s)
    result.details = to_jsonable(dict(details or {}))
    result.updated_at = now
    result.findings = new_findings
    s.flush()
    return result


def finish_run(s: Session, run: Run | int, *, n_skipped: int | None = None) -> Run:
    """Mark ``run`` finished now and refresh its cached counts (``n_skipped`` kept unless given)."""
    run_obj = run if isinstance(run, Run) else get_run(s, run)
    stmt = (
        select(Result.status, func.count(Result.id))
        .where(Result.run_id == run_obj.id)
        .group_by(Result.status)
    )
    counts = {status: n for status, n in s.execute(stmt)}
    run_obj.n_scored = int(counts.get("ok", 0))
    run_obj.n_failed = int(counts.get("failed", 0))
    if n_skipped is not None:
        run_obj.n_skipped = int(n_skipped)
    run_obj.finished_at = utcnow()
    s.flush()
    return run_obj


# ----------------------------------------------------------------------------------------------- listings


@dataclass(frozen=True)
class RunSummary:
    """One run with the counts the dashboard's run list shows."""

    run_id: int
    model_id: int
    model_name: str
    calibration_name: str | None
    calibration_version: int | None
    out_dir: str
    executor: str
    settings_hash: str
    started_at: datetime
    finished_at: datetime | None
    n_results: int
    n_ok: int
    n_failed: int
    n_flagged: int
    n_reviewed: int
    n_skipped: int
    mean_timing_s: float | None

    @property
    def calibration(self) -> str | None:
        """``name@version`` of the run's calibration, or None."""
        if self.calibration_name is None:
            return None
        return f"{self.calibration_name}@{self.calibration_version}"

    @property
    def finished(self) -> bool:
        """Whether the run's last batch ran to the end."""
        return self.finished_at is not None


def list_runs(s: Session) -> list[RunSummary]:
    """All runs, newest first, with result, flag and review counts (one SQL statement)."""
    counts = (
        select(
            Result.run_id.label("run_id"),
            func.count(Result.id).label("n_results"),
            func.sum(case((Result.status == "ok", 1), else_=0)).label("n_ok"),
            func.sum(case((Result.status == "failed", 1), else_=0)).label("n_failed"),
            func.sum(case((Result.flagged.is_(True), 1), else_=0)).label("n_flagged"),
            func.avg(Result.timing_s).label("mean_timing_s"),
        )
        .group_by(Result.run_id)
        .subquery()
    )
    reviewed = (
        select(Result.run_id.label("run_id"), func.count(func.distinct(Review.result_id)).label("n_reviewed"))
        .join(Review, Review.result_id == Result.id)
        .group_by(Result.run_id)
        .subquery()
    )
    stmt = (
        select(
            Run.id,
            Run.model_id,
            Model.name,
            Calibration.name,
            Calibration.version,
            Run.out_dir,
            Run.executor,
            Run.settings_hash,
            Run.started_at,
            Run.finished_at,
            Run.n_skipped,
            func.coalesce(counts.c.n_results, 0),
            func.coalesce(counts.c.n_ok, 0),
            func.coalesce(counts.c.n_failed, 0),
            func.coalesce(counts.c.n_flagged, 0),
            func.coalesce(reviewed.c.n_reviewed, 0),
            counts.c.mean_timing_s,
        )  # fmt: skip
        .join(Model, Model.id == Run.model_id)
        .outerjoin(Calibration, Calibration.id == Run.calibration_id)
        .outerjoin(counts, counts.c.run_id == Run.id)
        .outerjoin(reviewed, reviewed.c.run_id == Run.id)
        .order_by(Run.id.desc())
    )
    summaries = []
    for row in s.execute(stmt):
        (run_id, model_id, model_name, cal_name, cal_version, out_dir, executor, settings_hash, started,
         finished, n_skipped, n_results, n_ok, n_failed, n_flagged, n_reviewed, mean_t) = row  # fmt: skip
        summaries.append(
            RunSummary(
                run_id=run_id,
                model_id=model_id,
                model_name=model_name,
                calibration_name=cal_name,
                calibration_version=cal_version,
                out_dir=out_dir,
                executor=executor,
                settings_hash=settings_hash,
                started_at=started,
                finished_at=finished,
                n_results=int(n_results),
                n_ok=int(n_ok),
                n_failed=int(n_failed),
                n_flagged=int(n_flagged),
                n_reviewed=int(n_reviewed),
                n_skipped=int(n_skipped),
                mean_timing_s=None if mean_t is None else float(mean_t),
            )  # fmt: skip
        )
    return summaries


@dataclass(frozen=True)
class ResultRow:
    """One result of a run as listed for review, with its latest verdict."""

    result_id: int
    run_id: int
    scan_id: int
    content_hash: str
    scan_name: str
    input_path: str
    status: str
    error: str | None
    score: float | None
    flagged: bool | None
    map_path: str | None
    recon_path: str | None
    mask_path: str | None
    timing_s: float | None
    n_findings: int
    verdict: str | None
    reviewer: str | None
    note: str | None
    reviewed_at: datetime | None
    updated_at: datetime


def latest_review_subquery(run_id: int | None) -> Any:
    """Subquery: reviews (of one run when given) ranked newest first per result; rn = 1 is the current one."""
    stmt = select(
        Review.result_id.label("result_id"),
        Review.verdict.label("verdict"),
        Review.reviewer.label("reviewer"),
        Review.note.label("note"),
        Review.created_at.label("reviewed_at"),
        func.row_number()
        .over(partition_by=Review.result_id, order_by=(Review.created_at.desc(), Review.id.desc()))
        .label("rn"),
    )
    if run_id is not None:
        stmt = stmt.join(Result, Result.id == Review.result_id).where(Result.run_id == run_id)
    return stmt.subquery("latest_review")


def finding_count_subquery(run_id: int | None) -> Any:
    """Subquery: number of findings per result (of one run when given)."""
    stmt = select(Finding.result_id.label("result_id"), func.count(Finding.id).label("n_findings"))
    if run_id is not None:
        stmt = stmt.join(Result, Result.id == Finding.result_id).where(Result.run_id == run_id)
    return stmt.group_by(Finding.result_id).subquery("finding_counts")


def _as_list(value: str | Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _filters(
    latest: Any,
    *,
    status: str | None,
    flagged: bool | None,
    verdict: str | Iterable[str] | None,
    reviewer: str | None,
    search: str | None,
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if status is not None:
        if status not in RESULT_STATUSES:
            raise ValueError(f"status filter {status!r} is not one of {list(RESULT_STATUSES)}")
        conditions.append(Result.status == status)
    if flagged is not None:
        conditions.append(
            Result.flagged.is_(True) if flagged else or_(Result.flagged.is_(False), Result.flagged.is_(None))
        )
    if verdict is not None:
        wanted = _as_list(verdict)
        bad = [v for v in wanted if v != UNREVIEWED and v not in VERDICTS]
        if bad:
            raise ValueError(f"verdict filter {bad} not understood; use {[*VERDICTS, UNREVIEWED]}")
        options: list[ColumnElement[bool]] = []
        if UNREVIEWED in wanted:
            options.append(latest.c.result_id.is_(None))
        named = [v for v in wanted if v != UNREVIEWED]
        if named:
            options.append(latest.c.verdict.in_(named))
        conditions.append(or_(*options) if options else Result.id.is_(None))
    if reviewer is not None:
        conditions.append(latest.c.reviewer == reviewer)
    if search:
        conditions.append(
            or_(
                Scan.name.icontains(search, autoescape=True),
                Result.input_path.icontains(search, autoescape=True),
            )
        )
    return conditions


def _ordering(order: str) -> list[Any]:
    if order == "score_desc":
        return [Result.score.is_(None), Result.score.desc(), Result.id]
    if order == "score_asc":
        return [Result.score.is_(None), Result.score.asc(), Result.id]
    if order == "name":
        return [Scan.name.asc(), Result.id]
    if order == "name_desc":
        return [Scan.name.desc(), Result.id.desc()]
    if order == "recent":
        return [Result.updated_at.desc(), Result.id.desc()]
    if order == "timing_desc":
        return [Result.timing_s.is_(None), Result.timing_s.desc(), Result.id]
    if order == "id":
        return [Result.id]
    raise ValueError(f"unknown order {order!r}; use one of {list(ORDERS)}")


def _result_rows_select(run_id: int, latest: Any, counts: Any) -> Select:
    return (
        select(
            Result.id,
            Result.run_id,
            Result.scan_id,
            Scan.content_hash,
            Scan.name,
            Result.input_path,
            Result.status,
            Result.error,
            Result.score,
            Result.flagged,
            Result.map_path,
            Result.recon_path,
            Result.mask_path,
            Result.timing_s,
            func.coalesce(counts.c.n_findings, 0),
            latest.c.verdict,
            latest.c.reviewer,
            latest.c.note,
            latest.c.reviewed_at,
            Result.updated_at,
        )  # fmt: skip
        .join(Scan, Scan.id == Result.scan_id)
        .outerjoin(latest, and_(latest.c.result_id == Result.id, latest.c.rn == 1))
        .outerjoin(counts, counts.c.result_id == Result.id)
        .where(Result.run_id == run_id)
    )


def run_results(
    s: Session,
    run_id: int,
    *,
    status: str | None = None,
    flagged: bool | None = None,
    verdict: str | Iterable[str] | None = None,
    reviewer: str | None = None,
    search: str | None = None,
    order: str = "score_desc",
    limit: int | None = None,
    offset: int = 0,
) -> list[ResultRow]:
    """The results of a run with their latest verdicts, filtered and ordered (one SQL statement).

    ``verdict`` takes one verdict, several, or ``"unreviewed"``; ``reviewer`` matches the latest
    reviewer; ``search`` is a case-insensitive substring of the scan name or input path.
    """
    latest, counts = latest_review_subquery(run_id), finding_count_subquery(run_id)
    conditions = _filters(
        latest, status=status, flagged=flagged, verdict=verdict, reviewer=reviewer, search=search
    )
    stmt = _result_rows_select(run_id, latest, counts).where(*conditions).order_by(*_ordering(order))
    if limit is not None:
        stmt = stmt.limit(limit)
    if offset:
        stmt = stmt.offset(offset)
    rows = []
    for row in s.execute(stmt):
        values = list(row)
        values[14] = int(values[14])
        rows.append(ResultRow(*values))
    return rows


def count_results(
    s: Session,
    run_id: int,
    *,
    status: str | None = None,
    flagged: bool | None = None,
    verdict: str | Iterable[str] | None = None,
    reviewer: str | None = None,
    search: str | None = None,
) -> int:
    """How many results of the run pass the same filters as ``run_results`` (for paging)."""
    latest = latest_review_subquery(run_id)
    conditions = _filters(
        latest, status=status, flagged=flagged, verdict=verdict, reviewer=reviewer, search=search
    )
    stmt = (
        select(func.count(Result.id))
        .join(Scan, Scan.id == Result.scan_id)
        .outerjoin(latest, and_(latest.c.result_id == Result.id, latest.c.rn == 1))
        .where(Result.run_id == run_id, *conditions)
    )
    return int(s.execute(stmt).scalar_one())


def neighbours(
    s: Session,
    run_id: int,
    result_id: int,
    order: str = "score_desc",
    *,
    status: str | None = None,
    flagged: bool | None = None,
    verdict: str | Iterable[str] | None = None,
    reviewer: str | None = None,
    search: str | None = None,
) -> tuple[int | None, int | None]:
    """Ids of the previous and next result around ``result_id`` in the run's ``order``.

    With filters, only matching results are stepped to; ``result_id`` itself need not match (so
    "next unreviewed" works right after reviewing it). (None, None) when the result is not in the run.
    """
    latest = latest_review_subquery(run_id)
    conditions = _filters(
        latest, status=status, flagged=flagged, verdict=verdict, reviewer=reviewer, search=search
    )
    matches = case((and_(*conditions), 1), else_=0) if conditions else literal(1)
    stmt = (
        select(Result.id, matches)
        .join(Scan, Scan.id == Result.scan_id)
        .outerjoin(latest, and_(latest.c.result_id == Result.id, latest.c.rn == 1))
        .where(Result.run_id == run_id)
        .order_by(*_ordering(order))
    )
    rows = [(rid, bool(match)) for rid, match in s.execute(stmt)]
    position = next((i for i, (rid, _) in enumerate(rows) if rid == result_id), None)
    if position is None:
        return None, None
    prev_id = next((rid for rid, match in reversed(rows[:position]) if match), None)
    next_id = next((rid for rid, match in rows[position + 1 :] if match), None)
    return prev_id, next_id


@dataclass(frozen=True)
class ResultDetail:
    """Everything the review page shows for one result."""

    result: Result
    scan: Scan
    run: Run
    findings: list[Finding]
    reviews: list[Review]
    """All reviews, oldest first; the last is the current verdict."""

    @property
    def out_dir(self) -> str:
        """Output folder of the run that produced the result."""
        return self.run.out_dir

    @property
    def latest_review(self) -> Review | None:
        """The current verdict, or None when unreviewed."""
        return self.reviews[-1] if self.reviews else None


def get_result_detail(s: Session, result_id: int) -> ResultDetail | None:
    """Result, scan, run (with model and calibration), findings and review history; None if missing."""
    stmt = (
        select(Result)
        .where(Result.id == result_id)
        .options(
            joinedload(Result.scan),
            joinedload(Result.run).joinedload(Run.model),
            joinedload(Result.run).joinedload(Run.calibration),
            selectinload(Result.findings),
            selectinload(Result.reviews),
        )
    )
    result = s.scalars(stmt).unique().one_or_none()
    if result is None:
        return None
    return ResultDetail(
        result=result,
        scan=result.scan,
        run=result.run,
        findings=list(result.findings),
        reviews=list(result.reviews),
    )


# ----------------------------------------------------------------------------------------------- reviews


def add_review(s: Session, result_id: int, reviewer: str, verdict: str, note: str = "") -> Review:
    """Record a reviewer's verdict on a result; it becomes the result's current verdict."""
    if verdict not in VERDICTS:
        raise ValueError(
            f"unknown verdict {verdict!r} for result {result_id}; use one of: {', '.join(VERDICTS)}"
        )
    reviewer = (reviewer or "").strip()
    if not reviewer:
        raise ValueError(f"review of result {result_id} needs a reviewer name")
    if s.get(Result, result_id) is None:
        raise NotFoundError(f"cannot review result {result_id}: it does not exist in this database")
    review = Review(
        result_id=result_id, reviewer=reviewer, verdict=verdict, note=note or "", created_at=utcnow()
    )
    s.add(review)
    s.flush()
    return review


def review_progress(s: Session, run_id: int) -> tuple[int, int]:
    """(reviewed, total) over the run's successfully scored results; reviewed = at least one review."""
    stmt = (
        select(func.count(func.distinct(Result.id)), func.count(func.distinct(Review.result_id)))
        .select_from(Result)
        .outerjoin(Review, Review.result_id == Result.id)
        .where(Result.run_id == run_id, Result.status == "ok")
    )
    total, reviewed = s.execute(stmt).one()
    return int(reviewed), int(total)


# ----------------------------------------------------------------------------------------------- calibrations


def parse_calibration_ref(ref: str) -> tuple[str, int | None]:
    """Split ``"name"``, ``"name@3"`` or ``"name@latest"`` into (name, version or None for the latest)."""
    match = _CALIBRATION_REF.match(ref.strip()) if ref else None
    if match is None:
        raise ValueError(f"calibration reference {ref!r} is not 'NAME' or 'NAME@VERSION' (e.g. 'healthy@2')")
    name, version = match.group("name").strip(), match.group("version")
    if version is None or version.strip().lower() in ("", "latest"):
        return name, None
    if not version.strip().isdigit() or int(version) < 1:
        raise ValueError(f"calibration reference {ref!r}: version {version!r} is not a positive whole number")
    return name, int(version)


def _lock_calibration_name(s: Session, name: str) -> None:
    """Hold, until the transaction ends, a lock that serialises version numbering of ``name``.

    Without it two processes calibrating one name read the same last version and the second fails
    on the unique (name, version) constraint. PostgreSQL gets an advisory lock per name; SQLite takes
    its single write lock now, through an update that matches no row, before the last version is read.
    """
    dialect = s.get_bind().dialect.name
    if dialect == "postgresql":
        key = zlib.crc32(name.encode("utf-8")) - 2**31  # pg's int4 range
        s.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"), {"space": _CALIBRATION_LOCK_SPACE, "key": key}
        )
    elif dialect == "sqlite":
        table = cast(Table, Calibration.__table__)
        s.execute(table.update().where(false()).values(name=table.c.name))


def save_calibration(
    s: Session,
    name: str,
    model: Model | int,
    method: str,
    voxel_threshold: float,
    scan_threshold: float | None = None,
    target_fpr: float | None = None,
    settings_hash: str | None = None,
    data: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Calibration:
    """Store a calibration as the next version of ``name`` (1 for a new name)."""
    if not name or "@" in name or name != name.strip():
        raise ValueError(f"calibration name {name!r} must be non-empty, without '@' and surrounding spaces")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration {name!r}: method {method!r} is not one of {list(CALIBRATION_METHODS)}")
    if not math.isfinite(float(voxel_threshold)):
        raise ValueError(f"calibration {name!r}: voxel threshold {voxel_threshold!r} is not a finite number")
    _lock_calibration_name(s, name)
    last = s.execute(select(func.max(Calibration.version)).where(Calibration.name == name)).scalar_one()
    calibration = Calibration(
        name=name,
        version=int(last or 0) + 1,
        model_id=_id(model, "model"),
        method=method,
        voxel_threshold=float(voxel_threshold),
        scan_threshold=None if scan_threshold is None else float(scan_threshold),
        target_fpr=None if target_fpr is None else float(target_fpr),
        settings_hash=settings_hash,
        data=to_jsonable(dict(data or {})),
        metrics=to_jsonable(dict(metrics or {})),
        created_at=utcnow(),
    )
    s.add(calibration)
    s.flush()
    return calibration


def get_calibration(s: Session, name: str, version: int | None = None) -> Calibration | None:
    """Calibration ``name`` at ``version`` (latest when None); ``name`` may also be ``"name@3"``."""
    if version is None:
        name, version = parse_calibration_ref(name)
    stmt = select(Calibration).options(joinedload(Calibration.model)).where(Calibration.name == name)
    stmt = (
        stmt.where(Calibration.version == version)
        if version is not None
        else stmt.order_by(Calibration.version.desc())
    )
    return s.scalars(stmt.limit(1)).first()


def list_calibrations(s: Session, model: Model | int | None = None) -> list[Calibration]:
    """All calibrations (of ``model`` when given), by name then version."""
    stmt = (
        select(Calibration)
        .options(joinedload(Calibration.model))
        .order_by(Calibration.name, Calibration.version)
    )
    if model is not None:
        stmt = stmt.where(Calibration.model_id == _id(model, "model"))
    return list(s.scalars(stmt))
