"""Claims and leases: new jobs (files, queue rows), the claim loop, heartbeats, workers.

Lease time. A lease is written as the claimer's `now + lease_s` (what the holder's heartbeat
renews), but it is taken over only when two clocks agree it has expired: the claimer's and the
database's own (PostgreSQL `clock_timestamp()`; for SQLite, whose file is local, the host clock
as SQLite reads it, not the program's). So a host whose wall clock steps forward, or runs
ahead of the others, cannot take leases that are still live: the database's clock, shared by
every host, says they are not. Stored times stay the program's (`now` is passed in), so the
history reads in one clock and tests can pass their own times. The holder's side is its
renewal: heartbeats every `heartbeat_s` (a monotonic interval, well inside `lease_s`) push
forward each expiry that comes within three heartbeats (`heartbeat`); `clock_skew_s` lets a
daemon whose own clock is far behind the database's (its leases would look expired early)
find out at start and at each heartbeat; and a second
daemon with the same worker id is refused at start while the first one's heartbeat is fresh
(`register_worker`), so one id never has two holders.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext import asyncio as sa_asyncio

from orchestrator import errors, jobs, lifecycle
from orchestrator.db import dialect as db_dialect
from orchestrator.db import rows, tables

_JOBS = tables.jobs
_EVENTS = tables.job_events
_QUEUE = tables.queue
_WORKERS = tables.workers
_ACTIVE = sorted(s.value for s in lifecycle.ACTIVE_STATES)


class WorkerIdInUse(errors.ConfigError):
    """Another live daemon (fresh heartbeat, other host or process) runs under this worker id.
    A config error: two daemons sharing one id would each believe they hold the other's
    leases, so the second refuses to start (one line, exit 78)."""

    def __init__(self, worker_id: str, problem: str) -> None:
        super().__init__("daemon.worker_id", problem)
        self.worker_id = worker_id


async def db_now(conn: sa_asyncio.AsyncConnection, dialect: db_dialect.Dialect) -> dt.datetime:
    """The database's clock (see the module docstring)."""
    value = (await conn.execute(sa.select(dialect.clock()))).scalar_one()
    if isinstance(value, str):  # SQLite: the stored text form
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime)
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- workers and leases ------------------------------------------------------------------------
async def register_worker(
    conn: sa_asyncio.AsyncConnection,
    dialect: db_dialect.Dialect,
    worker_id: str,
    *,
    host: str,
    pid: int,
    now: dt.datetime,
    lease_s: float | None,
) -> None:
    """Record this daemon under `worker_id`. With `lease_s`, raise WorkerIdInUse when a row
    with that id was not stopped, belongs to another host or process, and its heartbeat is
    fresher than `lease_s` by this host's clock or the database's (refusing when either says
    so: a false refusal costs one restart, two holders cost a job). On the same host a process
    that no longer exists holds nothing (a crash just before a restart)."""
    if lease_s is not None:
        query = dialect.lock(sa.select(_WORKERS).where(_WORKERS.c.id == worker_id))
        row = (await conn.execute(query)).first()
        if row is not None and row.stopped_at is None and (row.host, row.pid) != (host, pid):
            clock = await db_now(conn, dialect)
            age_s = min((now - row.last_seen_at).total_seconds(),
                        (clock - row.last_seen_at).total_seconds())
            gone = row.host == host and not _pid_alive(row.pid)
            if age_s < lease_s and not gone:
                raise WorkerIdInUse(
                    worker_id,
                    f"worker id {worker_id!r} is in use by a running daemon on {row.host} "
                    f"(pid {row.pid}, heartbeat {max(age_s, 0.0):.0f} s ago): stop it, or "
                    "give this daemon another daemon.worker_id",
                )
    values = {"id": worker_id, "host": host, "pid": pid, "started_at": now,
              "last_seen_at": now, "stopped_at": None}
    stmt = dialect.insert(_WORKERS).values(values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[_WORKERS.c.id],
        set_={k: v for k, v in values.items() if k != "id"},
    )
    await conn.execute(stmt)


#: A heartbeat renews a lease once it has less than this many heartbeat intervals left.
RENEW_WITHIN_HEARTBEATS = 3


def renew_within_s(*, lease_s: float, heartbeat_s: float) -> float:
    """How near its expiry a lease is renewed (see `heartbeat`)."""
    return min(lease_s, RENEW_WITHIN_HEARTBEATS * heartbeat_s)


