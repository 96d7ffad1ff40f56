"""The one module that owns SQL (DESIGN.md style 4).

Every state change is one guarded UPDATE
    ... WHERE id = :id AND state = :expected AND lease_owner = :me
plus a `job_events` row, in one transaction. Zero rows changed means the lease was lost.
Works on SQLite (WAL, busy_timeout) and PostgreSQL (FOR UPDATE SKIP LOCKED) alike.

SQLite has one writer at a time: write transactions start with BEGIN IMMEDIATE (engine.py), so
two processes on one file serialise at BEGIN, and inside one process an asyncio lock queues the
writers instead of letting them spin in SQLite's busy handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext import asyncio as sa_asyncio

from orchestrator import errors, jobs, lifecycle, redact
from orchestrator.db import engine as db_engine
from orchestrator.db import migrate, tables

_JOBS = tables.jobs
_EVENTS = tables.job_events
_QUEUE = tables.queue
_WORKERS = tables.workers

_JOB_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(jobs.Job))
#: The guard's own columns: a Transition may not set them through `fields`.
_GUARD_FIELDS = frozenset({"id", "state", "lease_owner"})
_SETTABLE_FIELDS = frozenset(_JOB_FIELDS) - _GUARD_FIELDS
_JSON_FIELDS = frozenset({"result_refs", "outputs"})
_STATE_VALUES = frozenset(s.value for s in lifecycle.JobState)
_ACTIVE = sorted(s.value for s in lifecycle.ACTIVE_STATES)
_MIN_PREFIX = 4
_HEX = re.compile(r"^[0-9a-f]+$")
#: SQLite allows 32,766 bound parameters per statement; stay well below it.
_IN_CHUNK = 5_000


class LeaseLost(errors.OrchestratorError):
    """A guarded update changed no row: another worker (or a person) owns the job now."""


class NotFound(errors.OrchestratorError):
    """No job with that id (or id prefix)."""


class InvalidState(errors.OrchestratorError):
    """The job is not in a state that allows the requested action."""


class Repository:
    def __init__(self, engine: sa_asyncio.AsyncEngine) -> None:
        self._engine = engine
        self._read_engine = engine.execution_options(**{db_engine.READ_ONLY: True})
        self._sqlite = db_engine.is_sqlite(engine)
        self._write_lock = asyncio.Lock() if self._sqlite else None
        # Statements built once: values go in as parameters, so the compiled form is cached.
        self._insert_job = (
            self._insert(_JOBS)
            .on_conflict_do_nothing(index_elements=[_JOBS.c.claim_key])
            .returning(_JOBS.c.id)
        )

    @classmethod
    async def open(cls, url: str, *, password: str | None = None) -> Repository:
        """Create the engine (SQLite: WAL, busy_timeout, foreign keys) and return a repository."""
        return cls(db_engine.create_engine(url, password=password))

    async def close(self) -> None:
        await self._engine.dispose()

    async def check_schema(self) -> None:
        """Raise errors.DatabaseVersionError unless the database is at this program's head."""
        await migrate.check(self._engine)

    # -- plumbing ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[sa_asyncio.AsyncConnection]:
        if self._write_lock is None:
            async with self._engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._engine.begin() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[sa_asyncio.AsyncConnection]:
        async with self._read_engine.connect() as conn:
            yield conn

    def _insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT, which knows ON CONFLICT."""
        if self._sqlite:
            return sqlite_dialect.insert(table)
        return postgresql.insert(table)

    def _id_in(self, column: sa.ColumnElement[str], ids: Sequence[str]) -> sa.ColumnElement[bool]:
        if self._sqlite:
            return column.in_(ids)
        # One array parameter: one prepared statement whatever the batch size.
        return column == sa.any_(sa.bindparam("ids", list(ids), type_=postgresql.ARRAY(sa.Text)))

    def _owned_by(self, worker_id: str) -> sa.ColumnElement[bool]:
        """The active jobs leased to `worker_id`. On PostgreSQL the rows are locked in id order
        first, the order `apply` locks them in, so a heartbeat and a batch write of the same
        worker cannot deadlock."""
        owned = sa.and_(_JOBS.c.lease_owner == worker_id, _JOBS.c.state.in_(_ACTIVE))
        if self._sqlite:
            return owned
        locked = sa.select(_JOBS.c.id).where(owned).order_by(_JOBS.c.id).with_for_update()
        return _JOBS.c.id.in_(locked.scalar_subquery())

    # -- workers and leases ----------------------------------------------------------------
    async def register_worker(
        self, worker_id: str, *, host: str, pid: int, now: dt.datetime
    ) -> None:
        values = {"id": worker_id, "host": host, "pid": pid, "started_at": now,
                  "last_seen_at": now, "stopped_at": None}
        stmt = self._insert(_WORKERS).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[_WORKERS.c.id],
            set_={k: v for k, v in values.items() if k != "id"},
        )
        async with self._write() as conn:
            await conn.execute(stmt)

    async def heartbeat(self, worker_id: str, *, now: dt.datetime, lease_s: float) -> int:
        """Renew every lease this worker holds (one UPDATE) and its workers row."""
        expires = now + dt.timedelta(seconds=lease_s)
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_JOBS)
                .where(self._owned_by(worker_id))
                .values(lease_expires_at=expires)
            )
            await conn.execute(
                sa.update(_WORKERS).where(_WORKERS.c.id == worker_id).values(last_seen_at=now)
            )
        return int(result.rowcount)

    async def release(self, worker_id: str, *, now: dt.datetime) -> int:
        """Graceful stop: free this worker's leases (attempts - 1, a clean stop is no crash)."""
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(_JOBS)
                .where(self._owned_by(worker_id))
                .values(
                    lease_owner=None,
                    lease_expires_at=None,
                    attempts=sa.case((_JOBS.c.attempts > 0, _JOBS.c.attempts - 1), else_=0),
                )
            )
            await conn.execute(
                sa.update(_WORKERS)
                .where(_WORKERS.c.id == worker_id)
                .values(last_seen_at=now, stopped_at=now)
            )
        return int(result.rowcount)

    # -- intake -----------------------------------------------------------------------------
    async def create_job(
        self, new: jobs.NewJob, *, worker_id: str, now: dt.datetime, lease_s: float
    ) -> jobs.Job | None:
        """Insert in CLAIMED, leased to `worker_id`, attempts 1, with a 'claimed' event.
        None if `claim_key` is taken (the file was claimed already, maybe by another host)."""
        values = _new_job_values(new, worker_id=worker_id, now=now, lease_s=lease_s)
        async with self._write() as conn:
            if (await conn.execute(self._insert_job, values)).first() is None:
                return None
            await conn.execute(
                sa.insert(_EVENTS),
                [_event(new.id, now, None, lifecycle.JobState.CLAIMED, worker_id,
                        f"claimed {new.source_path}")],
            )
        return _job(values)

    async def create_jobs(
        self, news: Sequence[jobs.NewJob], *, worker_id: str, now: dt.datetime, lease_s: float
    ) -> list[jobs.Job]:
        """`create_job` for many files in one transaction: a burst of files dropped at once
        costs one commit. Returns the jobs made; taken claim keys are skipped."""
        if not news:
            return []
        values = [_new_job_values(n, worker_id=worker_id, now=now, lease_s=lease_s)
                  for n in news]
        async with self._write() as conn:
            inserted = {r.id for r in await conn.execute(self._insert_job, values)}
            made = [v for v in values if v["id"] in inserted]
            if made:
                await conn.execute(sa.insert(_EVENTS), [
                    _event(v["id"], now, None, lifecycle.JobState.CLAIMED, worker_id,
                           f"claimed {v['source_path']}") for v in made])
        return [_job(v) for v in made]

    async def enqueue(self, paths: Sequence[str], *, service: str, now: dt.datetime) -> list[int]:
        """Insert queue-table rows; returns their ids."""
        if not paths:
            return []
        rows = [{"path": p, "service": service, "created_at": now, "job_id": None} for p in paths]
        stmt = sa.insert(_QUEUE).returning(_QUEUE.c.id, sort_by_parameter_order=True)
        async with self._write() as conn:
            result = await conn.execute(stmt, rows)
            return [int(r.id) for r in result]

    async def claim_queue(
        self,
        *,
        worker_id: str,
        now: dt.datetime,
        lease_s: float,
        limit: int,
        make_job: Callable[[jobs.QueueItem], jobs.NewJob],
    ) -> list[jobs.Job]:
        """Turn up to `limit` unclaimed queue rows into CLAIMED jobs leased to `worker_id`,
        marking each row with its job id, in one transaction (SKIP LOCKED on PostgreSQL).

        A row whose NewJob's claim_key is already taken is marked with the job that holds the
        key (no second job is made for it) and is not returned."""
        if limit <= 0:
            return []
        query = (
            sa.select(_QUEUE).where(_QUEUE.c.job_id.is_(None)).order_by(_QUEUE.c.id).limit(limit)
        )
        if not self._sqlite:
            query = query.with_for_update(skip_locked=True)
        async with self._write() as conn:
            items = [
                jobs.QueueItem(id=r.id, path=r.path, service=r.service,
                               created_at=r.created_at, job_id=None)
                for r in await conn.execute(query)
            ]
            if not items:
                return []
            news = [make_job(item) for item in items]
            values = [_new_job_values(n, worker_id=worker_id, now=now, lease_s=lease_s)
                      for n in news]
            inserted = {r.id for r in await conn.execute(self._insert_job, values)}
            marks = await self._queue_marks(conn, items, news, inserted)
            await conn.execute(
                sa.update(_QUEUE).where(_QUEUE.c.id == sa.bindparam("b_id")), marks
            )
            created = [(item, new) for item, new in zip(items, news, strict=True)
                       if new.id in inserted]
            if created:
                await conn.execute(
                    sa.insert(_EVENTS),
                    [_event(new.id, now, None, lifecycle.JobState.CLAIMED, worker_id,
                            f"claimed queue row {item.id}: {item.path}")
                     for item, new in created],
                )
        return [_job(v) for v in values if v["id"] in inserted]

    async def _queue_marks(
        self,
        conn: sa_asyncio.AsyncConnection,
        items: Sequence[jobs.QueueItem],
        news: Sequence[jobs.NewJob],
        inserted: set[str],
    ) -> list[dict[str, Any]]:
        """queue.job_id for each row: its new job, or the job already holding its claim_key."""
        taken = [n.claim_key for n in news if n.id not in inserted]
        holders: dict[str, str] = {}
        if taken:
            rows = await conn.execute(
                sa.select(_JOBS.c.claim_key, _JOBS.c.id).where(_JOBS.c.claim_key.in_(taken))
            )
            holders = {r.claim_key: r.id for r in rows}
        return [
            {"b_id": item.id,
             "job_id": new.id if new.id in inserted else holders.get(new.claim_key)}
            for item, new in zip(items, news, strict=True)
        ]

    # -- the claim loop ----------------------------------------------------------------------
    async def claim_due(
        self, *, worker_id: str, now: dt.datetime, lease_s: float, limit: int
    ) -> list[jobs.Job]:
        """Claim active jobs with next_run_at <= now whose lease is free or expired:
        lease_owner, lease_expires_at, attempts + 1. A takeover of an expired lease writes an
        event naming the previous owner. Returned in next_run_at order."""
        if limit <= 0:
            return []
        query = (
            sa.select(_JOBS.c.id, _JOBS.c.state, _JOBS.c.lease_owner)
            .where(
                _JOBS.c.state.in_(_ACTIVE),
                _JOBS.c.next_run_at <= now,
                sa.or_(_JOBS.c.lease_owner.is_(None), _JOBS.c.lease_expires_at < now),
            )
            .order_by(_JOBS.c.next_run_at)
            .limit(limit)
        )
        if not self._sqlite:
            query = query.with_for_update(skip_locked=True)
        async with self._write() as conn:
            picked = (await conn.execute(query)).all()
            if not picked:
                return []
            ids = [r.id for r in picked]
            claimed: list[jobs.Job] = []
            for chunk in _chunks(ids, _IN_CHUNK if self._sqlite else len(ids)):
                rows = await conn.execute(
                    sa.update(_JOBS)
                    .where(self._id_in(_JOBS.c.id, chunk))
                    .values(
                        lease_owner=worker_id,
                        lease_expires_at=now + dt.timedelta(seconds=lease_s),
                        attempts=_JOBS.c.attempts + 1,
                    )
                    .returning(*_JOBS.c)
                )
                claimed += [_job(r._mapping) for r in rows]
            takeovers = [
                _event(r.id, now, r.state, r.state, worker_id,
                       f"lease of {r.lease_owner} expired; taken over by {worker_id}")
                for r in picked
                if r.lease_owner is not None and r.lease_owner != worker_id
            ]
            if takeovers:
                await conn.execute(sa.insert(_EVENTS), takeovers)
        claimed.sort(key=lambda j: (j.next_run_at, j.id))
        return claimed

    async def transition(
        self, t: jobs.Transition, *, worker_id: str, now: dt.datetime
    ) -> jobs.Job:
        """Apply one guarded transition with its event; raise LeaseLost if no row matched.
        Terminal states free the lease."""
        params = {**_transition_values(t, now),
                  "b_id": t.job_id, "b_expected": t.expected.value, "b_owner": worker_id}
        async with self._write() as conn:
            row = (await conn.execute(_GUARDED_UPDATE_RETURNING, params)).first()
            if row is None:
                raise LeaseLost(await self._lost_reason(conn, t.job_id, t.expected, worker_id))
            await conn.execute(
                sa.insert(_EVENTS),
                [_event(t.job_id, now, t.expected, t.to, worker_id, t.message)],
            )
        return _job(row._mapping)

    async def _lost_reason(
        self,
        conn: sa_asyncio.AsyncConnection,
        job_id: str,
        expected: lifecycle.JobState,
        worker_id: str,
    ) -> str:
        row = (
            await conn.execute(
                sa.select(_JOBS.c.state, _JOBS.c.lease_owner).where(_JOBS.c.id == job_id)
            )
        ).first()
        want = f"job {job_id[:8]}: expected state {expected} leased to {worker_id}"
        if row is None:
            return f"{want}; no such job"
        return f"{want}; found state {row.state} leased to {row.lease_owner}"

    async def apply(
        self,
        transitions: Sequence[jobs.Transition],
        reschedules: Sequence[jobs.Reschedule],
        *,
        worker_id: str,
        now: dt.datetime,
    ) -> set[str]:
        """Batch form of `transition` plus poll reschedules, in one transaction.
        Returns the ids whose lease was lost (their changes were not applied).

        Items are applied in order, transitions first; a job may appear more than once (each
        item's guard sees the state the earlier ones left)."""
        items: list[jobs.Transition | jobs.Reschedule] = [*transitions, *reschedules]
        applied = await self.apply_in_order(items, worker_id=worker_id, now=now)
        lost = {item.job_id for item, ok in zip(items, applied, strict=True) if not ok}
        return lost

    async def apply_in_order(
        self,
        items: Sequence[jobs.Transition | jobs.Reschedule],
        *,
        worker_id: str,
        now: dt.datetime,
    ) -> list[bool]:
        """Like `apply`, for a mixed batch in the order the changes were made; returns, per
        item, whether it was applied. The batch writer uses this: a job's reschedule and the
        transition that followed it can share one batch, and each must see the other."""
        if not items:
            return []
        async with self._write() as conn:
            current = await self._guarded_rows(conn, {i.job_id for i in items}, worker_id)
            plan = _Plan.make(items, current, worker_id=worker_id, now=now)
            for round_ in plan.rounds:
                if self._sqlite:
                    for stmt, params in round_.statements():
                        await conn.execute(stmt, params)
                else:
                    for pg_stmt in round_.pg_statements(worker_id):
                        await conn.execute(pg_stmt)
            if plan.events:
                await conn.execute(sa.insert(_EVENTS), plan.events)
        return [i not in plan.lost_items for i in range(len(items))]

    async def _guarded_rows(
        self, conn: sa_asyncio.AsyncConnection, ids: Iterable[str], worker_id: str
    ) -> dict[str, tuple[str, str | None]]:
        """id -> (state, bes_status) of the given jobs this worker holds, locked on PostgreSQL."""
        out: dict[str, tuple[str, str | None]] = {}
        for chunk in _chunks(sorted(ids), _IN_CHUNK):
            query = (
                sa.select(_JOBS.c.id, _JOBS.c.state, _JOBS.c.bes_status)
                .where(self._id_in(_JOBS.c.id, chunk), _JOBS.c.lease_owner == worker_id)
                .order_by(_JOBS.c.id)
            )
            if not self._sqlite:
                # Held until commit: no one can take the lease between this read and the
                # writes. Locked in id order, like `_owned_by`, so the two cannot deadlock.
                query = query.with_for_update()
            for r in await conn.execute(query):
                out[r.id] = (r.state, r.bes_status)
        return out

    # -- people's actions -------------------------------------------------------------------
    async def request_cancel(self, job_id: str, *, now: dt.datetime) -> jobs.Job:
        """Any non-terminal job -> CANCELLING with the lease freed, so whichever worker claims
        it next runs the cancel step. Raise InvalidState if it already ended.

        A job already CANCELLING is returned unchanged; a FAILING one (lifecycle.can_cancel)
        raises InvalidState: it is ending already. Accepts an id prefix like `get_job`."""
        async with self._write() as conn:
            job = _job((await self._resolve(conn, job_id, lock=True))._mapping)
            if job.state is lifecycle.JobState.CANCELLING:
                return job
            if not lifecycle.can_cancel(job.state):
                raise InvalidState(f"job {job.short_id} is {job.state}: it cannot be cancelled")
            values = {
                "state": lifecycle.JobState.CANCELLING.value,
                "cancel_requested": True,
                "lease_owner": None,
                "lease_expires_at": None,
                "next_run_at": now,
                "updated_at": now,
            }
            return await self._person_update(conn, job, values, now, "cancel requested")

    async def retry(self, job_id: str, *, now: dt.datetime) -> jobs.Job:
        """FAILED/CANCELLED -> CLAIMED with source_path = current input_path, runs + 1,
        attempts 0, BES fields, error and outputs cleared. Raise InvalidState otherwise.
        Accepts an id prefix like `get_job`."""
        async with self._write() as conn:
            job = _job((await self._resolve(conn, job_id, lock=True))._mapping)
            if not lifecycle.can_retry(job.state):
                raise InvalidState(
                    f"job {job.short_id} is {job.state}: only failed or cancelled jobs are retried"
                )
            values: dict[str, Any] = {
                **_FRESH_RUN,
                "state": lifecycle.JobState.CLAIMED.value,
                "source_path": job.input_path,
                "runs": job.runs + 1,
                "attempts": 0,
                "lease_owner": None,
                "lease_expires_at": None,
                "next_run_at": now,
                "updated_at": now,
            }
            return await self._person_update(conn, job, values, now, "retry requested")

    async def _person_update(
        self,
        conn: sa_asyncio.AsyncConnection,
        job: jobs.Job,
        values: Mapping[str, Any],
        now: dt.datetime,
        message: str,
    ) -> jobs.Job:
        """A person's action on the row just read (locked: FOR UPDATE, or SQLite's single
        writer), with its event. The lease is not checked: people overrule workers, whose
        next guarded update then finds the state changed and stops (LeaseLost)."""
        row = (
            await conn.execute(
                sa.update(_JOBS)
                .where(_JOBS.c.id == job.id, _JOBS.c.state == job.state.value)
                .values(dict(values))
                .returning(*_JOBS.c)
            )
        ).first()
        if row is None:  # pragma: no cover - the row is locked (PG) or the writer is us (SQLite)
            raise InvalidState(f"job {job.short_id} changed meanwhile; try again")
        updated = _job(row._mapping)
        await conn.execute(
            sa.insert(_EVENTS), [_event(job.id, now, job.state, updated.state, None, message)]
        )
        return updated

    # -- reading ------------------------------------------------------------------------------
    async def _resolve(
        self, conn: sa_asyncio.AsyncConnection, id_or_prefix: str, *, lock: bool = False
    ) -> sa.Row[Any]:
        key = id_or_prefix.strip().lower()
        if len(key) < _MIN_PREFIX or not _HEX.match(key):
            raise NotFound(
                f"no job {id_or_prefix!r}: give the job id or at least {_MIN_PREFIX} of its "
                "leading hex digits"
            )
        where = _JOBS.c.id == key if len(key) >= 32 else _JOBS.c.id.like(f"{key}%")
        query = sa.select(_JOBS).where(where).limit(2)
        if lock and not self._sqlite:
            query = query.with_for_update()
        rows = (await conn.execute(query)).all()
        if not rows:
            raise NotFound(f"no job {id_or_prefix!r}")
        if len(rows) > 1:
            raise InvalidState(f"job id prefix {id_or_prefix!r} is ambiguous: give more digits")
        return rows[0]

    async def get_job(self, id_or_prefix: str) -> jobs.Job:
        """Raise NotFound, or InvalidState if a prefix is ambiguous."""
        async with self._read() as conn:
            return _job((await self._resolve(conn, id_or_prefix))._mapping)

    async def list_jobs(
        self,
        *,
        state: lifecycle.JobState | None = None,
        service: str | None = None,
        limit: int = 100,
    ) -> list[jobs.Job]:
        """Newest first."""
        query = sa.select(_JOBS).order_by(_JOBS.c.created_at.desc(), _JOBS.c.id.desc())
        if state is not None:
            query = query.where(_JOBS.c.state == state.value)
        if service is not None:
            query = query.where(_JOBS.c.service == service)
        async with self._read() as conn:
            return [_job(r._mapping) for r in await conn.execute(query.limit(limit))]

    async def events(self, job_id: str) -> list[jobs.JobEvent]:
        query = sa.select(_EVENTS).where(_EVENTS.c.job_id == job_id).order_by(_EVENTS.c.id)
        async with self._read() as conn:
            return [
                jobs.JobEvent(
                    id=r.id,
                    job_id=r.job_id,
                    at=r.at,
                    from_state=None if r.from_state is None else lifecycle.JobState(r.from_state),
                    to_state=lifecycle.JobState(r.to_state),
                    worker=r.worker,
                    message=r.message,
                )
                for r in await conn.execute(query)
            ]

    async def count_by_state(self) -> dict[lifecycle.JobState, int]:
        """Every state, zero included (so a gauge drops back to 0)."""
        query = sa.select(_JOBS.c.state, sa.func.count()).group_by(_JOBS.c.state)
        counts = dict.fromkeys(lifecycle.JobState, 0)
        async with self._read() as conn:
            for state, n in await conn.execute(query):
                if state in _STATE_VALUES:  # else a newer program's state: not ours to count
                    counts[lifecycle.JobState(state)] = int(n)
        return counts

    async def oldest_active(self) -> jobs.Job | None:
        query = (
            sa.select(_JOBS)
            .where(_JOBS.c.state.in_(_ACTIVE))
            .order_by(_JOBS.c.created_at, _JOBS.c.id)
            .limit(1)
        )
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else _job(row._mapping)

    async def history(self, *, limit: int = 1000) -> list[dict[str, Any]]:
        """Rows of the `job_history` view, newest first."""
        query = sa.text(
            f"SELECT * FROM {tables.JOB_HISTORY_VIEW} "
            "ORDER BY created_at DESC, job_id DESC LIMIT :limit"
        )
        async with self._read() as conn:
            return [dict(r._mapping) for r in await conn.execute(query, {"limit": limit})]


