"""The database, as the rest of the program sees it: one object, no SQL outside `orchestrator/db/`.

Layout, by role:
    claims.py       new jobs (files, queue rows), the claim loop, leases, heartbeats, workers
    transitions.py  the one write path for a job's state (`apply`) and people's commands
    queries.py      read-only queries for the CLI and the `--once` drain check
    rows.py         rows <-> records
    dialect.py      what differs between SQLite and PostgreSQL, one object each
Works on SQLite (WAL, BEGIN IMMEDIATE, one writer) and PostgreSQL (row locks, SKIP LOCKED).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from sqlalchemy.ext import asyncio as sa_asyncio

from orchestrator import errors, jobs, lifecycle
from orchestrator.db import claims, queries, transitions
from orchestrator.db import dialect as db_dialect
from orchestrator.db import engine as db_engine

NotFound = queries.NotFound
InvalidState = queries.InvalidState
WorkerIdInUse = claims.WorkerIdInUse
Outcome = transitions.Outcome
Applied = transitions.Applied
Lost = transitions.Lost
Rejected = transitions.Rejected


class LeaseLost(errors.OrchestratorError):
    """A guarded change was not applied: another worker (or a person) owns the job now."""


class Repository:
    def __init__(self, engine: sa_asyncio.AsyncEngine) -> None:
        self._engine = engine
        self._read_engine = engine.execution_options(**{db_engine.READ_ONLY: True})
        self.dialect = db_dialect.for_engine(engine)

    @classmethod
    async def open(cls, url: str, *, password: str | None = None) -> Repository:
        """Create the engine (SQLite: WAL, busy_timeout, foreign keys) and return a repository."""
        return cls(db_engine.create_engine(url, password=password))

    async def close(self) -> None:
        await self._engine.dispose()

    async def check_schema(self, *, quick: bool = False) -> None:
        """Raise errors.DatabaseVersionError unless the database is at this program's head
        (`quick`: see `migrate.check`; for the commands that only read and write rows)."""
        from orchestrator.db import migrate  # Alembic: only when the schema is checked

        await migrate.check(self._engine, quick=quick)

    @property
    def read_engine(self) -> sa_asyncio.AsyncEngine:
        """For read-only queries outside this package (the status page's aggregates): its
        transactions never take SQLite's write lock."""
        return self._read_engine

    def is_transient(self, exc: BaseException) -> bool:
        """Would the same write succeed later (connection lost, database locked, disk full)?"""
        return self.dialect.is_transient(exc)

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[sa_asyncio.AsyncConnection]:
        async with self.dialect.write(self._engine) as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[sa_asyncio.AsyncConnection]:
        async with self._read_engine.connect() as conn:
            yield conn

    # -- state changes: the one write path -----------------------------------------------------
    async def apply(
        self,
        items: Sequence[transitions.Item],
        *,
        worker_id: str | None,
        now: dt.datetime,
    ) -> list[Outcome]:
        """Apply transitions and reschedules in order, in one transaction; one outcome per item:
        Applied, Lost (the guard did not hold) or Rejected (a bug: never written). A worker
        passes its id; `worker_id=None` is for people's transitions only."""
        if not items:
            return []
        async with self._write() as conn:
            return await transitions.apply(conn, self.dialect, items, worker_id=worker_id,
                                           now=now)

    async def request_cancel(self, job_id: str, *, now: dt.datetime) -> jobs.Job:
        """`jobs cancel`: see transitions.request_cancel."""
        async with self._write() as conn:
            return await transitions.request_cancel(conn, self.dialect, job_id, now=now)

    async def retry(self, job_id: str, *, now: dt.datetime) -> jobs.Job:
        """`jobs retry`: see transitions.retry (resumes a local failure at its step)."""
        async with self._write() as conn:
            return await transitions.retry(conn, self.dialect, job_id, now=now)

    # -- workers and leases --------------------------------------------------------------------
    async def register_worker(
        self, worker_id: str, *, host: str, pid: int, now: dt.datetime,
        lease_s: float | None = None,
    ) -> None:
        """Record this daemon; with `lease_s`, raise WorkerIdInUse if another live daemon has
        this id (see claims.register_worker, and claims' docstring on lease time)."""
        async with self._write() as conn:
            await claims.register_worker(conn, self.dialect, worker_id, host=host, pid=pid,
                                         now=now, lease_s=lease_s)

    async def clock_skew_s(self, *, now: dt.datetime) -> float:
        """How far the database's clock is ahead of `now` (negative: behind), in seconds.
        A daemon whose clock trails the database's by a good part of `lease_s` writes leases
        that others may see expire early: worth a warning, or a refusal to start."""
        async with self._read() as conn:
            return (await claims.db_now(conn, self.dialect) - now).total_seconds()

    async def heartbeat(
        self, worker_id: str, *, now: dt.datetime, lease_s: float,
        heartbeat_s: float | None = None,
    ) -> int:
        """Renew this worker's leases (one UPDATE; with `heartbeat_s` only those near expiry,
        see claims.heartbeat) and its workers row. Returns how many leases were renewed."""
        async with self._write() as conn:
            return await claims.heartbeat(conn, self.dialect, worker_id, now=now,
                                          lease_s=lease_s, heartbeat_s=heartbeat_s)

    async def release(self, worker_id: str, *, now: dt.datetime) -> int:
        """Graceful stop: free this worker's leases (attempts - 1, a clean stop is no crash)."""
        async with self._write() as conn:
            return await claims.release(conn, self.dialect, worker_id, now=now)

    # -- intake and claims ---------------------------------------------------------------------
    async def create_job(
        self, new: jobs.NewJob, *, worker_id: str, now: dt.datetime, lease_s: float
    ) -> jobs.Job | None:
        """Insert in CLAIMED, leased to `worker_id`, attempts 1, with a 'claimed' event.
        None if `claim_key` is taken (the file was claimed already, maybe by another host)."""
        made = await self.create_jobs([new], worker_id=worker_id, now=now, lease_s=lease_s)
        return made[0] if made else None

    async def create_jobs(
        self, news: Sequence[jobs.NewJob], *, worker_id: str, now: dt.datetime, lease_s: float
    ) -> list[jobs.Job]:
        """`create_job` for many files in one transaction: a burst of files dropped at once
        costs one commit. Returns the jobs made; taken claim keys are skipped."""
        if not news:
            return []
        async with self._write() as conn:
            return await claims.create_jobs(conn, self.dialect, news, worker_id=worker_id,
                                            now=now, lease_s=lease_s)

    async def enqueue(self, paths: Sequence[str], *, service: str, now: dt.datetime) -> list[int]:
        """Insert queue-table rows; returns their ids."""
        if not paths:
            return []
        async with self._write() as conn:
            return await claims.enqueue(conn, paths, service=service, now=now)

    async def claim_queue(
        self,
        *,
        worker_id: str,
        now: dt.datetime,
        lease_s: float,
        limit: int,
        make_job: Callable[[jobs.QueueItem], jobs.NewJob],
    ) -> list[jobs.Job]:
        """See claims.claim_queue."""
        if limit <= 0:
            return []
        async with self._write() as conn:
            return await claims.claim_queue(conn, self.dialect, worker_id=worker_id, now=now,
                                            lease_s=lease_s, limit=limit, make_job=make_job)

    async def claim_due(
        self, *, worker_id: str, now: dt.datetime, lease_s: float, limit: int
    ) -> list[jobs.Job]:
        """See claims.claim_due."""
        if limit <= 0:
            return []
        async with self._write() as conn:
            return await claims.claim_due(conn, self.dialect, worker_id=worker_id, now=now,
                                          lease_s=lease_s, limit=limit)

    # -- reading -------------------------------------------------------------------------------
    async def get_job(self, id_or_prefix: str) -> jobs.Job:
        """Raise NotFound, or InvalidState if a prefix is ambiguous."""
        async with self._read() as conn:
            return await queries.resolve(conn, id_or_prefix)

    async def list_jobs(
        self,
        *,
        state: lifecycle.JobState | None = None,
        service: str | None = None,
        limit: int = 100,
    ) -> list[jobs.Job]:
        """Newest first."""
        async with self._read() as conn:
            return await queries.list_jobs(conn, state=state, service=service, limit=limit)

    async def events(self, job_id: str) -> list[jobs.JobEvent]:
        async with self._read() as conn:
            return await queries.events(conn, job_id)

    async def count_by_state(self) -> dict[lifecycle.JobState, int]:
        """Every state, zero included (so a gauge drops back to 0)."""
        async with self._read() as conn:
            return await queries.count_by_state(conn)

    async def oldest_active(self) -> jobs.Job | None:
        async with self._read() as conn:
            return await queries.oldest_active(conn)

    async def leased_jobs(self, worker_id: str) -> list[jobs.Job]:
        """Active jobs leased to `worker_id` (for its self-check)."""
        async with self._read() as conn:
            return await queries.leased_jobs(conn, worker_id)

    async def leased_job_ids(self, worker_id: str) -> set[str]:
        """The ids of `leased_jobs` (cheap enough to ask every self-check)."""
        async with self._read() as conn:
            return await queries.leased_job_ids(conn, worker_id)

    async def leased_jobs_among(self, worker_id: str, ids: Sequence[str]) -> list[jobs.Job]:
        """`leased_jobs`, only those with these ids."""
        if not ids:
            return []
        async with self._read() as conn:
            return await queries.leased_jobs_among(conn, self.dialect, worker_id, ids)

    async def history(self, *, limit: int = 1000) -> list[dict[str, Any]]:
        """Rows of the `job_history` view, newest first."""
        async with self._read() as conn:
            return await queries.history(conn, limit=limit)
