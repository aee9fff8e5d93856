"""Listings for the dashboard and the command line: runs with their counts, pages of a run's results in
any order and filter (keyset pagination: a page reads only its own rows through an index), the
neighbours of a result, one result in full, and summaries of a run's scores computed in SQL.

Rows are built by name from labelled columns; every function takes an open ``Session`` first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, Select, cast, func, select
from sqlalchemy.orm import Session, joinedload, selectinload

from anomaly.store.ordering import Filters, Order, Position, after, order_spec
from anomaly.store.schema import Calibration, Finding, Model, Result, Review, Run, Scan


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
    n_findings: int = 0
    n_reviews: int = 0
    version: int = 0
    """Bumped by every write to the run's results and reviews: the key of any cache of the run's data."""

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
    """All runs, newest first, with the counts kept on each run (one statement; no result is read)."""
    stmt = (
        select(
            Run.id.label("run_id"), Run.model_id.label("model_id"), Model.name.label("model_name"),
            Calibration.name.label("calibration_name"), Calibration.version.label("calibration_version"),
            Run.out_dir.label("out_dir"), Run.executor.label("executor"), Run.settings_hash.label("settings_hash"),
            Run.started_at.label("started_at"), Run.finished_at.label("finished_at"),
            (Run.n_scored + Run.n_failed).label("n_results"), Run.n_scored.label("n_ok"),
            Run.n_failed.label("n_failed"), Run.n_flagged.label("n_flagged"), Run.n_reviewed.label("n_reviewed"),
            Run.n_skipped.label("n_skipped"), Run.n_timed.label("n_timed"),
            Run.timing_total_s.label("timing_total_s"), Run.n_findings.label("n_findings"),
            Run.n_reviews.label("n_reviews"), Run.version.label("version"),
        )  # fmt: skip
        .join(Model, Model.id == Run.model_id)
        .outerjoin(Calibration, Calibration.id == Run.calibration_id)
        .order_by(Run.id.desc())
    )
    summaries = []
    for row in s.execute(stmt):
        values = dict(row._mapping)
        n_timed, total = int(values.pop("n_timed") or 0), float(values.pop("timing_total_s") or 0.0)
        counts = {k: int(values[k] or 0) for k in ("n_results", "n_ok", "n_failed", "n_flagged", "n_reviewed",
                                                   "n_skipped", "n_findings", "n_reviews", "version")}
        summaries.append(RunSummary(**{**values, **counts, "mean_timing_s": total / n_timed if n_timed else None}))
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


_ROW_FIELDS = tuple(f.name for f in fields(ResultRow))


def _rows_select(run_id: int) -> Select:
    """Every ``ResultRow`` column, labelled by field name, for the results of one run."""
    columns = {
        "result_id": Result.id, "run_id": Result.run_id, "scan_id": Result.scan_id,
        "content_hash": Scan.content_hash, "scan_name": func.coalesce(Result.scan_name, Scan.name),
        "input_path": Result.input_path, "status": Result.status, "error": Result.error, "score": Result.score,
        "flagged": Result.flagged, "map_path": Result.map_path, "recon_path": Result.recon_path,
        "mask_path": Result.mask_path, "timing_s": Result.timing_s,
        "n_findings": cast(Result.n_findings, Integer), "verdict": Result.verdict, "reviewer": Result.reviewer,
        "note": Review.note, "reviewed_at": Result.reviewed_at, "updated_at": Result.updated_at,
    }  # fmt: skip
    assert tuple(columns) == _ROW_FIELDS
    return (
        select(*(column.label(name) for name, column in columns.items()))
        .join(Scan, Scan.id == Result.scan_id)
        .outerjoin(Review, Review.id == Result.review_id)
        .where(Result.run_id == run_id)
    )


def _row(mapping: Any) -> ResultRow:
    values = dict(mapping)
    values["n_findings"] = int(values["n_findings"] or 0)
    return ResultRow(**values)


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
    reviewer; ``search`` is a case-insensitive substring of the scan name or input path. For pages of
    a large run use :func:`result_page`, which reads only the page's rows.
    """
    conditions = Filters.of(status=status, flagged=flagged, verdict=verdict, reviewer=reviewer,
                            search=search).conditions()
    stmt = _rows_select(run_id).where(*conditions).order_by(*order_spec(order).full())
    if limit is not None:
        stmt = stmt.limit(limit)
    if offset:
        stmt = stmt.offset(offset)
    return [_row(row._mapping) for row in s.execute(stmt)]