# -- batch planning (pure) -------------------------------------------------------------------
_TRANSITION_GUARD = sa.and_(
    _JOBS.c.id == sa.bindparam("b_id"),
    _JOBS.c.state == sa.bindparam("b_expected"),
    _JOBS.c.lease_owner == sa.bindparam("b_owner"),
)
#: SET columns come from the parameter names (as in executemany): one cached statement.
_GUARDED_UPDATE_RETURNING = sa.update(_JOBS).where(_TRANSITION_GUARD).returning(*_JOBS.c)


@dataclasses.dataclass
class _Round:
    """Updates that touch each job at most once, so they can run as executemany batches."""

    #: SET column names -> parameter sets; executemany needs the same keys in every set.
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def add(self, values: dict[str, Any], guard: dict[str, Any]) -> None:
        self.groups.setdefault(tuple(sorted(values)), []).append({**values, **guard})

    def statements(self) -> list[tuple[sa.Update, list[dict[str, Any]]]]:
        """executemany: one guarded UPDATE per parameter set (SQLite runs these in-process)."""
        return [(sa.update(_JOBS).where(_TRANSITION_GUARD), params)
                for params in self.groups.values()]

    def pg_statements(self, worker_id: str) -> list[sa.Update]:
        """PostgreSQL: one `UPDATE … FROM unnest(arrays)` per group, not one statement per row
        (asyncpg's executemany of 1,000 updates took ~140-400 ms; this takes a few)."""
        out = []
        for columns, params in self.groups.items():
            names = ("b_id", "b_expected", *columns)
            arrays = [
                sa.bindparam(f"a_{name}", [p[name] for p in params],
                             type_=postgresql.ARRAY(_array_item_type(name)))
                for name in names
            ]
            rows = sa.func.unnest(*arrays).table_valued(*names).render_derived(name="v")
            out.append(
                sa.update(_JOBS)
                .where(
                    _JOBS.c.id == rows.c.b_id,
                    _JOBS.c.state == rows.c.b_expected,
                    _JOBS.c.lease_owner == worker_id,
                )
                .values({name: rows.c[name] for name in columns})
            )
        return out


