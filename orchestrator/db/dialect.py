"""What differs between SQLite and PostgreSQL, behind one object per database.

The rest of `orchestrator/db/` writes dialect-free SQLAlchemy Core and asks the `Dialect` for
the few things that differ: INSERT … ON CONFLICT, row locks, how a batch of guarded UPDATEs is
sent, how many ids fit in one statement, the database's own clock, how writers queue, and which
errors are worth retrying.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import sqlite3
from collections.abc import AsyncIterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext import asyncio as sa_asyncio

from orchestrator import lifecycle
from orchestrator.db import tables

_JOBS = tables.jobs
_ACTIVE = sorted(s.value for s in lifecycle.ACTIVE_STATES)

#: SQLite result codes (primary, the low byte) that a later attempt can succeed at.
_SQLITE_TRANSIENT = frozenset({
    5,   # SQLITE_BUSY: another process holds the write lock past busy_timeout
    6,   # SQLITE_LOCKED
    10,  # SQLITE_IOERR: the disk or the file system failed this write
    13,  # SQLITE_FULL: the disk is full
    14,  # SQLITE_CANTOPEN: the folder or the file is briefly unavailable
    15,  # SQLITE_PROTOCOL: a WAL lock race
})
#: PostgreSQL SQLSTATE classes/codes a later attempt can succeed at.
_PG_TRANSIENT_CLASSES = ("08", "53", "57P", "58")  # connection, resources, shutdown, system I/O
_PG_TRANSIENT_CODES = frozenset({
    "40001",  # serialization_failure
    "40P01",  # deadlock_detected
    "55P03",  # lock_not_available
})
#: OS errors that a later attempt can succeed at (the driver did not wrap them).
_OS_TRANSIENT = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOSPC, errno.EIO, errno.EAGAIN,
})


class Dialect:
    """Shared by both databases; subclasses override what differs."""

    name: str
    #: Most ids one `IN (…)` may carry (SQLite binds at most 32,766 parameters).
    id_chunk: int

    def insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT."""
        raise NotImplementedError

    def id_in(self, column: sa.ColumnElement[str], ids: Sequence[str]) -> sa.ColumnElement[bool]:
        return column.in_(ids)

    def lock(self, query: sa.Select[Any], *, skip_locked: bool = False) -> sa.Select[Any]:
        """Lock the rows read until commit (no-op where the whole database has one writer)."""
        return query

    def owned_by(self, worker_id: str, *also: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
        """The active jobs leased to `worker_id` (and matching `also`)."""
        return sa.and_(_JOBS.c.lease_owner == worker_id, _JOBS.c.state.in_(_ACTIVE), *also)

    def clock(self) -> sa.ColumnElement[Any]:
        """The database's own clock, as a value comparable with the stored times."""
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def write(self, engine: sa_asyncio.AsyncEngine) -> AsyncIterator[
        sa_asyncio.AsyncConnection
    ]:
        async with engine.begin() as conn:
            yield conn

    async def update_many(
        self,
        conn: sa_asyncio.AsyncConnection,
        groups: dict[tuple[str, ...], list[dict[str, Any]]],
        guard: sa.ColumnElement[bool],
    ) -> None:
        """Run guarded UPDATEs: per group, SET the named columns, one parameter set per job.
        `guard` binds b_id, b_expected and b_owner."""
        for params in groups.values():
            await conn.execute(sa.update(_JOBS).where(guard), params)

    def is_transient(self, exc: BaseException) -> bool:
        """Would the same write succeed later (connection lost, database locked, disk full)?
        False for what no retry can fix: a bad value, a constraint, a bug."""
        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _OS_TRANSIENT:
            return True
        cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
        return self._driver_transient(cause, exc)

    def _driver_transient(self, cause: BaseException | None, exc: BaseException) -> bool:
        return False


class SQLite(Dialect):
    """One writer at a time: write transactions start with BEGIN IMMEDIATE (engine.py), so two
    processes on one file serialise at BEGIN, and inside one process an asyncio lock queues the
    writers instead of letting them spin in SQLite's busy handler."""

    name = "sqlite"
    id_chunk = 5_000

    def __init__(self) -> None:
        self._write_lock = asyncio.Lock()

    def insert(self, table: sa.Table) -> Any:
        return sqlite_dialect.insert(table)

    def clock(self) -> sa.ColumnElement[Any]:
        # The stored form (tables.UTCDateTime): fixed-width UTC text, so text order is time
        # order. The file is local, so this is the host's clock, read by SQLite, not by the
        # program (whose clock a test may shift).
        return sa.func.strftime("%Y-%m-%d %H:%M:%f000", "now")

    @contextlib.asynccontextmanager
    async def write(self, engine: sa_asyncio.AsyncEngine) -> AsyncIterator[
        sa_asyncio.AsyncConnection
    ]:
        async with self._write_lock, engine.begin() as conn:
            yield conn

    def _driver_transient(self, cause: BaseException | None, exc: BaseException) -> bool:
        if isinstance(cause, sqlite3.Error):
            code = getattr(cause, "sqlite_errorcode", None)
            if code is not None:
                return code & 0xFF in _SQLITE_TRANSIENT
            # Older sqlite3 modules carry no code: the messages of the transient ones.
            text = str(cause).lower()
            return any(m in text for m in ("locked", "busy", "disk i/o", "full",
                                           "unable to open"))
        return False


class PostgreSQL(Dialect):
    """Rows are locked (FOR UPDATE, SKIP LOCKED for claims) in id order, so a heartbeat and a
    batch write of the same worker cannot deadlock; batches are sent as arrays."""

    name = "postgresql"
    id_chunk = 1_000_000  # one array parameter: no limit worth chunking for

    # sqlalchemy.dialects.postgresql is imported where used: a SQLite install (and every
    # `status`) need not load it.
    def insert(self, table: sa.Table) -> Any:
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table)

    def id_in(self, column: sa.ColumnElement[str], ids: Sequence[str]) -> sa.ColumnElement[bool]:
        from sqlalchemy.dialects import postgresql

        # One array parameter: one prepared statement whatever the batch size.
        return column == sa.any_(sa.bindparam("ids", list(ids), type_=postgresql.ARRAY(sa.Text)))

    def lock(self, query: sa.Select[Any], *, skip_locked: bool = False) -> sa.Select[Any]:
        return query.with_for_update(skip_locked=skip_locked)

    def owned_by(self, worker_id: str, *also: sa.ColumnElement[bool]) -> sa.ColumnElement[bool]:
        """Locked in id order first, the order `transitions` locks them in (only the rows
        matching `also` are locked)."""
        owned = super().owned_by(worker_id, *also)
        locked = sa.select(_JOBS.c.id).where(owned).order_by(_JOBS.c.id).with_for_update()
        return _JOBS.c.id.in_(locked.scalar_subquery())

    def clock(self) -> sa.ColumnElement[Any]:
        # clock_timestamp(), not now(): the time of the statement, not of the transaction.
        return sa.func.clock_timestamp()

    async def update_many(
        self,
        conn: sa_asyncio.AsyncConnection,
        groups: dict[tuple[str, ...], list[dict[str, Any]]],
        guard: sa.ColumnElement[bool],
    ) -> None:
        """One `UPDATE … FROM unnest(arrays)` per group, not one statement per row (asyncpg's
        executemany of 1,000 updates took ~140-400 ms; this takes a few)."""
        from sqlalchemy.dialects import postgresql

        for columns, params in groups.items():
            names = ("b_id", "b_expected", "b_owner", *columns)
            arrays = [
                sa.bindparam(f"a_{name}", [p[name] for p in params],
                             type_=postgresql.ARRAY(_array_item_type(name)))
                for name in names
            ]
            rows = sa.func.unnest(*arrays).table_valued(*names).render_derived(name="v")
            where = sa.and_(_JOBS.c.id == rows.c.b_id, _JOBS.c.state == rows.c.b_expected,
                            _owner_matches(rows.c.b_owner))
            await conn.execute(
                sa.update(_JOBS).where(where).values({name: rows.c[name] for name in columns})
            )

    def _driver_transient(self, cause: BaseException | None, exc: BaseException) -> bool:
        state = _sqlstate(cause) or _sqlstate(exc)
        if state is None:
            # asyncpg's connection errors carry no SQLSTATE.
            return type(cause).__name__ in {"ConnectionDoesNotExistError",
                                            "InterfaceError", "ConnectionFailureError"}
        return state in _PG_TRANSIENT_CODES or state.startswith(_PG_TRANSIENT_CLASSES)


