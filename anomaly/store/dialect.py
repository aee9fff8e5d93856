"""What differs between the backends, in one place: values JSON columns accept (``anomaly.jsonio``), INSERT that ignores a
duplicate, and write locks that serialise version numbering (SQLite's one write lock, PostgreSQL's
advisory locks)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Table, false, text
from sqlalchemy.orm import Session


class NotFoundError(LookupError):
    """A record asked for by id or name does not exist."""


def record_id(obj: Any, what: str) -> int:
    """The id of a record given as an int or an ORM object (which must have been flushed)."""
    if isinstance(obj, int):
        return obj
    value = getattr(obj, "id", None)
    if value is None:
        raise ValueError(f"{what} {obj!r} has no id yet; add it to the session and flush first")
    return int(value)


def dialect_name(s: Session) -> str:
    """``sqlite``, ``postgresql`` or another SQLAlchemy dialect name of the session's database."""
    return str(s.get_bind().dialect.name)


def insert_ignore(s: Session, table: Table, values: Mapping[str, Any], keys: Sequence[str] | None = None) -> None:
    """INSERT that silently does nothing when a row with the same unique ``keys`` (any unique key when
    None) exists, so that get-or-create is safe when several processes create the same record at once."""
    dialect = dialect_name(s)
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        s.execute(sqlite_insert(table).values(**values).on_conflict_do_nothing(
            index_elements=list(keys) if keys else None))
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        s.execute(pg_insert(table).values(**values).on_conflict_do_nothing(
            index_elements=list(keys) if keys else None))
    else:  # pragma: no cover - other backends: a plain insert (a concurrent duplicate raises IntegrityError)
        s.execute(table.insert().values(**values))


def lock_name(s: Session, table: Table, space: int, name: str) -> None:
    """Hold, until the transaction ends, a lock that serialises writers of ``name`` in ``table``.

    PostgreSQL gets an advisory lock per (space, name); SQLite takes its single write lock now, through
    an update of ``table`` that matches no row.
    """
    dialect = dialect_name(s)
    if dialect == "postgresql":
        key = zlib.crc32(name.encode("utf-8")) - 2**31  # pg's int4 range
        s.execute(text("SELECT pg_advisory_xact_lock(:space, :key)"), {"space": space, "key": key})
    elif dialect == "sqlite":
        column = next(iter(table.c))
        s.execute(table.update().where(false()).values({column.name: column}))