def _array_item_type(name: str) -> sa.types.TypeEngine[Any]:
    if name in ("b_id", "b_expected"):
        return sa.Text()
    # ARRAY applies the item type's bind processing (UTCDateTime's checks) to each element.
    column_type: sa.types.TypeEngine[Any] = _JOBS.c[name].type
    return column_type


@dataclasses.dataclass
class _Plan:
    rounds: list[_Round]
    events: list[dict[str, Any]]
    lost: set[str]
    #: Positions (in the items given) whose guard failed.
    lost_items: set[int] = dataclasses.field(default_factory=set)

    @classmethod
    def make(
        cls,
        items: Sequence[jobs.Transition | jobs.Reschedule],
        current: dict[str, tuple[str, str | None]],
        *,
        worker_id: str,
        now: dt.datetime,
    ) -> _Plan:
        """Check each item's guard against the rows read (and the items before it), and sort
        the passing ones into rounds: the n-th change of a job goes into round n."""
        plan = cls(rounds=[], events=[], lost=set())
        state = dict(current)
        applied: dict[str, int] = {}
        for index, item in enumerate(items):
            now_state = state.get(item.job_id)
            if now_state is None or now_state[0] != item.expected.value:
                plan.lost.add(item.job_id)
                plan.lost_items.add(index)
                continue
            n = applied.get(item.job_id, 0)
            applied[item.job_id] = n + 1
            if n == len(plan.rounds):
                plan.rounds.append(_Round())
            guard = {"b_id": item.job_id, "b_expected": item.expected.value, "b_owner": worker_id}
            if isinstance(item, jobs.Transition):
                values = _transition_values(item, now)
                plan.rounds[n].add(values, guard)
                plan.events.append(
                    _event(item.job_id, now, item.expected, item.to, worker_id, item.message)
                )
                if lifecycle.is_terminal(item.to):
                    del state[item.job_id]  # the lease is freed: nothing later may touch it
                else:
                    state[item.job_id] = (item.to.value, values.get("bes_status", now_state[1]))
                continue
            plan.rounds[n].add(
                {"next_run_at": item.next_run_at, "bes_status": item.bes_status,
                 "poll_count": item.poll_count, "updated_at": now},
                guard,
            )
            if item.bes_status != now_state[1]:
                plan.events.append(
                    _event(item.job_id, now, item.expected, item.expected, worker_id,
                           f"BES status {now_state[1]} -> {item.bes_status}")
                )
            state[item.job_id] = (now_state[0], item.bes_status)
        return plan


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i:i + size] for i in range(0, len(items), max(size, 1))]