def _owner_matches(owner: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """b_owner is the worker holding the lease, or NULL for a person's command (no lease)."""
    return sa.or_(owner.is_(None), _JOBS.c.lease_owner == owner)


def _sqlstate(exc: BaseException | None) -> str | None:
    seen = 0
    while exc is not None and seen < 5:
        state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if isinstance(state, str) and state:
            return state
        exc = exc.__cause__
        seen += 1
    return None


def _array_item_type(name: str) -> sa.types.TypeEngine[Any]:
    if name in ("b_id", "b_expected", "b_owner"):
        return sa.Text()
    # ARRAY applies the item type's bind processing (UTCDateTime's checks) to each element.
    column_type: sa.types.TypeEngine[Any] = _JOBS.c[name].type
    return column_type


def for_engine(engine: sa_asyncio.AsyncEngine) -> Dialect:
    return SQLite() if engine.dialect.name == "sqlite" else PostgreSQL()


#: The guard of every state change: this job, in the state the writer read, and (for a worker)
#: leased to it. b_owner NULL is a person's command, which overrules the lease.
GUARD = sa.and_(
    _JOBS.c.id == sa.bindparam("b_id"),
    _JOBS.c.state == sa.bindparam("b_expected"),
    _owner_matches(sa.bindparam("b_owner", type_=sa.String())),
)
