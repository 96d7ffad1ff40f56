"""What `status` and `jobs list|show` read from a SQLite database, through the standard
library's `sqlite3`.

These commands are typed at a prompt and should answer at once. Going through the repository
costs the import of SQLAlchemy's asyncio extension (which loads its ORM) and aiosqlite: about
0.3 s before the first query, more than the whole command needs. The queries here are the
repository's read queries (`queries.py`) written as SQL; `tests/test_sqlite_reads.py` runs both
on one database and holds them to the same answers. Rows become records through `rows`, the one
place that knows how a job is stored.

Every read of one command runs in one read transaction (one snapshot), with the daemon's busy
timeout, on a connection that cannot write (`PRAGMA query_only`). PostgreSQL keeps the
repository's path: its driver is asyncpg, and the network is most of its time anyway.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

from orchestrator import jobs, lifecycle
from orchestrator.db import rows

#: As the daemon's connections (`engine.SQLITE_BUSY_TIMEOUT_MS`): wait out a writer's commit.
BUSY_TIMEOUT_S = 10.0
#: Columns SQLAlchemy stores as UTC text (`tables.UTCDateTime`: `2026-11-27 20:45:55.123456`).
_JOB_TIMES = ("lease_expires_at", "next_run_at", "deadline_at", "created_at", "updated_at",
              "submitted_at", "started_at", "finished_at")
_ACTIVE = tuple(sorted(s.value for s in lifecycle.ACTIVE_STATES))
_POLLING = (lifecycle.JobState.SUBMITTED.value, lifecycle.JobState.STARTED.value)


def _time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC)


def _job(row: sqlite3.Row) -> jobs.Job:
    values = dict(row)
    for name in _JOB_TIMES:
        values[name] = _time(values[name])
    return rows.job(values)


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" * len(values))


class SqliteReads:
    """The reads of the database-only commands, on one open read transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def _all(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        return self._conn.execute(sql, params).fetchall()

    def revision(self) -> str | None:
        """The schema revision stamped by `migrate`; None if it never ran."""
        try:
            found = self._all("SELECT version_num FROM alembic_version")
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
        return str(found[0][0]) if found else None

    def count_by_state(self) -> dict[lifecycle.JobState, int]:
        counts = dict.fromkeys(lifecycle.JobState, 0)
        for state, n in self._all("SELECT state, count(*) FROM jobs GROUP BY state"):
            if state in rows.STATE_VALUES:  # else a newer program's state: not ours to count
                counts[lifecycle.JobState(state)] = int(n)
        return counts

    def oldest_active(self) -> jobs.Job | None:
        found = self._all(f"SELECT * FROM jobs WHERE state IN ({_marks(_ACTIVE)}) "
                          "ORDER BY created_at, id LIMIT 1", _ACTIVE)
        return _job(found[0]) if found else None

    def polling_counts(self) -> dict[str, int]:
        """Service name -> its jobs in SUBMITTED or STARTED."""
        return {str(service): int(n) for service, n in self._all(
            f"SELECT service, count(*) FROM jobs WHERE state IN ({_marks(_POLLING)}) "
            "GROUP BY service", _POLLING)}

    def list_jobs(self, *, state: lifecycle.JobState | None, service: str | None,
                  limit: int) -> list[jobs.Job]:
        """Newest first."""
        where, params = [], []
        if state is not None:
            where.append("state = ?")
            params.append(state.value)
        if service is not None:
            where.append("service = ?")
            params.append(service)
        sql = "SELECT * FROM jobs" + (f" WHERE {' AND '.join(where)}" if where else "")
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        return [_job(r) for r in self._all(sql, [*params, limit])]

    def get_job(self, id_or_prefix: str) -> jobs.Job:
        """Raise NotFound, or InvalidState if a prefix is ambiguous."""
        key = jobs.lookup_key(id_or_prefix)
        if len(key) >= 32:
            found = self._all("SELECT * FROM jobs WHERE id = ? LIMIT 2", (key,))
        else:
            found = self._all("SELECT * FROM jobs WHERE id LIKE ? LIMIT 2", (f"{key}%",))
        return jobs.resolved(id_or_prefix, [_job(r) for r in found])

    def events(self, job_id: str) -> list[jobs.JobEvent]:
        found = self._all("SELECT * FROM job_events WHERE job_id = ? ORDER BY id", (job_id,))
        return [rows.job_event({**r, "at": _time(r["at"])}) for r in map(dict, found)]


@contextlib.contextmanager
def reading(path: Path) -> Iterator[SqliteReads]:
    """The database at `path` (which must exist: it is never created), read in one transaction.
    Raises sqlite3.Error for a file that is not a readable SQLite database."""
    uri = f"file:{quote(str(path))}?mode=rw"  # never created; opened read-only if write-protected
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA query_only = ON")
        conn.execute("BEGIN")
        try:
            yield SqliteReads(conn)
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()