# -- rows <-> records ------------------------------------------------------------------------
#: What every run of a job starts from (a new job, and `retry`): nothing remote, no result.
_FRESH_RUN: dict[str, Any] = {
    "bes_job_id": None,
    "bes_status": None,
    "result_refs": "{}",
    "outputs": "{}",
    "error": None,
    "error_code": None,
    "poll_count": 0,
    "resubmits": 0,
    "cancel_requested": False,
    "submitted_at": None,
    "started_at": None,
    "finished_at": None,
    "deadline_at": None,
}

def _new_job_values(
    new: jobs.NewJob, *, worker_id: str, now: dt.datetime, lease_s: float
) -> dict[str, Any]:
    return {
        "id": new.id,
        "state": lifecycle.JobState.CLAIMED.value,
        "service": new.service,
        "watch": new.watch,
        "claim_key": new.claim_key,
        "source_path": new.source_path,
        "input_name": new.input_name,
        "input_path": new.source_path,
        "input_sha256": None,
        "input_size": None,
        "output_dir": new.output_dir,
        "archive_dir": new.archive_dir,
        "failed_dir": new.failed_dir,
        **_FRESH_RUN,
        "attempts": 1,
        "runs": 1,
        "lease_owner": worker_id,
        "lease_expires_at": now + dt.timedelta(seconds=lease_s),
        "next_run_at": now,
        "created_at": now,
        "updated_at": now,
    }


