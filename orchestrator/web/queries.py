"""Read-only queries for the status page and the scrape-time gauges (SQLAlchemy Core).

Each runs on the repository's read-only engine and touches no row it does not show: aggregates
are computed by the database (GROUP BY) so a table holding a million finished jobs sends back a
few dozen rows, not a million.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext import asyncio as sa_asyncio

from orchestrator import lifecycle, metrics
from orchestrator.db import repository, tables

_JOBS = tables.jobs
_ACTIVE = sorted(s.value for s in lifecycle.ACTIVE_STATES)
_TERMINAL = sorted(s.value for s in lifecycle.TERMINAL_STATES)
_STATES = [s.value for s in lifecycle.JobState]


def read_engine(repo: repository.Repository) -> sa_asyncio.AsyncEngine:
    """The repository's read-only engine (no public accessor yet; the page only reads)."""
    engine = getattr(repo, "read_engine", None) or repo._read_engine
    assert isinstance(engine, sa_asyncio.AsyncEngine)
    return engine


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobRow:
    """The columns the page shows for one job."""

    id: str
    service: str
    state: str
    input_name: str
    bes_status: str | None
    error: str | None
    error_code: str | None
    attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None


_ROW_COLUMNS = [_JOBS.c[f.name] for f in dataclasses.fields(JobRow)]


def _rows(result: Iterable[Any]) -> list[JobRow]:
    return [JobRow(**dict(r._mapping)) for r in result]


async def active_counts(
    engine: sa_asyncio.AsyncEngine,
) -> list[tuple[str, str, str | None, int, dt.datetime | None, dt.datetime | None]]:
    """(service, state, backend status, jobs, oldest created_at, oldest submitted_at) for the
    unfinished jobs: one pass over them (the state index bounds it by the jobs in flight)."""
    query = (
        sa.select(_JOBS.c.service, _JOBS.c.state, _JOBS.c.bes_status, sa.func.count(),
                  sa.func.min(_JOBS.c.created_at), sa.func.min(_JOBS.c.submitted_at))
        .where(_JOBS.c.state.in_(_ACTIVE))
        .group_by(_JOBS.c.service, _JOBS.c.state, _JOBS.c.bes_status)
    )
    async with engine.connect() as conn:
        return [(r[0], r[1], r[2], int(r[3]), r[4], r[5]) for r in await conn.execute(query)]


async def finished_counts(engine: sa_asyncio.AsyncEngine) -> dict[tuple[str, str], int]:
    """(service, terminal state) -> jobs. A pass over the whole history: callers cache it."""
    query = (
        sa.select(_JOBS.c.service, _JOBS.c.state, sa.func.count())
        .where(_JOBS.c.state.in_(_TERMINAL))
        .group_by(_JOBS.c.service, _JOBS.c.state)
    )
    async with engine.connect() as conn:
        return {(r[0], r[1]): int(r[2]) for r in await conn.execute(query)}


def snapshot(
    active: Iterable[tuple[str, str, str | None, int, dt.datetime | None, dt.datetime | None]],
    finished: Mapping[tuple[str, str], int], *, services: Iterable[str], now: dt.datetime,
    query_s: float,
) -> metrics.DatabaseSnapshot:
    """The gauges' values (pure): zeros for every state of every service seen or configured,
    so a gauge drops back to 0 instead of vanishing."""
    active = list(active)
    seen = {*services, *(r[0] for r in active), *(s for s, _ in finished)}
    counts = {(s, st): 0 for s in seen for st in _STATES}
    counts.update(finished)
    oldest: dict[tuple[str, str], dt.datetime] = {}
    remote: dict[tuple[str, str], int] = {}
    oldest_remote: dict[tuple[str, str], dt.datetime] = {}
    for service, state, status, n, created, submitted in active:
        counts[(service, state)] = counts.get((service, state), 0) + n
        if created is not None:
            key = (service, state)
            oldest[key] = min(created, oldest.get(key, created))
        if status is not None:
            rkey = (service, status)
            remote[rkey] = remote.get(rkey, 0) + n
            if submitted is not None:
                oldest_remote[rkey] = min(submitted, oldest_remote.get(rkey, submitted))

    def ages(firsts: Mapping[tuple[str, str], dt.datetime]) -> dict[tuple[str, str], float]:
        return {k: max(0.0, (now - v).total_seconds()) for k, v in firsts.items()}

    return metrics.DatabaseSnapshot(
        jobs=counts, oldest_age_s=ages(oldest), remote=remote,
        oldest_remote_age_s=ages(oldest_remote), query_s=query_s)