def iter_results(s: Session, run_id: int, *, status: str | None = None, batch: int = 1000) -> Iterator[ResultRow]:
    """Every result of the run in id order, read ``batch`` rows at a time (bounded memory at any size)."""
    conditions = Filters.of(status=status).conditions()
    last = 0
    while True:
        stmt = _rows_select(run_id).where(*conditions, Result.id > last).order_by(Result.id).limit(batch)
        rows = [_row(row._mapping) for row in s.execute(stmt)]
        yield from rows
        if len(rows) < batch:
            return
        last = rows[-1].result_id


def position_of(row: ResultRow, order: str) -> Position:
    """Where ``row`` lies in ``order`` (for :func:`result_page`'s ``after``)."""
    key = order_spec(order).key
    if key is None:
        return Position(row.result_id)
    value = getattr(row, key.key)  # the key columns are named like ResultRow's fields
    return Position(row.result_id, value, value is None)


def _walk(s: Session, run_id: int, order: Order, filters: Filters, start: Position | None, limit: int,
          ) -> list[ResultRow]:
    """Up to ``limit`` rows after ``start`` (from the beginning when None) in ``order``, NULL keys last:
    at most two index range scans, each stopping after ``limit`` rows."""
    base = _rows_select(run_id).where(*filters.conditions())
    if order.key is None:
        stmt = base if start is None else base.where(after(order, start))
        return [_row(r._mapping) for r in s.execute(stmt.order_by(*order.by()).limit(limit))]
    rows: list[ResultRow] = []
    if start is None or not start.null:
        stmt = base.where(order.key.is_not(None) if start is None else after(order, start))
        rows = [_row(r._mapping) for r in s.execute(stmt.order_by(*order.by()).limit(limit))]
    if len(rows) < limit:
        stmt = base.where(order.key.is_(None))
        if start is not None and start.null:
            stmt = stmt.where(after(order, start))
        rows += [_row(r._mapping) for r in s.execute(stmt.order_by(*order.null_by()).limit(limit - len(rows)))]
    return rows


def _walk_back(s: Session, run_id: int, order: Order, filters: Filters, start: Position) -> ResultRow | None:
    """The row just before ``start`` in ``order`` (NULL keys last), or None at the beginning."""
    back = order.reversed()
    base = _rows_select(run_id).where(*filters.conditions())
    if order.key is not None and start.null:
        found = s.execute(base.where(order.key.is_(None), after(back, start)).order_by(*back.null_by()).limit(1)).first()
        if found is not None:
            return _row(found._mapping)
        stmt = base.where(order.key.is_not(None))
    elif order.key is not None:
        stmt = base.where(after(back, start))
    else:
        stmt = base.where(after(back, start))
    found = s.execute(stmt.order_by(*back.by()).limit(1)).first()
    return None if found is None else _row(found._mapping)


@dataclass(frozen=True)
class ResultPage:
    """One page of a run's results and where the next page starts (None on the last page)."""

    rows: list[ResultRow]
    next_start: Position | None


def result_page(
    s: Session,
    run_id: int,
    *,
    order: str = "score_desc",
    start: Position | None = None,
    size: int = 50,
    status: str | None = None,
    flagged: bool | None = None,
    verdict: str | Iterable[str] | None = None,
    reviewer: str | None = None,
    search: str | None = None,
) -> ResultPage:
    """``size`` results after ``start`` (from the top when None) in ``order`` and the filters: keyset
    pagination, so a page deep in a run of any size reads only its own rows (plus one to see the end)."""
    spec = order_spec(order)
    filters = Filters.of(status=status, flagged=flagged, verdict=verdict, reviewer=reviewer, search=search)
    rows = _walk(s, run_id, spec, filters, start, size + 1)
    more = len(rows) > size
    rows = rows[:size]
    return ResultPage(rows, position_of(rows[-1], order) if more and rows else None)