def _job(m: Mapping[Any, Any]) -> jobs.Job:
    """A Job from a jobs row (or the values just inserted: same shape)."""
    kw = {name: m[name] for name in _JOB_FIELDS}
    kw["state"] = lifecycle.JobState(kw["state"])
    kw["result_refs"] = json.loads(kw["result_refs"] or "{}")
    kw["outputs"] = json.loads(kw["outputs"] or "{}")
    kw["cancel_requested"] = bool(kw["cancel_requested"])
    return jobs.Job(**kw)


def _encode(name: str, value: object) -> object:
    if name not in _SETTABLE_FIELDS:
        raise ValueError(f"a transition cannot set {name!r}")
    if name in _JSON_FIELDS:
        if not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping, not {type(value).__name__}")
        return redact.redact(json.dumps(dict(value), sort_keys=True))
    if isinstance(value, lifecycle.JobState):
        return value.value
    if isinstance(value, str):
        return redact.redact(value)  # belt and braces: no SAS signature or key is ever stored
    return value


def _transition_values(t: jobs.Transition, now: dt.datetime) -> dict[str, Any]:
    values = {name: _encode(name, value) for name, value in t.fields.items()}
    values["state"] = t.to.value
    values["updated_at"] = now
    values["next_run_at"] = t.next_run_at or values.get("next_run_at") or now
    if lifecycle.is_terminal(t.to):
        values["lease_owner"] = None
        values["lease_expires_at"] = None
        if values.get("finished_at") is None:
            values["finished_at"] = now
    return values


def _event(
    job_id: str,
    at: dt.datetime,
    from_state: lifecycle.JobState | str | None,
    to_state: lifecycle.JobState | str,
    worker: str | None,
    message: str,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "at": at,
        "from_state": None if from_state is None else str(from_state),
        "to_state": str(to_state),
        "worker": worker,
        "message": redact.redact(message),
    }
