"""Read-only queries: what the CLI (`status`, `jobs list`, `jobs show`) and the `--once` drain
check ask. They run in read-only transactions and never block a writer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext import asyncio as sa_asyncio

from orchestrator import errors, jobs, lifecycle
from orchestrator.db import dialect as db_dialect
from orchestrator.db import rows, tables

_JOBS = tables.jobs
_EVENTS = tables.job_events
_ACTIVE = sorted(s.value for s in lifecycle.ACTIVE_STATES)


NotFound = errors.NotFound
InvalidState = errors.InvalidState


async def resolve(
    conn: sa_asyncio.AsyncConnection,
    id_or_prefix: str,
    *,
    lock_with: db_dialect.Dialect | None = None,
) -> jobs.Job:
    """The job with this id or unique id prefix; locked for the transaction with `lock_with`.
    Raise NotFound, or InvalidState if a prefix is ambiguous."""
    key = jobs.lookup_key(id_or_prefix)
    where = _JOBS.c.id == key if len(key) >= 32 else _JOBS.c.id.like(f"{key}%")
    query = sa.select(_JOBS).where(where).limit(2)
    if lock_with is not None:
        query = lock_with.lock(query)
    found = [rows.job(r._mapping) for r in await conn.execute(query)]
    return jobs.resolved(id_or_prefix, found)


async def list_jobs(
    conn: sa_asyncio.AsyncConnection,
    *,
    state: lifecycle.JobState | None,
    service: str | None,
    limit: int,
) -> list[jobs.Job]:
    query = sa.select(_JOBS).order_by(_JOBS.c.created_at.desc(), _JOBS.c.id.desc())
    if state is not None:
        query = query.where(_JOBS.c.state == state.value)
    if service is not None:
        query = query.where(_JOBS.c.service == service)
    return [rows.job(r._mapping) for r in await conn.execute(query.limit(limit))]


async def events(conn: sa_asyncio.AsyncConnection, job_id: str) -> list[jobs.JobEvent]:
    query = sa.select(_EVENTS).where(_EVENTS.c.job_id == job_id).order_by(_EVENTS.c.id)
    return [rows.job_event(r._mapping) for r in await conn.execute(query)]


async def count_by_state(conn: sa_asyncio.AsyncConnection) -> dict[lifecycle.JobState, int]:
    query = sa.select(_JOBS.c.state, sa.func.count()).group_by(_JOBS.c.state)
    counts = dict.fromkeys(lifecycle.JobState, 0)
    for state, n in await conn.execute(query):
        if state in rows.STATE_VALUES:  # else a newer program's state: not ours to count
            counts[lifecycle.JobState(state)] = int(n)
    return counts


async def leased_jobs(conn: sa_asyncio.AsyncConnection, worker_id: str) -> list[jobs.Job]:
    """Active jobs whose lease `worker_id` holds (the worker's self-check compares them with
    what it holds in memory)."""
    query = sa.select(_JOBS).where(_JOBS.c.state.in_(_ACTIVE), _JOBS.c.lease_owner == worker_id)
    return [rows.job(r._mapping) for r in await conn.execute(query)]


async def leased_job_ids(conn: sa_asyncio.AsyncConnection, worker_id: str) -> set[str]:
    """The ids of `leased_jobs`: one column, so a worker holding 10,000 jobs reads 10,000
    short strings every self-check instead of building 10,000 records."""
    query = sa.select(_JOBS.c.id).where(_JOBS.c.state.in_(_ACTIVE),
                                        _JOBS.c.lease_owner == worker_id)
    return set((await conn.execute(query)).scalars())


async def leased_jobs_among(
    conn: sa_asyncio.AsyncConnection, dialect: db_dialect.Dialect, worker_id: str,
    ids: Sequence[str],
) -> list[jobs.Job]:
    """`leased_jobs`, only those with these ids."""
    found: list[jobs.Job] = []
    for start in range(0, len(ids), dialect.id_chunk):
        query = sa.select(_JOBS).where(
            dialect.id_in(_JOBS.c.id, ids[start:start + dialect.id_chunk]),
            _JOBS.c.state.in_(_ACTIVE), _JOBS.c.lease_owner == worker_id)
        found.extend(rows.job(r._mapping) for r in await conn.execute(query))
    return found


async def oldest_active(conn: sa_asyncio.AsyncConnection) -> jobs.Job | None:
    query = (
        sa.select(_JOBS)
        .where(_JOBS.c.state.in_(_ACTIVE))
        .order_by(_JOBS.c.created_at, _JOBS.c.id)
        .limit(1)
    )
    row = (await conn.execute(query)).first()
    return None if row is None else rows.job(row._mapping)


async def history(conn: sa_asyncio.AsyncConnection, *, limit: int) -> list[dict[str, Any]]:
    query = sa.text(
        f"SELECT * FROM {tables.JOB_HISTORY_VIEW} "
        "ORDER BY created_at DESC, job_id DESC LIMIT :limit"
    )
    return [dict(r._mapping) for r in await conn.execute(query, {"limit": limit})]


async def failed_from(
    conn: sa_asyncio.AsyncConnection, job_id: str
) -> lifecycle.JobState | None:
    """The state a job was in when it last began to fail (None if it never did)."""
    query = (
        sa.select(_EVENTS.c.from_state)
        .where(_EVENTS.c.job_id == job_id,
               _EVENTS.c.to_state == lifecycle.JobState.FAILING.value,
               _EVENTS.c.from_state != lifecycle.JobState.FAILING.value)
        .order_by(_EVENTS.c.id.desc())
        .limit(1)
    )
    value = (await conn.execute(query)).scalar()
    if value is None or value not in rows.STATE_VALUES:
        return None
    return lifecycle.JobState(value)
