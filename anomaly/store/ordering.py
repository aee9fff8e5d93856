"""Filters and orders of result listings, and keyset positions in them (``after this row``), all on
indexed columns of ``results``: each worklist order and filter has its index (migration 0004_scale).

An order is a key column (or none: the id alone) with a direction, and the id as tie-break. Rows whose
key is NULL (a failed scan has no score) come after all others, in id order; a position therefore
says whether it lies among the NULL rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, and_, or_

from anomaly.store.schema import RESULT_STATUSES, VERDICTS, Result

UNREVIEWED = "unreviewed"
"""Pseudo-verdict accepted by the ``verdict`` filters: results without any review."""


@dataclass(frozen=True)
class Order:
    """A listing order: ``key`` (None: the id alone) descending or not, then the id descending or not."""

    key: Any
    descending: bool
    id_descending: bool

    def reversed(self) -> Order:
        """The same order walked backwards."""
        return Order(self.key, not self.descending, not self.id_descending)

    def by(self) -> list[Any]:
        """ORDER BY terms within one segment (NULL keys apart)."""
        ident = Result.id.desc() if self.id_descending else Result.id.asc()
        if self.key is None:
            return [ident]
        return [self.key.desc() if self.descending else self.key.asc(), ident]

    def null_by(self) -> list[Any]:
        """ORDER BY terms within the NULL-key segment: the id, led by the (all NULL) key so that an index
        ``(..., key, id)`` serves the order and a page stops after its rows instead of sorting the segment."""
        return Order(self.key, self.id_descending, self.id_descending).by()

    def full(self) -> list[Any]:
        """ORDER BY terms of one statement over both segments (NULL keys last); not index-friendly."""
        return self.by() if self.key is None else [self.key.is_(None), *self.by()]


ORDER_SPECS: dict[str, Order] = {
    "score_desc": Order(Result.score, True, False),
    "score_asc": Order(Result.score, False, False),
    "name": Order(Result.scan_name, False, False),
    "name_desc": Order(Result.scan_name, True, True),
    "recent": Order(Result.updated_at, True, True),
    "timing_desc": Order(Result.timing_s, True, False),
    "id": Order(None, False, False),
}
ORDERS: tuple[str, ...] = tuple(ORDER_SPECS)
"""Orderings accepted by ``run_results``, ``result_page`` and ``neighbours``."""


def order_spec(order: str) -> Order:
    """The :class:`Order` named ``order``; ValueError naming the choices otherwise."""
    try:
        return ORDER_SPECS[order]
    except KeyError:
        raise ValueError(f"unknown order {order!r}; use one of {list(ORDERS)}") from None


@dataclass(frozen=True)
class Position:
    """Where a row lies in an order: its key value (or among the NULL keys) and its id."""

    result_id: int
    value: Any = None
    null: bool = False


def _beyond(column: Any, value: Any, descending: bool) -> ColumnElement[bool]:
    return column < value if descending else column > value


def after(order: Order, position: Position) -> ColumnElement[bool]:
    """Rows after ``position`` within its segment (the NULL-key rows are the id order alone)."""
    ident = _beyond(Result.id, position.result_id, order.id_descending)
    if order.key is None or position.null:
        return ident
    # the bound alone is what an index range scan can start from; the OR picks the rows past the tie
    bound = order.key <= position.value if order.descending else order.key >= position.value
    return and_(bound, or_(_beyond(order.key, position.value, order.descending),
                           and_(order.key == position.value, ident)))


def _as_list(value: str | Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


@dataclass(frozen=True)
class Filters:
    """Worklist filters: status, flag, current verdict(s) (or ``unreviewed``), current reviewer and a
    case-insensitive substring of the scan name or input path."""

    status: str | None = None
    flagged: bool | None = None
    verdict: str | tuple[str, ...] | None = None
    reviewer: str | None = None
    search: str | None = None

    @classmethod
    def of(cls, *, status: str | None = None, flagged: bool | None = None,
           verdict: str | Iterable[str] | None = None, reviewer: str | None = None,
           search: str | None = None) -> Filters:
        """Filters from the keyword arguments of the listing functions."""
        wanted = None if verdict is None else (verdict if isinstance(verdict, str) else tuple(verdict))
        return cls(status, flagged, wanted, reviewer, search)

    def conditions(self) -> list[ColumnElement[bool]]:
        """WHERE terms on ``results`` (each served by an index led by ``run_id``)."""
        conditions: list[ColumnElement[bool]] = []
        if self.status is not None:
            if self.status not in RESULT_STATUSES:
                raise ValueError(f"status filter {self.status!r} is not one of {list(RESULT_STATUSES)}")
            conditions.append(Result.status == self.status)
        if self.flagged is not None:
            conditions.append(Result.flagged.is_(True) if self.flagged
                              else or_(Result.flagged.is_(False), Result.flagged.is_(None)))
        if self.verdict is not None:
            wanted = _as_list(self.verdict)
            bad = [v for v in wanted if v != UNREVIEWED and v not in VERDICTS]
            if bad:
                raise ValueError(f"verdict filter {bad} not understood; use {[*VERDICTS, UNREVIEWED]}")
            options: list[ColumnElement[bool]] = []
            if UNREVIEWED in wanted:
                options.append(Result.verdict.is_(None))
            named = [v for v in wanted if v != UNREVIEWED]
            if named:
                options.append(Result.verdict.in_(named))
            conditions.append(or_(*options) if options else Result.id.is_(None))
        if self.reviewer is not None:
            conditions.append(Result.reviewer == self.reviewer)
        if self.search:
            conditions.append(or_(Result.scan_name.icontains(self.search, autoescape=True),
                                  Result.input_path.icontains(self.search, autoescape=True)))
        return conditions

    @property
    def empty(self) -> bool:
        """Whether no filter is set."""
        return (self.status, self.flagged, self.verdict, self.reviewer, self.search or None) == (None,) * 5
