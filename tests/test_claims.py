"""The claim loop's query and the heartbeat against real databases (SQLite and PostgreSQL):
claims read only the claimable jobs (free, or expired leases) through their indexes, and the
heartbeat renews only the leases near expiry while never letting a held one lapse."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from orchestrator import clock, jobs, lifecycle
from orchestrator.db import claims, repository
from tests.test_repository import LEASE_S, T0, make_jobs, new_job, walk

S = lifecycle.JobState
LONG_S = 10_000.0


async def job_due_at(
    repo: repository.Repository, key: str, *, owner: str, lease_s: float, due: dt.datetime,
    now: dt.datetime = T0,
) -> jobs.Job:
    """A CLAIMED job leased to `owner` at `now` for `lease_s`, next due at `due`."""
    job = await repo.create_job(new_job(key), worker_id=owner, now=now, lease_s=lease_s)
    assert job is not None
    await repo.apply([jobs.Reschedule(job_id=job.id, expected=S.CLAIMED, next_run_at=due,
                                      bes_status=None, poll_count=0)],
                     worker_id=owner, now=now)
    return await repo.get_job(job.id)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


# -- claim_due ---------------------------------------------------------------------------------
async def test_claim_due_merges_free_and_expired_in_due_order(
    repo: repository.Repository,
) -> None:
    """Free jobs and expired leases come from two queries: together they are claimed in
    next_run_at order and cut to `limit`; live leases (another worker's, or the claimer's
    own) and jobs not yet due are never taken."""
    free1 = await job_due_at(repo, "free1", owner="gone", lease_s=LEASE_S, due=at(10))
    free2 = await job_due_at(repo, "free2", owner="gone", lease_s=LEASE_S, due=at(30))
    later = await job_due_at(repo, "later", owner="gone", lease_s=LEASE_S, due=at(1000))
    assert await repo.release("gone", now=T0) == 3
    exp1 = await job_due_at(repo, "exp1", owner="w2", lease_s=5, due=at(20))
    exp2 = await job_due_at(repo, "exp2", owner="w2", lease_s=5, due=at(40))
    live = await job_due_at(repo, "live", owner="w3", lease_s=LONG_S, due=at(1))
    mine = await job_due_at(repo, "mine", owner="w1", lease_s=LONG_S, due=at(2))
    [done] = await make_jobs(repo, 1, worker="w4")
    await walk(repo, done, S.DONE, worker_id="w4")
    now = at(100)

    got = await repo.claim_due(worker_id="w1", now=now, lease_s=LEASE_S, limit=3)
    assert [j.id for j in got] == [free1.id, exp1.id, free2.id]
    assert all(j.lease_owner == "w1" for j in got)
    assert all(j.lease_expires_at == now + dt.timedelta(seconds=LEASE_S) for j in got)
    assert [j.attempts for j in got] == [1, 2, 1]  # released (1 -> 0) + 1; taken over: 1 + 1
    assert (await repo.events(exp1.id))[-1].message == "lease of w2 expired; taken over by w1"
    assert all("expired" not in e.message for e in await repo.events(free1.id))

    assert [j.id for j in await repo.claim_due(worker_id="w1", now=now, lease_s=LEASE_S,
                                               limit=10)] == [exp2.id]
    assert await repo.claim_due(worker_id="w1", now=now, lease_s=LEASE_S, limit=10) == []
    assert (await repo.get_job(live.id)).lease_owner == "w3"
    assert (await repo.get_job(mine.id)).attempts == 1  # its own live lease: not re-claimed
    assert (await repo.get_job(later.id)).lease_owner is None
    # At 1000 s `later` is due, and the leases taken at 100 s (30 s) have lapsed: the claimer
    # takes its own back, with no takeover event.
    got = await repo.claim_due(worker_id="w1", now=at(1000), lease_s=LEASE_S, limit=10)
    assert [j.id for j in got] == [free1.id, exp1.id, free2.id, exp2.id, later.id]
    assert [e.message for e in await repo.events(exp1.id)].count(
        "lease of w2 expired; taken over by w1") == 1
    assert not any("taken over" in e.message for e in await repo.events(free1.id))


async def test_claim_due_limit_cuts_across_both_sources(repo: repository.Repository) -> None:
    """With more claimable jobs than `limit` in each source, the earliest due of both are
    taken, and the rest on the next calls."""
    made: list[jobs.Job] = []
    for i in range(6):  # due at 0, 2, 4, … free; 1, 3, 5, … expired
        made.append(await job_due_at(repo, f"f{i}", owner="gone", lease_s=LEASE_S,
                                     due=at(2 * i)))
        made.append(await job_due_at(repo, f"e{i}", owner="w2", lease_s=5, due=at(2 * i + 1)))
    await repo.release("gone", now=T0)
    order = [j.id for j in sorted(made, key=lambda j: j.next_run_at)]
    taken: list[str] = []
    while got := await repo.claim_due(worker_id="w1", now=at(100), lease_s=LEASE_S, limit=5):
        assert len(got) <= 5
        taken += [j.id for j in got]
    assert taken == order


# -- the plans ---------------------------------------------------------------------------------
HELD_AND_FINISHED = """
INSERT INTO jobs (id, state, service, claim_key, source_path, input_name, input_path,
                  output_dir, archive_dir, failed_dir, lease_owner, lease_expires_at,
                  next_run_at, created_at, updated_at)
