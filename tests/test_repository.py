"""The repository against real databases: a SQLite file and PostgreSQL (one suite, both)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import sqlite3
import stat
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa

from orchestrator import azurite as azurite_mod
from orchestrator import clock, errors, jobs, lifecycle
from orchestrator.db import engine as db_engine
from orchestrator.db import repository
from tests import harness
from tests import test_crash as crash

S = lifecycle.JobState
T0 = dt.datetime(2026, 11, 27, 20, 45, 55, 123456, tzinfo=dt.UTC)
LEASE_S = 30.0


@pytest.fixture
async def repo2(database_url: str, repo: repository.Repository) -> AsyncIterator[
    repository.Repository
]:
    """A second repository on the same database: another daemon."""
    r = await repository.Repository.open(database_url)
    try:
        yield r
    finally:
        await r.close()


def new_job(key: str, *, job_id: str | None = None, service: str = "svc") -> jobs.NewJob:
    return jobs.NewJob(
        id=job_id or uuid.uuid4().hex,
        service=service,
        watch="inbox",
        claim_key=f"inbox:{key}",
        source_path=f"/in/{key}.csv",
        input_name=f"{key}.csv",
        output_dir="/out",
        archive_dir="/archive",
        failed_dir="/failed",
    )


async def make_jobs(
    repo: repository.Repository, n: int, *, worker: str = "w1", now: dt.datetime = T0
) -> list[jobs.Job]:
    made = []
    for i in range(n):
        job = await repo.create_job(new_job(f"f{i}"), worker_id=worker, now=now, lease_s=LEASE_S)
        assert job is not None
        made.append(job)
    return made


def step(job: jobs.Job, to: S, message: str = "", **fields: object) -> jobs.Transition:
    # cast: a test may pass a name `jobs.Fields` lacks, to see the run-time check refuse it.
    return jobs.Transition(job_id=job.id, expected=job.state, to=to, message=message or str(to),
                           fields=cast(jobs.Fields, fields))


async def change(
    repo: repository.Repository, t: jobs.Transition, *, worker_id: str = "w1",
    now: dt.datetime = T0,
) -> jobs.Job:
    """One transition through the one write path; the job as stored after it. Raise LeaseLost
    with the reason when the guard fails; a rejected item fails the test."""
    [outcome] = await repo.apply([t], worker_id=worker_id, now=now)
    if isinstance(outcome, repository.Lost):
        raise repository.LeaseLost(outcome.reason)
    assert outcome == repository.Applied(), outcome
    return await repo.get_job(t.job_id)


def path_to(start: S, goal: S) -> list[S]:
    """The shortest run of legal worker edges from `start` to `goal` (lifecycle.EDGES)."""
    paths: dict[S, list[S]] = {start: []}
    frontier = [start]
    while frontier:
        here = frontier.pop(0)
        if here is goal:
            return paths[here]
        for a, b in lifecycle.EDGES:
            if a is here and b not in paths and lifecycle.allowed(a, b):
                paths[b] = [*paths[here], b]
                frontier.append(b)
    raise AssertionError(f"no legal path {start} -> {goal}")


async def walk(
    repo: repository.Repository, job: jobs.Job, to: S, message: str = "", *,
    worker_id: str = "w1", now: dt.datetime = T0, **fields: object,
) -> jobs.Job:
    """Move `job` to `to` along legal edges; `fields` and `message` go with the last step."""
    for state in path_to(job.state, to):
        last = state is to
        job = await change(repo, step(job, state, message if last else "",
                                      **(fields if last else {})),
                           worker_id=worker_id, now=now)
    return job


def lost_ids(items: list[jobs.Transition | jobs.Reschedule],
             outcomes: list[repository.Outcome]) -> set[str]:
    return {i.job_id for i, o in zip(items, outcomes, strict=True)
            if isinstance(o, repository.Lost)}


async def sql(url: str, statement: str, **params: Any) -> list[dict[str, Any]]:
    engine = db_engine.create_engine(url)
    try:
        async with engine.begin() as conn:
            return [dict(r._mapping) for r in await conn.execute(sa.text(statement), params)]
    finally:
        await engine.dispose()


# -- intake ------------------------------------------------------------------------------------
async def test_create_job_is_claimed_leased_and_unique(repo: repository.Repository) -> None:
    new = new_job("a")
    job = await repo.create_job(new, worker_id="w1", now=T0, lease_s=LEASE_S)
    assert job is not None
    assert job.state is S.CLAIMED
    assert (job.attempts, job.runs, job.lease_owner) == (1, 1, "w1")
    assert job.lease_expires_at == T0 + dt.timedelta(seconds=LEASE_S)
    assert job.input_path == new.source_path
    assert job == await repo.get_job(job.id)  # what create_job returns is what is stored
    assert job.created_at == T0 and job.created_at.tzinfo is not None

    # Same claim key from another host: refused, not an error.
    again = dataclass_replace(new_job("a"), id=uuid.uuid4().hex)
    assert await repo.create_job(again, worker_id="w2", now=T0, lease_s=LEASE_S) is None
    assert [j.id for j in await repo.list_jobs()] == [job.id]

    [event] = await repo.events(job.id)
    assert (event.from_state, event.to_state, event.worker) == (None, S.CLAIMED, "w1")
    assert event.at == T0


def dataclass_replace(new: jobs.NewJob, **changes: Any) -> jobs.NewJob:
    return dataclasses.replace(new, **changes)


async def test_naive_datetimes_are_refused(repo: repository.Repository) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        await repo.create_job(new_job("x"), worker_id="w1", now=T0.replace(tzinfo=None),
                              lease_s=LEASE_S)


async def test_get_job_by_prefix(repo: repository.Repository) -> None:
    a = await repo.create_job(new_job("a", job_id="abcd" + "0" * 28), worker_id="w1", now=T0,
                              lease_s=LEASE_S)
    b = await repo.create_job(new_job("b", job_id="abcd" + "1" * 28), worker_id="w1", now=T0,
                              lease_s=LEASE_S)
    assert a is not None and b is not None
    assert (await repo.get_job("abcd0")).id == a.id
    assert (await repo.get_job("ABCD1")).id == b.id
    assert (await repo.get_job(a.id)).id == a.id
    with pytest.raises(repository.InvalidState, match="ambiguous"):
        await repo.get_job("abcd")
    with pytest.raises(repository.NotFound):
        await repo.get_job("abc")  # too short to be a prefix
    with pytest.raises(repository.NotFound):
        await repo.get_job("ffff")
    with pytest.raises(repository.NotFound):
        await repo.get_job("abcd%")  # not hex: no LIKE wildcards


# -- claiming ------------------------------------------------------------------------------------
async def test_claim_due_leases_each_job_to_one_worker(
    repo: repository.Repository, repo2: repository.Repository
) -> None:
    made = await make_jobs(repo, 6)
    assert await repo.release("w1", now=T0) == 6
    now = T0 + dt.timedelta(seconds=1)
    a, b = await asyncio.gather(
        repo.claim_due(worker_id="w1", now=now, lease_s=LEASE_S, limit=4),
        repo2.claim_due(worker_id="w2", now=now, lease_s=LEASE_S, limit=4),
    )
    ids_a, ids_b = {j.id for j in a}, {j.id for j in b}
    assert not ids_a & ids_b
    assert ids_a | ids_b == {j.id for j in made}
    assert {j.lease_owner for j in a} <= {"w1"} and {j.lease_owner for j in b} <= {"w2"}
    # Released (attempts 1 -> 0), then claimed again: 1.
    assert {j.attempts for j in a + b} == {1}
    # Valid leases are not handed out again.
    assert await repo.claim_due(worker_id="w3", now=now, lease_s=LEASE_S, limit=10) == []
    # No takeover events: the leases were free, not expired.
    for job in made:
        assert all("expired" not in e.message for e in await repo.events(job.id))


async def test_claim_due_order_and_due_time(repo: repository.Repository) -> None:
    first, second, done = await make_jobs(repo, 3)
    at = {first.id: T0 + dt.timedelta(seconds=200), second.id: T0 + dt.timedelta(seconds=100)}
    await walk(repo, done, S.FAILED, error="boom")
    await repo.apply(
        [jobs.Reschedule(job_id=job_id, expected=S.CLAIMED, next_run_at=when, bes_status=None,
                         poll_count=0) for job_id, when in at.items()],
        worker_id="w1", now=T0,
    )
    await repo.release("w1", now=T0)
    claim = repo.claim_due
    got = await claim(worker_id="w1", now=T0 + dt.timedelta(seconds=150), lease_s=1, limit=10)
    assert [j.id for j in got] == [second.id]  # `first` is not due yet; `done` is terminal
    await repo.release("w1", now=T0)
    late = T0 + dt.timedelta(seconds=300)
    got = await claim(worker_id="w1", now=late, lease_s=LEASE_S, limit=1)
    assert [j.id for j in got] == [second.id]  # earliest next_run_at first
    got = await claim(worker_id="w1", now=late, lease_s=LEASE_S, limit=10)
    assert [j.id for j in got] == [first.id]


async def test_expired_lease_is_taken_over_with_an_event(repo: repository.Repository) -> None:
    [job] = await make_jobs(repo, 1, worker="w1")
    soon = T0 + dt.timedelta(seconds=LEASE_S - 1)
    assert await repo.claim_due(worker_id="w2", now=soon, lease_s=LEASE_S, limit=5) == []
    late = T0 + dt.timedelta(seconds=LEASE_S + 1)
    [taken] = await repo.claim_due(worker_id="w2", now=late, lease_s=LEASE_S, limit=5)
    assert taken.id == job.id
    assert taken.lease_owner == "w2"
    assert taken.attempts == 2  # counted at claim time: the crash-loop guard sees it
    assert taken.lease_expires_at == late + dt.timedelta(seconds=LEASE_S)
    last = (await repo.events(job.id))[-1]
    assert last.message == "lease of w1 expired; taken over by w2"
    assert (last.from_state, last.to_state, last.worker) == (S.CLAIMED, S.CLAIMED, "w2")
    # The old owner's late write is refused.
    with pytest.raises(repository.LeaseLost, match="leased to w2"):
        await change(repo, step(job, S.ACCEPTED), worker_id="w1", now=late)


# -- transitions -------------------------------------------------------------------------------
async def test_transition_is_guarded_and_writes_an_event(repo: repository.Repository) -> None:
    [job] = await make_jobs(repo, 1)
    now = T0 + dt.timedelta(seconds=2)
    with pytest.raises(repository.LeaseLost):
        await change(repo, step(job, S.ACCEPTED), worker_id="w2", now=now)  # not the owner
    wrong = jobs.Transition(job_id=job.id, expected=S.UPLOADED, to=S.SUBMITTED, message="x")
    with pytest.raises(repository.LeaseLost, match="found state claimed"):
        await change(repo, wrong, worker_id="w1", now=now)
    assert len(await repo.events(job.id)) == 1  # failed guards leave no trace

    nxt = now + dt.timedelta(seconds=7)
    moved = await change(
        repo,
        jobs.Transition(job_id=job.id, expected=S.CLAIMED, to=S.ACCEPTED, message="spooled",
                        fields={"input_path": "/spool/a.csv", "input_sha256": "ab" * 32,
                                "input_size": 12},
                        next_run_at=nxt),
        worker_id="w1", now=now,
    )
    assert moved.state is S.ACCEPTED
    assert (moved.input_path, moved.input_size, moved.next_run_at) == ("/spool/a.csv", 12, nxt)
    assert moved.updated_at == now and moved.lease_owner == "w1"
    assert moved == await repo.get_job(job.id)
    event = (await repo.events(job.id))[-1]
    assert (event.from_state, event.to_state, event.message, event.worker) == (
        S.CLAIMED, S.ACCEPTED, "spooled", "w1")

    # A field no change may set is a bug: the item is rejected and nothing is written.
    [refused] = await repo.apply([step(moved, S.UPLOADED, lease_owner="w9")], worker_id="w1",
                                 now=now + dt.timedelta(seconds=1))
    assert isinstance(refused, repository.Rejected)
    assert "cannot set 'lease_owner'" in refused.reason
    assert await repo.get_job(job.id) == moved


async def test_terminal_transition_frees_the_lease_and_keeps_no_secret(
    repo: repository.Repository,
) -> None:
    [job] = await make_jobs(repo, 1)
    now = T0 + dt.timedelta(seconds=90)
    failed = await walk(
        repo, job, S.FAILED, "failed: https://a.blob/x?sv=1&sig=SECRETSIG",
        error="download of https://a.blob/c/r.csv?sv=2&sig=SECRETSIG failed",
        error_code="AuthenticationFailed",
        result_refs={"output1": "https://a.blob/c/r.csv"},
        worker_id="w1", now=now,
    )
    assert failed.state is S.FAILED
    assert (failed.lease_owner, failed.lease_expires_at) == (None, None)
    assert failed.finished_at == now
    assert failed.result_refs == {"output1": "https://a.blob/c/r.csv"}
    assert failed.error is not None and "SECRETSIG" not in failed.error
    assert "sig=***" in failed.error
    assert all("SECRETSIG" not in e.message for e in await repo.events(job.id))
    # Not active any more: nobody claims it, heartbeat does not renew it.
    assert await repo.claim_due(worker_id="w1", now=now, lease_s=LEASE_S, limit=5) == []


async def test_apply_batch_mixed_lost_and_ok(
    repo: repository.Repository, repo2: repository.Repository
) -> None:
    j1, j2, j3, j4 = await make_jobs(repo, 4, worker="w1")
    [other] = [j for j in [await repo2.create_job(new_job("o"), worker_id="w2", now=T0,
                                                  lease_s=LEASE_S)] if j is not None]
    # Bring j3, j4 to STARTED with a BES status.
    for j in (j3, j4):
        await walk(repo, j, S.STARTED, "started", bes_job_id="b" + j.id[:8],
                   bes_status="NotStarted")
    now = T0 + dt.timedelta(seconds=3)
    when = now + dt.timedelta(seconds=4)
    items: list[jobs.Transition | jobs.Reschedule] = [
        step(j1, S.ACCEPTED, "spooled", input_path="/spool/1"),
        jobs.Transition(job_id=j2.id, expected=S.UPLOADED, to=S.SUBMITTED, message="bad"),
        jobs.Reschedule(job_id=j3.id, expected=S.STARTED, next_run_at=when,
                        bes_status="Running", poll_count=1),
        jobs.Reschedule(job_id=j4.id, expected=S.STARTED, next_run_at=when,
                        bes_status="NotStarted", poll_count=1),
        jobs.Reschedule(job_id=other.id, expected=S.CLAIMED, next_run_at=when,
                        bes_status=None, poll_count=1),
    ]
    assert lost_ids(items, await repo.apply(items, worker_id="w1", now=now)) == {
        j2.id, other.id}
    got = {j.id: j for j in await repo.list_jobs()}
    assert (got[j1.id].state, got[j1.id].input_path) == (S.ACCEPTED, "/spool/1")
    assert got[j2.id].state is S.CLAIMED and got[j2.id].updated_at == T0
    assert (got[j3.id].bes_status, got[j3.id].poll_count, got[j3.id].next_run_at) == (
        "Running", 1, when)
    assert (got[j4.id].poll_count, got[j4.id].updated_at) == (1, now)
    assert got[other.id].poll_count == 0 and got[other.id].next_run_at == T0

    assert (await repo.events(j1.id))[-1].message == "spooled"
    e3 = (await repo.events(j3.id))[-1]
    assert (e3.from_state, e3.to_state, e3.message) == (S.STARTED, S.STARTED,
                                                       "BES status NotStarted -> Running")
    assert (await repo.events(j4.id))[-1].message == "started"  # status unchanged: no event
    assert len(await repo.events(j2.id)) == 1


async def test_apply_the_same_job_twice_in_one_batch(repo: repository.Repository) -> None:
    [job] = await make_jobs(repo, 1)
    now = T0 + dt.timedelta(seconds=1)
    items: list[jobs.Transition | jobs.Reschedule] = [
        step(job, S.ACCEPTED),
        jobs.Transition(job_id=job.id, expected=S.ACCEPTED, to=S.UPLOADED, message="up"),
        jobs.Transition(job_id=job.id, expected=S.CLAIMED, to=S.FAILING, message="stale"),
        jobs.Reschedule(job_id=job.id, expected=S.UPLOADED, next_run_at=now,
                        bes_status="x", poll_count=3),
    ]
    outcomes = await repo.apply(items, worker_id="w1", now=now)
    assert lost_ids(items, outcomes) == {job.id}  # the stale third item
    assert [type(o) for o in outcomes] == [repository.Applied, repository.Applied,
                                           repository.Lost, repository.Applied]
    stored = await repo.get_job(job.id)
    assert (stored.state, stored.poll_count, stored.bes_status) == (S.UPLOADED, 3, "x")
    assert [e.to_state for e in await repo.events(job.id)] == [
        S.CLAIMED, S.ACCEPTED, S.UPLOADED, S.UPLOADED]


async def test_apply_in_order_reschedule_then_transition_in_one_batch(
    repo: repository.Repository,
) -> None:
    """A poll's reschedule and the transition of the next poll can share a writer batch:
    applied in the order they were made, both succeed (the writer once applied transitions
    first, failed the reschedule's guard, and the worker dropped a job that had moved on)."""
    [job] = await make_jobs(repo, 1)
    await walk(repo, job, S.STARTED, "started", bes_job_id="b1", bes_status="Running")
    now = T0 + dt.timedelta(seconds=1)
    items: list[jobs.Transition | jobs.Reschedule] = [
        jobs.Reschedule(job_id=job.id, expected=S.STARTED, next_run_at=now,
                        bes_status="Running", poll_count=1),
        jobs.Transition(job_id=job.id, expected=S.STARTED, to=S.REMOTE_FINISHED,
                        message="finished", fields={"bes_status": "Finished"}),
        jobs.Transition(job_id=job.id, expected=S.STARTED, to=S.FAILING, message="stale"),
    ]
    outcomes = await repo.apply(items, worker_id="w1", now=now)
    assert [type(o) for o in outcomes] == [repository.Applied, repository.Applied,
                                           repository.Lost]
    stored = await repo.get_job(job.id)
    assert (stored.state, stored.poll_count, stored.bes_status) == (
        S.REMOTE_FINISHED, 1, "Finished")


async def test_apply_nothing(repo: repository.Repository) -> None:
    assert await repo.apply([], worker_id="w1", now=T0) == []


# -- workers -----------------------------------------------------------------------------------
async def test_heartbeat_and_release(repo: repository.Repository, database_url: str) -> None:
    await repo.register_worker("w1", host="h", pid=42, now=T0)
    a, b, c = await make_jobs(repo, 3, worker="w1")
    await walk(repo, c, S.DONE)
    await repo2_create(repo, "w2")
    later = T0 + dt.timedelta(seconds=20)
    assert await repo.heartbeat("w1", now=later, lease_s=LEASE_S) == 2
    for job_id in (a.id, b.id):
        renewed = await repo.get_job(job_id)
        assert renewed.lease_expires_at == later + dt.timedelta(seconds=LEASE_S)
    [row] = await sql(database_url, "SELECT * FROM workers WHERE id = 'w1'")
    assert (row["host"], row["pid"], row["stopped_at"]) == ("h", 42, None)

    stop = later + dt.timedelta(seconds=1)
    assert await repo.release("w1", now=stop) == 2
    for job_id in (a.id, b.id):
        freed = await repo.get_job(job_id)
        assert (freed.lease_owner, freed.lease_expires_at, freed.attempts) == (None, None, 0)
    assert (await repo.get_job(c.id)).attempts == 1  # terminal jobs are not touched
    [w2] = [j for j in await repo.list_jobs() if j.lease_owner == "w2"]
    assert w2.attempts == 1  # another worker's lease is not released
    [row] = await sql(database_url, "SELECT stopped_at FROM workers WHERE id = 'w1'")
    assert row["stopped_at"] is not None

    # Restart under the same id: the row is reused and stopped_at cleared.
    await repo.register_worker("w1", host="h", pid=43, now=stop)
    [row] = await sql(database_url, "SELECT pid, stopped_at FROM workers WHERE id = 'w1'")
    assert (row["pid"], row["stopped_at"]) == (43, None)


async def repo2_create(repo: repository.Repository, worker: str) -> None:
    assert await repo.create_job(new_job(f"by-{worker}"), worker_id=worker, now=T0,
                                 lease_s=LEASE_S) is not None


# -- queue table ---------------------------------------------------------------------------------
def from_queue(item: jobs.QueueItem) -> jobs.NewJob:
    return jobs.NewJob(id=uuid.uuid4().hex, service=item.service, watch=None,
                       claim_key=f"queue:{item.id}", source_path=item.path,
                       input_name=Path(item.path).name, output_dir="/o", archive_dir="/a",
                       failed_dir="/f")


async def test_concurrent_queue_claims_never_share_a_row(
    repo: repository.Repository, repo2: repository.Repository, database_url: str
) -> None:
    ids = await repo.enqueue([f"/q/{i}.csv" for i in range(30)], service="svc", now=T0)
    assert len(ids) == 30 and ids == sorted(ids)

    async def drain(r: repository.Repository, worker: str) -> list[jobs.Job]:
        got: list[jobs.Job] = []
        while batch := await r.claim_queue(worker_id=worker, now=T0, lease_s=LEASE_S, limit=4,
                                           make_job=from_queue):
            got += batch
            await asyncio.sleep(0)
        return got

    a, b = await asyncio.gather(drain(repo, "w1"), drain(repo2, "w2"))
    keys = [j.claim_key for j in a + b]
    assert len(keys) == len(set(keys)) == 30
    assert set(keys) == {f"queue:{i}" for i in ids}
    assert all(j.state is S.CLAIMED and j.attempts == 1 for j in a + b)
    assert {j.lease_owner for j in a} <= {"w1"} and {j.lease_owner for j in b} <= {"w2"}
    rows = await sql(database_url, "SELECT id, job_id FROM queue ORDER BY id")
    by_key = {j.claim_key: j.id for j in a + b}
    assert {r["id"]: r["job_id"] for r in rows} == {i: by_key[f"queue:{i}"] for i in ids}
    assert await repo.claim_queue(worker_id="w1", now=T0, lease_s=LEASE_S, limit=4,
                                  make_job=from_queue) == []
    [job] = a[:1] or b[:1]
    assert (await repo.events(job.id))[0].message.startswith("claimed queue row")


async def test_queue_row_for_a_claimed_key_points_at_the_holder(
    repo: repository.Repository, database_url: str
) -> None:
    holder = await repo.create_job(new_job("same"), worker_id="w1", now=T0, lease_s=LEASE_S)
    assert holder is not None
    [qid] = await repo.enqueue(["/q/same.csv"], service="svc", now=T0)

    def same_key(item: jobs.QueueItem) -> jobs.NewJob:
        return dataclass_replace(from_queue(item), claim_key=holder.claim_key)

    got = await repo.claim_queue(worker_id="w1", now=T0, lease_s=LEASE_S, limit=5,
                                 make_job=same_key)
    assert got == []
    [row] = await sql(database_url, "SELECT job_id FROM queue WHERE id = :id", id=qid)
    assert row["job_id"] == holder.id
    assert len(await repo.list_jobs()) == 1


# -- people's actions ----------------------------------------------------------------------------
async def test_request_cancel(repo: repository.Repository) -> None:
    job, done = await make_jobs(repo, 2)
    started = await walk(repo, job, S.STARTED, bes_job_id="b1")
    await walk(repo, done, S.DONE)
    now = T0 + dt.timedelta(seconds=5)
    cancelling = await repo.request_cancel(job.id[:6], now=now)
    assert cancelling.state is S.CANCELLING and cancelling.cancel_requested
    assert (cancelling.lease_owner, cancelling.next_run_at) == (None, now)
    event = (await repo.events(job.id))[-1]
    assert (event.from_state, event.to_state, event.message, event.worker) == (
        S.STARTED, S.CANCELLING, "cancel requested", None)
    # The worker that held it finds out at its next write.
    with pytest.raises(repository.LeaseLost):
        await change(repo, step(started, S.REMOTE_FINISHED), worker_id="w1", now=now)
    # Asking twice changes nothing; an ended job cannot be cancelled.
    assert await repo.request_cancel(job.id, now=now) == cancelling
    with pytest.raises(repository.InvalidState, match="done"):
        await repo.request_cancel(done.id, now=now)
    with pytest.raises(repository.NotFound):
        await repo.request_cancel("0123456789", now=now)
    # Whoever claims it next runs the cancel step.
    [claimed] = await repo.claim_due(worker_id="w2", now=now, lease_s=LEASE_S, limit=5)
    assert (claimed.id, claimed.state) == (job.id, S.CANCELLING)


async def test_retry(repo: repository.Repository) -> None:
    [job] = await make_jobs(repo, 1)
    await walk(repo, job, S.STARTED, bes_job_id="b1", bes_status="Running", poll_count=4,
               input_path="/spool/x", started_at=T0, submitted_at=T0,
               deadline_at=T0 + dt.timedelta(hours=1))
    with pytest.raises(repository.InvalidState, match="only failed or cancelled"):
        await repo.retry(job.id, now=T0)
    failing = await repo.get_job(job.id)
    await walk(repo, failing, S.FAILED, input_path="/failed/a.csv", error="Details: bad input",
               error_code="BadArgument", result_refs={"o": "u"}, outputs={"o": "/out/a.o.csv"})
    now = T0 + dt.timedelta(minutes=1)
    again = await repo.retry(job.id, now=now)
    assert again.state is S.CLAIMED
    assert again.source_path == again.input_path == "/failed/a.csv"
    assert (again.runs, again.attempts, again.poll_count) == (2, 0, 0)
    assert (again.bes_job_id, again.bes_status, again.error, again.error_code) == (
        None, None, None, None)
    assert (again.result_refs, again.outputs) == ({}, {})
    assert (again.submitted_at, again.started_at, again.finished_at, again.deadline_at) == (
        None, None, None, None)
    assert (again.lease_owner, again.next_run_at, again.cancel_requested) == (None, now, False)
    assert (await repo.events(job.id))[-1].message == "retry requested"
    [claimed] = await repo.claim_due(worker_id="w1", now=now, lease_s=LEASE_S, limit=5)
    assert claimed.attempts == 1


async def failed_after(
    repo: repository.Repository, job: jobs.Job, at: S, code: str
) -> jobs.Job:
    """Walk `job` to `at` as a BES job would, fail it there with `code`, and end it FAILED with
    its input in the failed folder (as the fail step leaves it)."""
    job = await walk(repo, job, S.STARTED, bes_job_id="b1", bes_status="Running",
                     input_path="/spool/x.csv", submitted_at=T0, started_at=T0)
    job = await walk(repo, job, S.REMOTE_FINISHED, bes_status="Finished",
                     result_refs={"output1": "https://acct.blob/c/x.output1.csv"})
    if at is S.DOWNLOADED:
        job = await walk(repo, job, S.DOWNLOADED, outputs={"output1": "/out/x.output1.csv"})
    job = await change(repo, step(job, S.FAILING, f"{code}: boom", error="boom",
                                  error_code=code))
    return await change(repo, step(job, S.FAILED, input_path="/failed/x.csv"))


async def test_retry_after_a_local_failure_resumes_at_the_download(
    repo: repository.Repository,
) -> None:
    """A full results disk after the BES job finished: `jobs retry` fetches the results again
    (the download asks BES for fresh references); it does not run the BES job again."""
    [job] = await make_jobs(repo, 1)
    failed = await failed_after(repo, job, S.REMOTE_FINISHED, "ResultUnwritable")
    now = T0 + dt.timedelta(minutes=5)
    again = await repo.retry(failed.id[:8], now=now)
    assert again.state is S.REMOTE_FINISHED
    assert (again.bes_job_id, again.bes_status, again.result_refs) == (
        "b1", "Finished", {"output1": "https://acct.blob/c/x.output1.csv"})
    assert (again.submitted_at, again.started_at) == (T0, T0)
    # The input stays where the history says it is until the finish step archives it.
    assert again.input_path == "/failed/x.csv"
    assert (again.runs, again.attempts, again.error, again.error_code, again.finished_at) == (
        2, 0, None, None, None)
    assert (again.lease_owner, again.next_run_at) == (None, now)
    last = (await repo.events(job.id))[-1]
    assert (last.from_state, last.to_state, last.worker) == (S.FAILED, S.REMOTE_FINISHED, None)
    assert "resuming at the download step" in last.message
    [claimed] = await repo.claim_due(worker_id="w2", now=now, lease_s=LEASE_S, limit=5)
    assert (claimed.id, claimed.state, claimed.attempts) == (job.id, S.REMOTE_FINISHED, 1)
    # If the remote job turns out gone, the download sends it back for a full run.
    rerun = await change(repo, jobs.Transition(
        job_id=job.id, expected=S.REMOTE_FINISHED, to=S.CLAIMED, message="BES job gone",
        fields=jobs.fresh_run(claimed)), worker_id="w2", now=now)
    assert (rerun.state, rerun.source_path, rerun.bes_job_id) == (S.CLAIMED, "/failed/x.csv", None)


async def test_retry_after_the_finish_step_failed_resumes_there(
    repo: repository.Repository,
) -> None:
    [job] = await make_jobs(repo, 1)
    failed = await failed_after(repo, job, S.DOWNLOADED, "ArchiveUnwritable")
    again = await repo.retry(failed.id, now=T0)
    assert again.state is S.DOWNLOADED
    assert again.outputs == {"output1": "/out/x.output1.csv"}
    assert again.input_path == "/failed/x.csv"


async def test_retry_after_a_remote_failure_runs_everything_again(
    repo: repository.Repository,
) -> None:
    """BES changed its mind about a finished job: its results are not to be trusted."""
    [job] = await make_jobs(repo, 1)
    failed = await failed_after(repo, job, S.REMOTE_FINISHED, "BesStateChanged")
    again = await repo.retry(failed.id, now=T0)
    assert again.state is S.CLAIMED
    assert (again.bes_job_id, again.result_refs) == (None, {})
    assert again.source_path == again.input_path == "/failed/x.csv"


# -- the allowed edges -----------------------------------------------------------------------------
async def test_an_illegal_edge_is_rejected_and_never_written(
    repo: repository.Repository,
) -> None:
    """A step that skips ahead is a bug: the item is rejected with the reason, nothing is
    written (no row change, no event), and the rest of the batch is applied."""
    a, b = await make_jobs(repo, 2)
    items: list[jobs.Transition | jobs.Reschedule] = [
        step(a, S.DONE, "skipped everything", outputs={"o": "/out/a"}),
        step(b, S.ACCEPTED, "spooled"),
        jobs.Transition(job_id=a.id, expected=S.CLAIMED, to=S.CANCELLING, message="a worker"),
    ]
    first, second, third = await repo.apply(items, worker_id="w1", now=T0)
    assert isinstance(first, repository.Rejected)
    assert "illegal state change claimed -> done" in first.reason
    assert second == repository.Applied()
    assert isinstance(third, repository.Rejected) and "by a worker" in third.reason
    assert await repo.get_job(a.id) == a
    assert len(await repo.events(a.id)) == 1
    assert (await repo.get_job(b.id)).state is S.ACCEPTED
    # A person's change (no lease check) is never accepted from a worker.
    as_person = jobs.Transition(job_id=a.id, expected=S.CLAIMED, to=S.CANCELLING,
                                message="sneaky", actor=lifecycle.Actor.PERSON)
    [refused] = await repo.apply([as_person], worker_id="w2", now=T0)
    assert isinstance(refused, repository.Rejected) and "worker w2" in refused.reason
    assert await repo.get_job(a.id) == a


# -- workers: one id, one daemon; lease time -------------------------------------------------------
async def test_a_live_worker_id_is_refused(repo: repository.Repository) -> None:
    now = clock.now()
    await repo.register_worker("w1", host="host-a", pid=100, now=now, lease_s=LEASE_S)
    with pytest.raises(repository.WorkerIdInUse) as refused:
        await repo.register_worker("w1", host="host-b", pid=100, now=now, lease_s=LEASE_S)
    assert str(refused.value).startswith("config error: daemon.worker_id: ")
    assert "host-a" in str(refused.value) and "\n" not in str(refused.value)
    assert isinstance(refused.value, errors.OrchestratorError)
    # The same process registering again is not a second daemon.
    await repo.register_worker("w1", host="host-a", pid=100, now=now, lease_s=LEASE_S)
    # A stopped daemon holds nothing.
    await repo.release("w1", now=now)
    await repo.register_worker("w1", host="host-b", pid=7, now=now, lease_s=LEASE_S)
    # A heartbeat older than the lease (by both clocks) is a dead daemon's.
    await repo.register_worker("w2", host="host-a", pid=1, now=T0, lease_s=LEASE_S)
    await repo.register_worker("w2", host="host-b", pid=2, now=now, lease_s=LEASE_S)


async def test_a_live_worker_id_on_the_same_host(repo: repository.Repository) -> None:
    """Same host: a process that still exists holds the id; one that is gone (a crash just
    before systemd restarts the daemon) does not."""
    now = clock.now()
    sleeper = await asyncio.create_subprocess_exec(sys.executable, "-c",
                                                   "import time; time.sleep(60)")
    try:
        await repo.register_worker("w1", host="here", pid=sleeper.pid, now=now, lease_s=LEASE_S)
        with pytest.raises(repository.WorkerIdInUse):
            await repo.register_worker("w1", host="here", pid=os.getpid(), now=now,
                                       lease_s=LEASE_S)
    finally:
        sleeper.kill()
        await sleeper.wait()
    await repo.register_worker("w1", host="here", pid=os.getpid(), now=now, lease_s=LEASE_S)


async def test_a_clock_ahead_cannot_take_a_live_lease(repo: repository.Repository) -> None:
    """Lease expiry needs the database's clock to agree: a claimer whose wall clock runs
    120 s ahead (a clock step, or a badly synced host) does not take a lease renewed just
    now; once the database's clock also says it expired, it does."""
    now = clock.now()
    [job] = await make_jobs(repo, 1, worker="w1", now=now)
    ahead = now + dt.timedelta(seconds=120)
    assert await repo.claim_due(worker_id="w2", now=ahead, lease_s=LEASE_S, limit=5) == []
    assert (await repo.get_job(job.id)).lease_owner == "w1"
    short = await repo.create_job(new_job("short"), worker_id="w1", now=now, lease_s=0.05)
    assert short is not None
    await asyncio.sleep(0.3)
    [taken] = await repo.claim_due(worker_id="w2", now=ahead, lease_s=LEASE_S, limit=5)
    assert taken.id == short.id


async def test_clock_skew_against_the_database(repo: repository.Repository) -> None:
    now = clock.now()
    assert abs(await repo.clock_skew_s(now=now)) < 5
    assert await repo.clock_skew_s(now=now + dt.timedelta(seconds=120)) == pytest.approx(
        -120, abs=5)


# -- reading -------------------------------------------------------------------------------------
async def test_lists_and_counts(repo: repository.Repository) -> None:
    made = []
    for i in range(3):
        made += await make_jobs_at(repo, f"k{i}", T0 + dt.timedelta(seconds=i))
    await walk(repo, made[0], S.DONE)
    assert [j.id for j in await repo.list_jobs()] == [j.id for j in reversed(made)]
    assert [j.id for j in await repo.list_jobs(state=S.DONE)] == [made[0].id]
    assert await repo.list_jobs(service="nope") == []
    assert len(await repo.list_jobs(limit=2)) == 2
    counts = await repo.count_by_state()
    assert counts[S.CLAIMED] == 2 and counts[S.DONE] == 1 and counts[S.FAILED] == 0
    assert set(counts) == set(S)
    oldest = await repo.oldest_active()
    assert oldest is not None and oldest.id == made[1].id


async def make_jobs_at(repo: repository.Repository, key: str, now: dt.datetime) -> list[jobs.Job]:
    job = await repo.create_job(new_job(key), worker_id="w1", now=now, lease_s=LEASE_S)
    assert job is not None
    return [job]


async def test_oldest_active_none(repo: repository.Repository) -> None:
    assert await repo.oldest_active() is None


HISTORY_COLUMNS = {
    "job_id", "input_path", "input_name", "input_sha256", "service", "state", "bes_job_id",
    "bes_status", "attempts", "runs", "created_at", "submitted_at", "started_at", "finished_at",
    "updated_at", "duration_s", "outputs", "error", "worker",
}


async def test_job_history_view(repo: repository.Repository) -> None:
    done, running = await make_jobs(repo, 2)
    finish = T0 + dt.timedelta(seconds=90, microseconds=500_000)
    await walk(repo, done, S.DONE, bes_job_id="539d0bc2", bes_status="Finished",
               input_sha256="ab" * 32, submitted_at=T0 + dt.timedelta(seconds=1),
               outputs={"output1": "/out/f0.output1.csv"}, now=finish)
    rows = {r["job_id"]: r for r in await repo.history()}
    assert list(rows) == sorted(rows, reverse=True)  # same created_at: job_id breaks the tie
    d, r = rows[done.id], rows[running.id]
    assert HISTORY_COLUMNS <= set(d)
    assert d["created_at"] == "2026-11-27T20:45:55.123Z"
    assert d["submitted_at"] == "2026-11-27T20:45:56.123Z"
    assert d["finished_at"] == "2026-11-27T20:47:25.623Z"
    assert d["updated_at"] == d["finished_at"]
    assert d["started_at"] is None
    assert d["duration_s"] == pytest.approx(90.5)
    assert json.loads(d["outputs"]) == {"output1": "/out/f0.output1.csv"}
    assert (d["state"], d["bes_job_id"], d["bes_status"], d["worker"]) == (
        "done", "539d0bc2", "Finished", None)
    assert (d["attempts"], d["runs"], d["input_name"]) == (1, 1, "f0.csv")
    assert (r["duration_s"], r["finished_at"], r["worker"], r["state"]) == (
        None, None, "w1", "claimed")
    assert await repo.history(limit=1) == [rows[max(rows)]]


async def test_job_history_readable_with_plain_sqlite3(
    repo: repository.Repository, database_url: str
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("the sqlite3 command-line view is a SQLite matter")
    [job] = await make_jobs(repo, 1)
    path = sa.make_url(database_url).database
    assert path is not None
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        [row] = conn.execute("select * from job_history").fetchall()
    assert row["job_id"] == job.id and row["created_at"] == "2026-11-27T20:45:55.123Z"


async def test_sqlite_files_are_private(repo: repository.Repository, database_url: str) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("file modes are a SQLite matter")
    await make_jobs(repo, 1)
    path = sa.make_url(database_url).database
    assert path is not None
    # The -wal and -shm files exist while the repository is open (WAL is on).
    assert file_modes(path) == {path: 0o600, f"{path}-wal": 0o600, f"{path}-shm": 0o600}


def file_modes(path: str) -> dict[str, int]:
    candidates = (path, f"{path}-wal", f"{path}-shm")
    return {p: stat.S_IMODE(os.stat(p).st_mode) for p in candidates if os.path.exists(p)}


async def test_history_times_truncate_to_milliseconds(repo: repository.Repository) -> None:
    """Both dialects cut (not round) to milliseconds, as clock.iso does."""
    edge = dt.datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=dt.UTC)
    [job] = await make_jobs(repo, 1, now=edge)
    [row] = await repo.history()
    assert row["created_at"] == "2026-12-31T23:59:59.999Z" == clock.iso(job.created_at)


async def test_heartbeat_concurrent_with_batch_writes(repo: repository.Repository) -> None:
    """A worker's heartbeat and its batch writer touch the same rows at once: no deadlock,
    no lost write."""
    made = await make_jobs(repo, 40)
    now = T0 + dt.timedelta(seconds=1)

    async def beat() -> None:
        for i in range(10):
            assert await repo.heartbeat("w1", now=now, lease_s=LEASE_S + i) == len(made)

    async def write() -> None:
        for i in range(10):
            outcomes = await repo.apply(
                [jobs.Reschedule(job_id=j.id, expected=S.CLAIMED, next_run_at=now,
                                 bes_status=f"s{i}", poll_count=i) for j in reversed(made)],
                worker_id="w1", now=now,
            )
            assert outcomes == [repository.Applied()] * len(made)

    await asyncio.gather(beat(), write(), beat())
    assert {j.poll_count for j in await repo.list_jobs()} == {9}


CLAIMER = """
import asyncio, datetime as dt, sys
from orchestrator.db import repository

async def main() -> None:
    repo = await repository.Repository.open(sys.argv[1])
    now = dt.datetime.fromisoformat(sys.argv[2])
    await repo.count_by_state()  # connected and warm
    print("ready", flush=True)
    sys.stdin.readline()
    while got := await repo.claim_due(worker_id="child", now=now, lease_s=600, limit=3):
        print(*(j.id for j in got), flush=True)
        await asyncio.sleep(0.002)
    await repo.close()

asyncio.run(main())
"""


async def test_two_processes_on_one_sqlite_file_never_share_a_job(
    repo: repository.Repository, database_url: str
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL is covered by the concurrent in-process claims")
    made = await make_jobs(repo, 120)
    await repo.release("w1", now=T0)
    now = T0 + dt.timedelta(seconds=1)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLAIMER, database_url, now.isoformat(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    assert await child.stdout.readline() == b"ready\n"
    child.stdin.write(b"go\n")
    await child.stdin.drain()
    mine: list[str] = []
    while got := await repo.claim_due(worker_id="parent", now=now, lease_s=600, limit=3):
        mine += [j.id for j in got]
        await asyncio.sleep(0.002)
    out, _ = await child.communicate()
    assert child.returncode == 0
    theirs = out.decode().split()
    assert mine and theirs  # both really took part
    assert not set(mine) & set(theirs)
    assert sorted(mine + theirs) == sorted(j.id for j in made)
    owners = {j.id: j.lease_owner for j in await repo.list_jobs(limit=1000)}
    assert all(owners[i] == "parent" for i in mine) and all(owners[i] == "child" for i in theirs)


# -- acceptance: `jobs retry` after a full results disk, end to end ------------------------------
@pytest.mark.slow
def test_retry_after_unwritable_results_fetches_them_without_a_second_bes_job(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    """The daemon, Azurite and the emulator as real processes. The results folder cannot be
    made (a file stands where it should be), the job fails ResultUnwritable; once the folder can
    be made, `jobs retry` resumes at the download: the results arrive, the input is archived,
    and BES is not asked for a second job."""
    (tmp_path / "blocked").write_text("not a folder\n")
    with harness.emulator("--run-time-s", "0.1") as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            watch={"output_dir": "blocked/results"})
        s.cli("migrate")
        texts = crash.texts_for(2)
        s.drop("x.csv", crash.csv_text(texts))
        assert s.cli("run", "--once", check=False, timeout=60).returncode == 1
        [job] = s.history()
        assert (job["state"], job["error_code"]) == ("failed", "ResultUnwritable"), job
        assert emu.stats()["submits"] == 1
        assert (s.failed / "x.csv.error.txt").exists()
        (tmp_path / "blocked").unlink()
        s.cli("jobs", "retry", job["job_id"][:8])
        s.cli("run", "--once", timeout=60)
        [again] = s.history()
        assert again["state"] == "done", again
        assert again["runs"] == 2
        assert emu.stats()["submits"] == 1  # the finished BES job's results were fetched again
        result = tmp_path / "blocked" / "results" / "x.output1.csv"
        crash.check_result(result, texts)
        assert (s.archive / "x.csv").read_text() == crash.csv_text(texts)
        assert not (s.failed / "x.csv").exists()
        assert not (s.failed / "x.csv.error.txt").exists()  # it no longer tells the truth
        with sqlite3.connect(tmp_path / "state.db") as db:
            moves = db.execute("SELECT from_state, to_state, message FROM job_events "
                               "WHERE job_id = ? ORDER BY id", (job["job_id"],)).fetchall()
        after = [(a, b) for a, b, _ in moves[[b for _, b, _ in moves].index("failed") + 1:]]
        assert after == [("failed", "remote_finished"), ("remote_finished", "downloaded"),
                         ("downloaded", "done")], moves
        assert "resuming at the download step" in moves[-3][2]