async def database_snapshot(
    engine: sa_asyncio.AsyncEngine, *, services: Iterable[str], now: dt.datetime
) -> metrics.DatabaseSnapshot:
    """Both queries, uncached (tests, the CLI)."""
    started = time.perf_counter()
    active = await active_counts(engine)
    finished = await finished_counts(engine)
    return snapshot(active, finished, services=services, now=now,
                    query_s=time.perf_counter() - started)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinuteCount:
    minute: dt.datetime  #: the minute's start, UTC
    done: int
    failed: int  #: failed or cancelled


def _minute_expr(engine: sa_asyncio.AsyncEngine) -> sa.ColumnElement[Any]:
    if engine.dialect.name == "sqlite":
        # Stored as fixed-width UTC text 'YYYY-MM-DD HH:MM:SS.ffffff': its first 16 characters.
        return sa.func.substr(sa.cast(_JOBS.c.finished_at, sa.Text), 1, 16)
    return sa.func.to_char(
        sa.func.date_trunc("minute", sa.func.timezone("UTC", _JOBS.c.finished_at)),
        "YYYY-MM-DD HH24:MI")


async def files_per_minute(
    engine: sa_asyncio.AsyncEngine, *, now: dt.datetime, minutes: int = 60
) -> list[MinuteCount]:
    """Jobs that ended in each of the last `minutes` minutes (the current one included)."""
    end = now.replace(second=0, microsecond=0)
    start = end - dt.timedelta(minutes=minutes - 1)
    minute = _minute_expr(engine).label("minute")
    ok = sa.func.sum(sa.case((_JOBS.c.state == lifecycle.JobState.DONE.value, 1), else_=0))
    query = (
        sa.select(minute, ok, sa.func.count())
        .where(_JOBS.c.state.in_(_TERMINAL), _JOBS.c.finished_at >= start)
        .group_by(minute)
    )
    async with engine.connect() as conn:
        got = {str(m): (int(d or 0), int(n)) for m, d, n in await conn.execute(query)}
    out = []
    for i in range(minutes):
        at = start + dt.timedelta(minutes=i)
        done, total = got.get(at.strftime("%Y-%m-%d %H:%M"), (0, 0))
        out.append(MinuteCount(minute=at, done=done, failed=total - done))
    return out


async def in_flight(engine: sa_asyncio.AsyncEngine, *, limit: int) -> list[JobRow]:
    """Unfinished jobs, oldest first."""
    query = (
        sa.select(*_ROW_COLUMNS).where(_JOBS.c.state.in_(_ACTIVE))
        .order_by(_JOBS.c.created_at, _JOBS.c.id).limit(limit)
    )
    async with engine.connect() as conn:
        return _rows(await conn.execute(query))


async def stuck(
    engine: sa_asyncio.AsyncEngine, *, older_than: dt.datetime, limit: int
) -> tuple[int, list[JobRow]]:
    """Unfinished jobs created before `older_than`: how many, and the oldest `limit`."""
    where = sa.and_(_JOBS.c.state.in_(_ACTIVE), _JOBS.c.created_at < older_than)
    async with engine.connect() as conn:
        n = (await conn.execute(sa.select(sa.func.count()).where(where))).scalar_one()
        rows = _rows(await conn.execute(
            sa.select(*_ROW_COLUMNS).where(where)
            .order_by(_JOBS.c.created_at, _JOBS.c.id).limit(limit)))
    return int(n), rows


async def recent_failures(engine: sa_asyncio.AsyncEngine, *, limit: int) -> list[JobRow]:
    """Failed and cancelled jobs, the latest to end first."""
    query = (
        sa.select(*_ROW_COLUMNS)
        .where(_JOBS.c.state.in_([lifecycle.JobState.FAILED.value,
                                  lifecycle.JobState.CANCELLED.value]))
        .order_by(_JOBS.c.finished_at.desc(), _JOBS.c.id.desc()).limit(limit)
    )
    async with engine.connect() as conn:
        return _rows(await conn.execute(query))


def states() -> Sequence[str]:
    return _STATES