def count_results(
    s: Session,
    run_id: int,
    *,
    status: str | None = None,
    flagged: bool | None = None,
    verdict: str | Iterable[str] | None = None,
    reviewer: str | None = None,
    search: str | None = None,
    most: int | None = None,
) -> int:
    """How many results of the run pass the filters; with ``most``, counting stops beyond ``most``
    (the answer is then ``most + 1``: "more than ``most``"), so it reads at most that many index entries."""
    conditions = Filters.of(status=status, flagged=flagged, verdict=verdict, reviewer=reviewer,
                            search=search).conditions()
    inner = select(Result.id).where(Result.run_id == run_id, *conditions)
    if most is not None:
        inner = inner.limit(most + 1)
    return int(s.execute(select(func.count()).select_from(inner.subquery())).scalar_one())


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
    """Ids of the previous and next result around ``result_id`` in the run's ``order`` (indexed look-ups).

    With filters, only matching results are stepped to; ``result_id`` itself need not match (so
    "next unreviewed" works right after reviewing it). (None, None) when the result is not in the run.
    """
    spec = order_spec(order)
    filters = Filters.of(status=status, flagged=flagged, verdict=verdict, reviewer=reviewer, search=search)
    here = s.execute(_rows_select(run_id).where(Result.id == result_id)).first()
    if here is None:
        return None, None
    start = position_of(_row(here._mapping), order)
    before = _walk_back(s, run_id, spec, filters, start)
    following = _walk(s, run_id, spec, filters, start, 1)
    return (None if before is None else before.result_id), (following[0].result_id if following else None)


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
    return ResultDetail(result=result, scan=result.scan, run=result.run, findings=list(result.findings),
                        reviews=list(result.reviews))


def run_of_result(s: Session, result_id: int) -> int | None:
    """The run a result belongs to, or None when there is no such result."""
    return s.execute(select(Result.run_id).where(Result.id == result_id)).scalar_one_or_none()


@dataclass(frozen=True)
class ScoreSummary:
    """The scan scores of a run's scored results as a histogram (computed in SQL) with a few quantiles."""

    n: int
    low: float
    high: float
    edges: list[float]
    counts: list[int]
    quantiles: dict[float, float]


def score_summary(s: Session, run_id: int, bins: int = 40, quantiles: tuple[float, ...] = (0.95,)
                  ) -> ScoreSummary | None:
    """Histogram of the finite scores of the run's ok results in ``bins`` equal bins, and the asked
    ``quantiles`` (nearest rank), without reading the scores into Python; None when there are none."""
    scored = (Result.run_id == run_id, Result.status == "ok", Result.score.is_not(None))
    n, low, high = s.execute(select(func.count(Result.id), func.min(Result.score), func.max(Result.score))
                             .where(*scored)).one()
    if not n:
        return None
    low, high = float(low or 0.0), float(high or 0.0)
    width = (high - low) / bins if high > low else 1.0
    index = cast(func.floor((Result.score - low) / width), Integer)
    counts = [0] * bins
    for b, count in s.execute(select(index.label("b"), func.count()).where(*scored).group_by(index)):
        counts[min(max(int(b), 0), bins - 1)] += int(count)
    values: dict[float, float] = {}
    for q in quantiles:
        rank = min(int(q * n), n - 1)
        values[q] = float(s.execute(select(Result.score).where(*scored).order_by(Result.score)
                                    .offset(rank).limit(1)).scalar_one() or 0.0)
    return ScoreSummary(int(n), low, high, [low + i * width for i in range(bins + 1)], counts, values)


def labelled_results(s: Session, run_id: int, key: str, most: int) -> tuple[list[Result], bool]:
    """Up to ``most`` ok results of the run whose details record ``key`` (a label mask), highest score first,
    and whether more exist."""
    stmt = (select(Result).where(Result.run_id == run_id, Result.status == "ok",
                                 Result.details[key].as_string().is_not(None))
            .order_by(Result.score.desc(), Result.id).limit(most + 1))
    found = list(s.scalars(stmt))
    return found[:most], len(found) > most


def count_at_least(s: Session, run_id: int, threshold: float) -> int:
    """Scored results of the run whose score is at or above ``threshold`` (an index range count)."""
    stmt = select(func.count(Result.id)).where(Result.run_id == run_id, Result.status == "ok",
                                               Result.score >= threshold)
    return int(s.execute(stmt).scalar_one())
