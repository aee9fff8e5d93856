"""Opening the store: database URLs, SQLite pragmas (WAL, foreign keys, busy timeout) and migrations.

Every ``open_store`` brings the schema to the newest Alembic revision shipped with the package, so a
batch and a dashboard that open the same SQLite file or PostgreSQL database always agree on it.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
"""Alembic script folder shipped inside the package (no alembic.ini needed)."""

ENV_VAR = "ANOMALY_DB"
"""Environment variable holding the database URL (or SQLite file path) used when none is given."""

DEFAULT_BUSY_TIMEOUT_S = 30.0
_PG_MIGRATION_LOCK = 7_310_248_615  # pg_advisory_xact_lock key serialising concurrent upgrades
_THREAD_LOCK = threading.Lock()  # Alembic's context and op proxies are process-global


class StoreError(RuntimeError):
    """The database cannot be used (not a database, another program's tables, unreachable, full disk);
    the message names the database and the fix."""


_OWN_TABLES = frozenset({"scans", "models", "calibrations", "runs", "results", "findings", "reviews", "output_names"})


def describe_db_error(exc: BaseException, url: str) -> str:
    """One line for a database failure: what happened to ``url`` and what to do."""
    orig = getattr(exc, "orig", None) or exc
    text_ = " ".join(str(orig).split())
    low = text_.lower()
    if "file is not a database" in low or "file is encrypted" in low:
        return f"database {url}: the file is not a SQLite database; give a new file name or an anomaly database"
    if "disk is full" in low or "no space left" in low or "disk i/o error" in low:
        return (f"database {url}: the disk holding it is full or failing ({text_}); free space and run the same "
                "command again (results committed so far are kept)")
    if "database is locked" in low or "database is busy" in low:
        return (f"database {url}: locked by another process for longer than the busy timeout; wait for that "
                "process to finish (or stop it) and run the same command again")
    if "readonly" in low or "read-only" in low:
        return f"database {url}: read-only ({text_}); give a database file you can write"
    if "unable to open database file" in low:
        return f"database {url}: cannot open or create the file; check the folder exists and is writable"
    if "connection" in low or "could not connect" in low or "server closed" in low or "terminating" in low:
        return (f"database {url}: the server is unreachable or closed the connection ({text_}); check that it "
                "runs and run the same command again (results committed so far are kept)")
    return f"database {url}: {type(orig).__name__}: {text_}"


def _check_not_foreign(conn: Connection, url: str) -> None:
    """Refuse a database without our migration history whose tables clash with ours (another program's)."""
    from sqlalchemy import inspect

    clash = sorted(_OWN_TABLES & set(inspect(conn).get_table_names()))
    if clash:
        raise StoreError(f"database {url} already holds tables named {', '.join(clash)} but no anomaly schema "
                         "version: it belongs to another program; give a new file or an empty database")


def default_db_url() -> str:
    """The ``ANOMALY_DB`` environment variable when set, else a SQLite file ``./anomaly.db`` (absolute)."""
    value = os.environ.get(ENV_VAR, "").strip()
    if value:
        return value
    return "sqlite:///" + (Path.cwd() / "anomaly.db").resolve().as_posix()


def _is_sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and (
        url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"
    )


def normalize_db_url(value: str | os.PathLike[str]) -> str:
    """Turn a SQLAlchemy URL or a plain file path into a URL; SQLite files get an absolute path and
    their parent folder is created."""
    raw = os.fspath(value).strip()
    if not raw:
        raise ValueError(
            "empty database URL; pass a SQLAlchemy URL such as 'sqlite:///results/anomaly.db' "
            "or 'postgresql+psycopg://user@host/db', or a file path such as 'results/anomaly.db'"
        )
    if "://" not in raw:
        path = Path(raw).expanduser().resolve()
        if path.is_dir():
            raise ValueError(
                f"database path {path} is a folder; give a file name inside it, e.g. {path / 'anomaly.db'}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        return "sqlite:///" + path.as_posix()
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://") :]
    if raw.startswith("postgresql://"):  # no driver named: psycopg 3, as in the 'postgres' extra
        raw = "postgresql+psycopg://" + raw[len("postgresql://") :]
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ValueError(
            f"cannot parse database URL {raw!r} ({exc}); expected e.g. 'sqlite:///results/anomaly.db' "
            "or 'postgresql+psycopg://user:password@host:5432/db'"
        ) from exc
    if url.get_backend_name() == "sqlite" and not _is_sqlite_memory(url):
        path = Path(url.database or "").expanduser().resolve()
        if path.is_dir():
            raise ValueError(
                f"database path {path} in {raw!r} is a folder; give a file name, e.g. {path / 'anomaly.db'}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        url = url.set(database=path.as_posix())
    return url.render_as_string(hide_password=False)


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` for the packaged migrations, e.g. for ``command.revision(cfg, autogenerate=True)``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", normalize_db_url(url).replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@lru_cache(maxsize=1)
def _script_directory() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest migration revision shipped with this package."""
    head = _script_directory().get_current_head()
    if head is None:  # pragma: no cover - the package always ships migrations
        raise RuntimeError(f"no Alembic migrations found in {MIGRATIONS_DIR}; the installation is incomplete")
    return head


def current_revision(connection: Connection) -> str | None:
    """The migration revision the database behind ``connection`` is at (None when empty)."""
    return MigrationContext.configure(connection).get_current_revision()


def _check_known(revision: str | None, url: str) -> None:
    if revision is None:
        return
    known = {script.revision for script in _script_directory().walk_revisions()}
    if revision not in known:
        raise StoreError(
            f"database {url} is at schema revision {revision!r}, which this version of the anomaly "
            f"package does not know (newest known: {head_revision()!r}); it was written by a newer "
            "version: upgrade the package or use another database"
        )


def _sqlite_pragmas(engine: Engine, busy_timeout_ms: int, *, wal: bool, foreign_keys: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
            cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
            if wal:
                _enable_wal(cursor, busy_timeout_ms / 1000.0)
                cursor.execute("PRAGMA synchronous = NORMAL")
        finally:
            cursor.close()


def _enable_wal(cursor: Any, timeout_s: float) -> None:
    """Switch the file to WAL, retrying while another process holds it.

    SQLite does not call its busy handler for a journal-mode change, so two processes creating the
    same new database at once would otherwise see 'database is locked' at once.
    """
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        mode = cursor.execute("PRAGMA journal_mode").fetchone()
        if mode is not None and str(mode[0]).lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode = WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError(
                    f"database is locked: could not switch it to WAL within {timeout_s:.0f} s because "
                    "another process holds it; wait for that process to finish, or raise busy_timeout_s"
                ) from exc
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@contextmanager
def _locked_migration_connection(engine: Engine, busy_timeout_ms: int) -> Iterator[Connection]:
    """A connection inside a transaction that excludes concurrent upgrades of the same database."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and not _is_sqlite_memory(url):
        # A dedicated connection in explicit-transaction mode: BEGIN IMMEDIATE takes the write lock
        # up front and SQLite runs the DDL transactionally. Foreign keys stay off while migrating,
        # as Alembic's batch (table copy) operations require.
        mig_engine = create_engine(url, poolclass=NullPool)
        _sqlite_pragmas(mig_engine, busy_timeout_ms, wal=True, foreign_keys=False)

        @event.listens_for(mig_engine, "connect")
        def _autocommit_driver(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(mig_engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        try:
            with mig_engine.begin() as conn:
                yield conn
        finally:
            mig_engine.dispose()
        return
    with engine.begin() as conn:
        if url.get_backend_name() == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        yield conn


def upgrade_schema(engine: Engine, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> bool:
    """Bring the database to the newest revision; returns True when a migration ran.

    Cheap when already current (one query); concurrent openers of a new database are serialised.
    """
    head = head_revision()
    display = engine.url.render_as_string(hide_password=True)
    with engine.connect() as conn:
        current = current_revision(conn)
    if current == head:
        return False
    _check_known(current, display)
    with _THREAD_LOCK, _locked_migration_connection(engine, int(busy_timeout_s * 1000)) as conn:
        current = current_revision(conn)
        if current == head:
            return False
        _check_known(current, display)
        if current is None:  # under the lock: a concurrent opener's new schema is committed by now, not half-seen
            _check_not_foreign(conn, display)
        command.upgrade(alembic_config(connection=conn), "head")
    return True


def _dispose_after_fork(engine: Engine) -> None:
    """Drop pooled connections inherited by a forked child (they belong to the parent)."""
    ref = weakref.ref(engine)

    def _after_fork() -> None:
        inherited = ref()
        if inherited is not None:
            inherited.dispose(close=False)

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork)


def create_store_engine(url: str, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> Engine:
    """A SQLAlchemy engine for ``url``; for SQLite with WAL, foreign keys and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if _is_sqlite_memory(parsed):
            engine = create_engine(parsed, poolclass=StaticPool, connect_args={"check_same_thread": False})
            _sqlite_pragmas(engine, int(busy_timeout_s * 1000), wal=False, foreign_keys=True)
        else:
            engine = create_engine(parsed, connect_args={"check_same_thread": False})
            _sqlite_pragmas(engine, int(busy_timeout_s * 1000), wal=True, foreign_keys=True)
    else:
        engine = create_engine(parsed, pool_pre_ping=True)
    _dispose_after_fork(engine)
    return engine


class Store:
    """The result database: an engine plus ``session()`` transactions (commit on success, rollback on error)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        """The database URL with any password hidden, for messages and logs."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back when it raises.

        Objects stay readable after the block (no expiry on commit).
        """
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        """Close all pooled connections."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"


def open_store(
    url: str | os.PathLike[str] | None = None, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
) -> Store:
    """Open (and create or upgrade) the store at ``url``: a SQLAlchemy URL or a file path; by default
    ``ANOMALY_DB`` or ``./anomaly.db``."""
    normalized = normalize_db_url(default_db_url() if url is None else url)
    engine = create_store_engine(normalized, busy_timeout_s)
    try:
        upgrade_schema(engine, busy_timeout_s)
    except DBAPIError as exc:
        engine.dispose()
        raise StoreError(describe_db_error(exc, engine.url.render_as_string(hide_password=True))) from exc
    except Exception:
        engine.dispose()
        raise
    return Store(engine)
