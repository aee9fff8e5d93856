"""Throwaway PostgreSQL databases on a server (for tests and benchmarks): created with unique names,
dropped afterwards even while connections are still open, so a run never touches another's data."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from anomaly.store.engine import normalize_db_url


@contextmanager
def scratch_databases(server_url: str, prefix: str = "anomaly", count: int = 1) -> Iterator[list[str]]:
    """URLs of ``count`` new, empty databases on the server of ``server_url`` (a user allowed to create
    databases); each is dropped on exit with ``WITH (FORCE)`` (PostgreSQL 13+)."""
    base = make_url(normalize_db_url(server_url))
    if base.get_backend_name() != "postgresql":
        raise ValueError(f"scratch databases are made on a PostgreSQL server, not on {base.get_backend_name()}")
    names = [f"{prefix}_{uuid.uuid4().hex[:12]}" for _ in range(count)]
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)  # fresh connections: the server may restart meanwhile
    made: list[str] = []
    try:
        with admin.connect() as conn:
            for name in names:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
                made.append(name)
        yield [base.set(database=name).render_as_string(hide_password=False) for name in names]
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def scratch_database(server_url: str, prefix: str = "anomaly") -> Iterator[str]:
    """The URL of one new, empty database on the server of ``server_url``, dropped on exit."""
    with scratch_databases(server_url, prefix, 1) as urls:
        yield urls[0]