async def heartbeat(
    conn: sa_asyncio.AsyncConnection,
    dialect: db_dialect.Dialect,
    worker_id: str,
    *,
    now: dt.datetime,
    lease_s: float,
    heartbeat_s: float | None = None,
) -> int:
    """Renew this worker's leases (one UPDATE) and its workers row; returns how many leases
    were renewed (set to `now + lease_s`). Without `heartbeat_s`, every one.

    With `heartbeat_s`, only those with less than `renew_within_s` left, and never to an
    earlier expiry. Rewriting every lease at every beat made the heartbeat's cost follow the
    jobs held (10,000 row updates every 10 s); now a lease is written about once every
    (lease_s - renew_within_s) / heartbeat_s beats (every 3rd with lease 60 s, heartbeat
    10 s). After each heartbeat every held lease has min(lease_s, 3 heartbeats) left or more,
    so the next heartbeat on time finds two intervals left and one that fails still leaves
    about one before the next try: what the default lease (30 s, heartbeat 10 s) always gave,
    and for a lease no longer than 3 heartbeats exactly what was done before (every lease,
    every beat). "Left" is counted by the later of this host's clock and the database's: a
    takeover needs both to call a lease expired, so a host whose clock trails the database's
    renews early, never late."""
    owned = dialect.owned_by(worker_id)
    if heartbeat_s is not None:
        later = max(now, await db_now(conn, dialect))
        within = dt.timedelta(seconds=renew_within_s(lease_s=lease_s, heartbeat_s=heartbeat_s))
        # Capped at the new expiry: a renewal never shortens a lease.
        horizon = min(later + within, now + dt.timedelta(seconds=lease_s))
        owned = dialect.owned_by(worker_id, _JOBS.c.lease_expires_at < horizon)
    result = await conn.execute(
        sa.update(_JOBS)
        .where(owned)
        .values(lease_expires_at=now + dt.timedelta(seconds=lease_s))
    )
    await conn.execute(
        sa.update(_WORKERS).where(_WORKERS.c.id == worker_id).values(last_seen_at=now)
    )
    return int(result.rowcount)


