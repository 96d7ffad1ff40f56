"""Async engines for SQLite (aiosqlite) and PostgreSQL (asyncpg).

SQLite: every connection gets WAL, a 10 s busy timeout, synchronous=NORMAL and foreign keys,
and write transactions start with BEGIN IMMEDIATE so two processes on one file serialise at
BEGIN instead of failing at their first write. The database file is created 0600.
PostgreSQL: the password is passed separately and never appears in a rendered URL.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext import asyncio as sa_asyncio

from orchestrator.db import urls

#: Execution option marking a connection whose transactions only read (SQLite: plain BEGIN).
READ_ONLY = "bes_read_only"

SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_PRAGMAS: tuple[str, ...] = (
    f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)
DB_FILE_MODE = 0o600


def parse_url(url: str, *, password: str | None = None) -> sa.URL:
    """The URL with the async driver filled in (`sqlite://` -> aiosqlite, `postgresql://` ->
    asyncpg) and the password set. Render it with `safe_url` for logs."""
    parsed = sa.make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    if parsed.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ValueError(
            f"unsupported database URL scheme {parsed.drivername!r}: "
            "use sqlite+aiosqlite:///path or postgresql+asyncpg://host/db"
        )
    if password is not None:
        parsed = parsed.set(password=password)
    return parsed


def safe_url(url: str | sa.URL) -> str:
    """For log lines and error messages: the password (if any) shown as ***."""
    parsed = sa.make_url(url) if isinstance(url, str) else url
    return parsed.render_as_string(hide_password=True)


def sqlite_path(url: sa.URL) -> Path | None:
    """The database file of a SQLite URL; None for in-memory databases."""
    return urls.sqlite_file(url.database or "")


def _ensure_private_file(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would use the umask: often 0644)."""
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, DB_FILE_MODE)
        os.close(fd)
    _chmod_private(path)


def _chmod_private(path: Path) -> None:
    for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if candidate.stat().st_mode & 0o777 != DB_FILE_MODE:
                candidate.chmod(DB_FILE_MODE)


def create_engine(
    url: str, *, password: str | None = None, **kwargs: Any
) -> sa_asyncio.AsyncEngine:
    parsed = parse_url(url, password=password)
    if parsed.drivername == "sqlite+aiosqlite":
        return _create_sqlite_engine(parsed, **kwargs)
    connect_args = {"server_settings": {"application_name": "bes-orchestrator"}}
    return sa_asyncio.create_async_engine(parsed, connect_args=connect_args, **kwargs)


def _create_sqlite_engine(url: sa.URL, **kwargs: Any) -> sa_asyncio.AsyncEngine:
    path = sqlite_path(url)
    if path is not None:
        _ensure_private_file(path)
    # isolation_level=None: the sqlite3 module must not issue its own BEGINs; we do (below).
    engine = sa_asyncio.create_async_engine(
        url, connect_args={"isolation_level": None}, **kwargs
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for pragma in SQLITE_PRAGMAS:
                cursor.execute(pragma)
        finally:
            cursor.close()
        if path is not None:
            _chmod_private(path)  # the -wal and -shm files exist only once WAL is on

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def is_sqlite(engine: sa_asyncio.AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"