SELECT 'x' || n, CASE WHEN n % 6 = 0 THEN 'started' ELSE 'done' END, 's', 'k' || n, 'p', 'i',
       'p', 'o', 'a', 'f', CASE WHEN n % 6 = 0 THEN 'w3' END,
       CASE WHEN n % 6 = 0 THEN now() + interval '1 hour' END,
       timestamptz '2000-01-01 00:00:00+00', now(), now()
FROM generate_series(1, 60000) AS n
"""


@contextmanager
def statements(repo: repository.Repository) -> Iterator[list[tuple[str, Any]]]:
    """The SELECTs on jobs the repository sends while inside, with their parameters."""
    seen: list[tuple[str, Any]] = []

    def before(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM jobs" in statement:
            seen.append((statement, parameters))

    engine = repo._engine.sync_engine
    sa.event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", before)


async def test_claim_queries_read_through_the_claim_indexes(
    repo: repository.Repository, database_url: str
) -> None:
    """The claim's two queries search ix_jobs_free_due and ix_jobs_lease_expiry, never scan
    the table nor walk the live leases by (state, next_run_at): on SQLite (no statistics) for
    any table, on PostgreSQL for a daemon's table of 2,000 held and 6,000 finished jobs,
    analysed."""
    await job_due_at(repo, "live", owner="w3", lease_s=LONG_S, due=T0)
    await job_due_at(repo, "exp", owner="w2", lease_s=5, due=T0)
    with statements(repo) as seen:
        await repo.claim_due(worker_id="w1", now=at(100), lease_s=LEASE_S, limit=10)
    selects = [(s, p) for s, p in seen if "lease" in s]
    assert len(selects) == 2
    plans: list[str] = []
    if database_url.startswith("sqlite"):
        path = sa.make_url(database_url).database
        assert path is not None
        with sqlite3.connect(path) as conn:
            for statement, params in selects:
                rows = conn.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall()
                plans.append(" | ".join(r[3] for r in rows))
        assert not any("SCAN jobs" in p for p in plans), plans
    else:
        async with repo._engine.connect() as conn:
            # PostgreSQL plans by statistics: a daemon's table (three finished jobs for each
            # held one), analysed.
            await conn.exec_driver_sql(HELD_AND_FINISHED)
            await conn.exec_driver_sql("ANALYZE jobs")
            for statement, params in selects:
                result = await conn.exec_driver_sql("EXPLAIN " + statement, params)
                plans.append(" | ".join(r[0] for r in result))
            await conn.rollback()
        assert not any("Seq Scan" in p for p in plans), plans
    assert not any("ix_jobs_state_next_run_at" in p for p in plans), plans
    free, expired = plans
    assert "ix_jobs_free_due" in free, free
    assert "ix_jobs_lease_expiry" in expired, expired


# -- heartbeat ---------------------------------------------------------------------------------
async def expiries(repo: repository.Repository, worker: str) -> dict[str, dt.datetime]:
    found = {j.id: j.lease_expires_at for j in await repo.list_jobs(limit=1000)
             if j.lease_owner == worker}
    return {k: v for k, v in found.items() if v is not None}


async def test_heartbeat_renews_only_the_leases_near_expiry(
    repo: repository.Repository,
) -> None:
    """lease 60 s, heartbeat 10 s: a lease with less than 30 s left is renewed, one with more
    is not written, nor is a longer lease shortened; the count is of the leases renewed."""
    lease_s, beat_s = 60.0, 10.0
    now = clock.now()
    near = await repo.create_job(new_job("near"), worker_id="w1",
                                 now=now - dt.timedelta(seconds=40), lease_s=lease_s)
    far = await repo.create_job(new_job("far"), worker_id="w1",
                                now=now - dt.timedelta(seconds=20), lease_s=lease_s)
    longer = await repo.create_job(new_job("longer"), worker_id="w1", now=now, lease_s=600)
    other = await repo.create_job(new_job("other"), worker_id="w2",
                                  now=now - dt.timedelta(seconds=50), lease_s=lease_s)
    assert near and far and longer and other
    before = await expiries(repo, "w1")
    assert await repo.heartbeat("w1", now=now, lease_s=lease_s, heartbeat_s=beat_s) == 1
    after = await expiries(repo, "w1")
    assert after[near.id] == now + dt.timedelta(seconds=lease_s)
    assert after[far.id] == before[far.id] and after[longer.id] == before[longer.id]
    assert (await repo.get_job(other.id)).lease_expires_at == other.lease_expires_at
    # Without heartbeat_s, every lease is renewed (the old rule).
    assert await repo.heartbeat("w1", now=now, lease_s=lease_s) == 3


async def test_heartbeats_keep_every_lease_valid_writing_a_third(
    repo: repository.Repository,
) -> None:
    """30 leases taken at staggered times, 30 heartbeats each a little late (10.5 s apart):
    at every heartbeat each lease still has over two intervals left, after it at least
    three, and each lease is written about every third beat, not every beat."""
    lease_s, beat_s, n = 60.0, 10.0, 30
    start = clock.now() + dt.timedelta(seconds=5)  # ahead of the database's clock
    for i in range(n):
        job = await repo.create_job(new_job(f"j{i}"), worker_id="w1",
                                    now=start + dt.timedelta(seconds=i), lease_s=lease_s)
        assert job is not None
    renewed = []
    hb = start + dt.timedelta(seconds=n)
    for _ in range(30):
        hb += dt.timedelta(seconds=10.5)
        before = await expiries(repo, "w1")
        assert len(before) == n
        assert min(before.values()) - hb > dt.timedelta(seconds=2 * beat_s - 5)
        near = {k for k, v in before.items() if v < hb + dt.timedelta(seconds=3 * beat_s)}
        count = await repo.heartbeat("w1", now=hb, lease_s=lease_s, heartbeat_s=beat_s)
        after = await expiries(repo, "w1")
        assert count == len(near)
        assert {k for k in after if after[k] != before[k]} == near
        assert min(after.values()) - hb >= dt.timedelta(seconds=3 * beat_s)
        renewed.append(count)
    # Every lease renewed about once per 3 beats (every beat was 900 rows).
    assert n * 30 / 4 < sum(renewed) < n * 30 / 2.5, renewed
    # Nothing lapsed, so another worker takes nothing.
    assert await repo.claim_due(worker_id="w2", now=hb, lease_s=lease_s, limit=100) == []


async def test_a_host_whose_clock_trails_the_database_renews_early(
    repo: repository.Repository,
) -> None:
    """The host's clock is 20 s behind the database's: a 60 s lease it wrote 25 s ago has 35 s
    left by its clock (no renewal due: 30 s) but 15 s by the database's, which a takeover also
    asks. Near expiry is counted by the later clock, so it is renewed."""
    behind = clock.now() - dt.timedelta(seconds=20)
    job = await repo.create_job(new_job("skewed"), worker_id="w1",
                                now=behind - dt.timedelta(seconds=25), lease_s=60)
    assert job is not None
    assert await repo.heartbeat("w1", now=behind, lease_s=60, heartbeat_s=10) == 1
    renewed = (await repo.get_job(job.id)).lease_expires_at
    assert renewed == behind + dt.timedelta(seconds=60)


def test_the_renewal_window() -> None:
    assert claims.renew_within_s(lease_s=60, heartbeat_s=10) == 30
    # A lease of three heartbeats or less: every lease at every beat, as before.
    assert claims.renew_within_s(lease_s=30, heartbeat_s=10) == 30
    assert claims.renew_within_s(lease_s=5, heartbeat_s=2) == 5