async def release(
    conn: sa_asyncio.AsyncConnection,
    dialect: db_dialect.Dialect,
    worker_id: str,
    *,
    now: dt.datetime,
) -> int:
    """Graceful stop: free this worker's leases (attempts - 1, a clean stop is no crash)."""
    result = await conn.execute(
        sa.update(_JOBS)
        .where(dialect.owned_by(worker_id))
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


# -- intake ------------------------------------------------------------------------------------
def _insert_job(dialect: db_dialect.Dialect) -> Any:
    return (
        dialect.insert(_JOBS)
        .on_conflict_do_nothing(index_elements=[_JOBS.c.claim_key])
        .returning(_JOBS.c.id)
    )


async def create_jobs(
    conn: sa_asyncio.AsyncConnection,
    dialect: db_dialect.Dialect,
    news: Sequence[jobs.NewJob],
    *,
    worker_id: str,
    now: dt.datetime,
    lease_s: float,
) -> list[jobs.Job]:
    """Insert in CLAIMED, leased to `worker_id`, attempts 1, each with a 'claimed' event, in
    one transaction. Returns the jobs made; a taken claim key (the file was claimed already,
    maybe by another host) is skipped."""
    if not news:
        return []
    values = [rows.new_job_values(n, worker_id=worker_id, now=now, lease_s=lease_s)
              for n in news]
    inserted = {r.id for r in await conn.execute(_insert_job(dialect), values)}
    made = [v for v in values if v["id"] in inserted]
    if made:
        await conn.execute(sa.insert(_EVENTS), [
            rows.event(v["id"], now, None, lifecycle.JobState.CLAIMED, worker_id,
                       f"claimed {v['source_path']}") for v in made])
    return [rows.job(v) for v in made]


async def enqueue(
    conn: sa_asyncio.AsyncConnection, paths: Sequence[str], *, service: str, now: dt.datetime
) -> list[int]:
    """Insert queue-table rows; returns their ids."""
    if not paths:
        return []
    values = [{"path": p, "service": service, "created_at": now, "job_id": None} for p in paths]
    stmt = sa.insert(_QUEUE).returning(_QUEUE.c.id, sort_by_parameter_order=True)
    return [int(r.id) for r in await conn.execute(stmt, values)]


async def claim_queue(
    conn: sa_asyncio.AsyncConnection,
    dialect: db_dialect.Dialect,
    *,
    worker_id: str,
    now: dt.datetime,
    lease_s: float,
    limit: int,
    make_job: Callable[[jobs.QueueItem], jobs.NewJob],
) -> list[jobs.Job]:
    """Turn up to `limit` unclaimed queue rows into CLAIMED jobs leased to `worker_id`,
    marking each row with its job id (SKIP LOCKED on PostgreSQL).

    A row whose NewJob's claim_key is already taken is marked with the job that holds the
    key (no second job is made for it) and is not returned."""
    if limit <= 0:
        return []
    query = dialect.lock(
        sa.select(_QUEUE).where(_QUEUE.c.job_id.is_(None)).order_by(_QUEUE.c.id).limit(limit),
        skip_locked=True,
    )
    items = [
        jobs.QueueItem(id=r.id, path=r.path, service=r.service, created_at=r.created_at,
                       job_id=None)
        for r in await conn.execute(query)
    ]
    if not items:
        return []
    news = [make_job(item) for item in items]
    values = [rows.new_job_values(n, worker_id=worker_id, now=now, lease_s=lease_s)
              for n in news]
    inserted = {r.id for r in await conn.execute(_insert_job(dialect), values)}
    taken = [n.claim_key for n in news if n.id not in inserted]
    holders: dict[str, str] = {}
    if taken:
        found = await conn.execute(
            sa.select(_JOBS.c.claim_key, _JOBS.c.id).where(_JOBS.c.claim_key.in_(taken))
        )
        holders = {r.claim_key: r.id for r in found}
    marks = [
        {"b_id": item.id,
         "job_id": new.id if new.id in inserted else holders.get(new.claim_key)}
        for item, new in zip(items, news, strict=True)
    ]
    await conn.execute(sa.update(_QUEUE).where(_QUEUE.c.id == sa.bindparam("b_id")), marks)
    created = [(item, new) for item, new in zip(items, news, strict=True)
               if new.id in inserted]
    if created:
        await conn.execute(
            sa.insert(_EVENTS),
            [rows.event(new.id, now, None, lifecycle.JobState.CLAIMED, worker_id,
                        f"claimed queue row {item.id}: {item.path}")
             for item, new in created],
        )
    return [rows.job(v) for v in values if v["id"] in inserted]


# -- the claim loop ----------------------------------------------------------------------------
async def claim_due(
    conn: sa_asyncio.AsyncConnection,
    dialect: db_dialect.Dialect,
    *,
    worker_id: str,
    now: dt.datetime,
    lease_s: float,
    limit: int,
) -> list[jobs.Job]:
    """Claim active jobs with next_run_at <= now whose lease is free, or expired by both the
    claimer's clock and the database's: lease_owner, lease_expires_at, attempts + 1. A
    takeover writes an event naming the previous owner. Returned in next_run_at order.

    Two queries, not one with `lease_owner IS NULL OR lease_expires_at < …`: no index answers
    the OR, so that query walked every due job held under a live lease (all 10,000 of a busy
    daemon's, every 0.5 s) to find none claimable. The free jobs are read from a partial index
    of unleased rows (ix_jobs_free_due) and the expired leases from a range of
    ix_jobs_lease_expiry that stops at the first live lease; each query takes at most `limit`
    rows in next_run_at order, so the first `limit` of the two together are the first `limit`
    of the OR."""
    if limit <= 0:
        return []
    expired_before = min(now, await db_now(conn, dialect))
    due = (_JOBS.c.state.in_(_ACTIVE), _JOBS.c.next_run_at <= now)
    free = sa.and_(*due, _JOBS.c.lease_owner.is_(None))
    expired = sa.and_(*due, _JOBS.c.lease_expires_at < expired_before)
    found: dict[str, sa.Row[Any]] = {}
    for where in (free, expired):
        query = dialect.lock(
            sa.select(_JOBS.c.id, _JOBS.c.state, _JOBS.c.lease_owner, _JOBS.c.next_run_at)
            .where(where)
            .order_by(_JOBS.c.next_run_at)
            .limit(limit),
            skip_locked=True,
        )
        for r in await conn.execute(query):
            found.setdefault(r.id, r)  # a row both free and expired is read twice
    # On PostgreSQL the rows cut here stay locked until commit: another claimer skips them
    # for this round only.
    picked = sorted(found.values(), key=lambda r: (r.next_run_at, r.id))[:limit]
    if not picked:
        return []
    ids = [r.id for r in picked]
    claimed: list[jobs.Job] = []
    for start in range(0, len(ids), dialect.id_chunk):
        updated = await conn.execute(
            sa.update(_JOBS)
            .where(dialect.id_in(_JOBS.c.id, ids[start:start + dialect.id_chunk]))
            .values(
                lease_owner=worker_id,
                lease_expires_at=now + dt.timedelta(seconds=lease_s),
                attempts=_JOBS.c.attempts + 1,
            )
            .returning(*_JOBS.c)
        )
        claimed += [rows.job(r._mapping) for r in updated]
    takeovers = [
        rows.event(r.id, now, r.state, r.state, worker_id,
                   f"lease of {r.lease_owner} expired; taken over by {worker_id}")
        for r in picked
        if r.lease_owner is not None and r.lease_owner != worker_id
    ]
    if takeovers:
        await conn.execute(sa.insert(_EVENTS), takeovers)
    claimed.sort(key=lambda j: (j.next_run_at, j.id))
    return claimed
