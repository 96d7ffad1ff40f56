"""The worker in-process: fake step functions (tests/engine_fakes.py), a real SQLite file,
the real scheduler, slots, batch writer, claimer and heartbeat."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from orchestrator import clock, errors, lifecycle, metrics, steps
from orchestrator.db import repository
from tests import engine_fakes as ef

Step = lifecycle.Step


async def _setup(tmp_path: Path, monkeypatch: Any, **kw: Any) -> tuple[Any, Any]:
    settings = ef.load_settings(ef.write_config(tmp_path, **kw), monkeypatch)
    return settings, await ef.open_repo(settings)


async def test_jobs_park_at_max_in_flight_and_all_finish(
    tmp_path: Path, monkeypatch: Any
) -> None:
    settings, repo = await _setup(tmp_path, monkeypatch, max_in_flight=3, executors=10)
    backend = ef.FakeBackend(polls=5, poll_delay_s=0.02)
    parked_seen = 0
    try:
        await ef.enqueue(repo, 20)
        async with ef.running_daemon(settings, repo, backend) as (d, _task):
            async def all_done() -> bool:
                nonlocal parked_seen
                parked_seen = max(parked_seen, d.worker.slots.parked("svc"))
                return (await ef.states(repo))["done"] == 20

            await ef.wait_until(all_done, 60, "20 jobs done")
            assert d.worker.slots.used("svc") == 0
        assert backend.max_remote == 3  # the limit was reached and never passed
        assert parked_seen > 0
        assert backend.overlaps == 0
    finally:
        await repo.close()


async def test_a_lost_lease_drops_the_job_and_leaves_it_to_its_new_owner(
    tmp_path: Path, monkeypatch: Any
) -> None:
    settings, repo = await _setup(tmp_path, monkeypatch)
    gate = asyncio.Event()
    backend = ef.FakeBackend(gates={Step.UPLOAD: gate})
    lost_before = metrics.leases_lost._value.get()
    try:
        await ef.enqueue(repo, 1)
        async with ef.running_daemon(settings, repo, backend) as (d, _task):
            await ef.wait_until(lambda: backend.entered[Step.UPLOAD] == 1, what="upload runs")
            (job_id,) = [r[0] for r in ef.sql(settings, "select id from jobs")]
            # Another daemon takes the lease (as after an expiry): a fault made directly in
            # the database, since two daemons would need this one's lease to lapse first.
            later = clock.now() + dt.timedelta(hours=1)
            ef.sql(settings, "update jobs set lease_owner = 'other', lease_expires_at = ? "
                             "where id = ?", ef.ts(later), job_id)
            gate.set()
            await ef.wait_until(lambda: d.worker.stats.leases_lost == 1, what="lease lost")
            assert len(d.worker.held) == 0
            await asyncio.sleep(0.3)  # nothing more happens to it here
            assert backend.calls[(job_id, Step.SUBMIT)] == 0
        rows = ef.sql(settings, "select state, lease_owner from jobs")
        assert rows == [("accepted", "other")]  # its state as the new owner found it
        assert metrics.leases_lost._value.get() == lost_before + 1
    finally:
        await repo.close()


async def test_a_cancel_by_a_person_drops_the_job_then_it_is_cancelled(
    tmp_path: Path, monkeypatch: Any
) -> None:
    settings, repo = await _setup(tmp_path, monkeypatch)
    gate = asyncio.Event()
    backend = ef.FakeBackend(gates={Step.UPLOAD: gate})
    try:
        await ef.enqueue(repo, 1)
        async with ef.running_daemon(settings, repo, backend) as (d, _task):
            await ef.wait_until(lambda: backend.entered[Step.UPLOAD] == 1, what="upload runs")
            (job_id,) = [r[0] for r in ef.sql(settings, "select id from jobs")]
            await repo.request_cancel(job_id, now=clock.now())
            gate.set()
            await ef.wait_until(lambda: ef.states(repo), what="states")
            await ef.wait_until(
                lambda: ef.sql(settings, "select state from jobs") == [("cancelled",)], 20,
                "cancelled")
            assert d.worker.stats.leases_lost == 1
            assert d.worker.stats.cancelled == 1
    finally:
        await repo.close()


async def test_transient_and_internal_errors_are_counted_apart(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Four transient errors and one bug used to add up to five "internal" errors and fail
    the job InternalError; each kind now has its own count."""
    settings, repo = await _setup(tmp_path, monkeypatch)
    backend = ef.FakeBackend(polls=0, faults={
        Step.UPLOAD: [ef.transient(), ef.transient(), ef.transient(), ef.transient(),
                      RuntimeError("a bug")],
    })
    transient_before = metrics.transient_errors.labels("svc")._value.get()
    internal_before = metrics.internal_errors.labels("svc")._value.get()
    try:
        await ef.enqueue(repo, 1)
        async with ef.running_daemon(settings, repo, backend) as (d, _task):
            await ef.wait_until(lambda: d.worker.stats.done == 1, 30, "done")
            assert d.worker.stats.transient_errors == 4
            assert d.worker.stats.internal_errors == 1
        assert metrics.transient_errors.labels("svc")._value.get() == transient_before + 4
        assert metrics.internal_errors.labels("svc")._value.get() == internal_before + 1
        assert ef.sql(settings, "select state, error_code from jobs") == [("done", None)]
    finally:
        await repo.close()


async def test_repeated_internal_errors_fail_the_job_internal_error(
    tmp_path: Path, monkeypatch: Any
) -> None:
    settings, repo = await _setup(tmp_path, monkeypatch)
    backend = ef.FakeBackend(faults={Step.UPLOAD: [KeyError(f"bug {i}") for i in range(5)]})
    try:
        await ef.enqueue(repo, 1)
        async with ef.running_daemon(settings, repo, backend) as (d, _task):
            await ef.wait_until(lambda: d.worker.stats.failed == 1, 30, "failed")
            assert d.worker.stats.internal_errors == 5
            assert d.worker.stats.transient_errors == 0
        ((state, code, error),) = ef.sql(settings, "select state, error_code, error from jobs")
        assert (state, code) == ("failed", "InternalError")
        assert "KeyError" in error
    finally:
        await repo.close()


async def test_permanent_error_fails_at_once(tmp_path: Path, monkeypatch: Any) -> None:
    settings, repo = await _setup(tmp_path, monkeypatch)
    backend = ef.FakeBackend(faults={Step.SUBMIT: [errors.PermanentError("no", code="Bad")]})
    try:
        await ef.enqueue(repo, 1)
        async with ef.running_daemon(settings, repo, backend) as (d, _task):
            await ef.wait_until(lambda: d.worker.stats.failed == 1, 30, "failed")
        assert ef.sql(settings, "select state, error_code from jobs") == [("failed", "Bad")]
        assert backend.remote == 0
    finally:
        await repo.close()


async def test_shutdown_with_jobs_in_flight_releases_every_lease(
    tmp_path: Path, monkeypatch: Any
) -> None:
    settings, repo = await _setup(tmp_path, monkeypatch, executors=10, max_in_flight=100)
    hold = asyncio.Event()  # never set: ten jobs stay inside their download step
    backend = ef.FakeBackend(polls=1_000_000, poll_delay_s=0.05, gates={Step.DOWNLOAD: hold})
    try:
        await ef.enqueue(repo, 30)
        async with ef.running_daemon(settings, repo, backend) as (d, task):
            await ef.wait_until(lambda: d.worker.stats.polls >= 30, 30, "polling")
            d.request_stop()
            t0 = clock.monotonic()
            outcome = await asyncio.wait_for(task, 10)
            assert clock.monotonic() - t0 < 5
            assert outcome.exit_code == 0
        rows = ef.sql(settings, "select state, lease_owner, attempts from jobs")
        assert len(rows) == 30
        assert {r[0] for r in rows} == {"started"}  # nothing lost, nothing finished
        assert all(r[1] is None for r in rows)  # every lease released
        assert all(r[2] == 0 for r in rows)  # a clean stop is not counted as an attempt
        (stopped,) = ef.sql(settings, "select stopped_at from workers where id = 'w-test'")
        assert stopped[0] is not None
    finally:
        await repo.close()


async def test_a_job_reclaimed_while_held_is_not_run_twice(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The database says this worker's leases expired (a clock step, a late heartbeat) while
    its steps still run them: the claimer takes them again, and nothing runs twice."""
    settings, repo = await _setup(tmp_path, monkeypatch, executors=20, heartbeat_s=30.0,
                                   lease_s=60.0)
    gate = asyncio.Event()
    backend = ef.FakeBackend(polls=3, gates={Step.SUBMIT: gate})
    try:
        await ef.enqueue(repo, 40)
        async with ef.running_daemon(settings, repo, backend) as (d, _task):
            await ef.wait_until(lambda: backend.entered[Step.SUBMIT] >= 20, 30, "submits wait")
            past = clock.now() - dt.timedelta(minutes=5)
            ef.sql(settings, "update jobs set lease_expires_at = ?", ef.ts(past))
            # The claimer takes them all again (its own, lapsed): wait for that.
            await ef.wait_until(lambda: ef.sql(
                settings, "select count(*) from jobs where lease_expires_at > ?",
                ef.ts(clock.now()))[0][0] == 40, 20, "reclaimed")
            gate.set()
            await ef.wait_until(lambda: d.worker.stats.done == 40, 60, "all done")
        assert backend.overlaps == 0
        assert all(n == 1 for (_, step), n in backend.calls.items() if step is Step.SUBMIT)
        assert d.worker.stats.leases_lost == 0
        assert d.worker.stats.orphans == 0
    finally:
        await repo.close()


async def test_self_check_recovers_a_job_nobody_would_run(
    tmp_path: Path, monkeypatch: Any
) -> None:
    settings, repo = await _setup(tmp_path, monkeypatch)
    backend = ef.FakeBackend(polls=10_000, poll_delay_s=0.05)
    try:
        await ef.enqueue(repo, 3)
        async with ef.running_daemon(settings, repo, backend) as (d, _task):
            await ef.wait_until(lambda: d.worker.stats.polls >= 3, 30, "polling")
            backend.polls = 0  # the next poll finishes them
            (victim,) = [r[0] for r in ef.sql(settings, "select id from jobs limit 1")]
            # A bug that loses a job's timer (the fault the self-check exists for).
            await ef.wait_until(lambda: d.worker.scheduler.is_scheduled(victim), 5, "waiting")
            d.worker.scheduler.cancel(victim)
            await ef.wait_until(lambda: d.worker.stats.done == 2, 30, "two done")
            await asyncio.sleep(0.2)
            assert d.worker.stats.done == 2  # the third waits for nothing
            assert await d.worker.self_check() == 1
            await ef.wait_until(lambda: d.worker.stats.done == 3, 30, "third done")
            assert await d.worker.self_check() == 0
    finally:
        await repo.close()


async def test_a_change_the_writer_rejects_fails_the_job_with_the_reason(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A step's result that can never be written (an unknown field, an illegal state change)
    fails its job InternalError with the reason; the other jobs go on."""
    settings, repo = await _setup(tmp_path, monkeypatch)
    backend = ef.FakeBackend(polls=0)
    bad: dict[str, str] = {}

    def hook(job: Any, step: lifecycle.Step) -> None:
        if step is Step.UPLOAD and not bad:
            bad["field"] = job.id
        elif step is Step.UPLOAD and len(bad) == 1 and job.id != bad["field"]:
            bad["edge"] = job.id

    backend.hook = hook
    answer = backend._answer

    def poisoned(step: lifecycle.Step, job: Any) -> Any:
        if step is Step.UPLOAD and job.id == bad.get("field"):
            return steps.Advance(to=lifecycle.JobState.UPLOADED, message="uploaded",
                                    fields={"no_such_column": 1})  # type: ignore[typeddict-unknown-key]
        if step is Step.UPLOAD and job.id == bad.get("edge"):
            return steps.Advance(to=lifecycle.JobState.DONE, message="skipped ahead")
        return answer(step, job)

    monkeypatch.setattr(backend, "_answer", poisoned)
    try:
        await ef.enqueue(repo, 4)
        async with ef.running_daemon(settings, repo, backend) as (d, _task):
            await ef.wait_until(lambda: d.worker.stats.done + d.worker.stats.failed == 4, 30,
                                "all ended")
        rows = dict((r[0], (r[1], r[2], r[3])) for r in ef.sql(
            settings, "select id, state, error_code, error from jobs"))
        assert rows[bad["field"]][:2] == ("failed", "InternalError")
        assert "no_such_column" in rows[bad["field"]][2]
        assert rows[bad["edge"]][:2] == ("failed", "InternalError")
        assert "done" in rows[bad["edge"]][2]
        assert sorted(v[0] for v in rows.values()) == ["done", "done", "failed", "failed"]
    finally:
        await repo.close()


async def test_a_stale_write_does_not_drop_a_job_another_step_advanced(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The guard of a write expecting `accepted` fails because this worker's own faster step
    already moved the job to `uploaded`: the job stays held. Expecting the state it is in,
    the lease is really gone: dropped."""
    from orchestrator import jobs, worker

    settings, repo = await _setup(tmp_path, monkeypatch)
    try:
        (job,) = await repo.create_jobs(
            [jobs.NewJob(id="a" * 32, service="svc", watch=None, claim_key="k1",
                         source_path="/x/a.csv", input_name="a.csv", output_dir="/o",
                         archive_dir="/a", failed_dir="/f")],
            worker_id="w-test", now=clock.now(), lease_s=30.0)
        w = worker.Worker(settings, repo)
        w.held.adopt(job)
        advanced = dataclasses.replace(job, state=lifecycle.JobState.UPLOADED)
        w.held.update(advanced)
        w._lost_guard(job.id, lifecycle.JobState.ACCEPTED, w_log())
        assert job.id in w.held and w.stats.leases_lost == 0
        w._lost_guard(job.id, lifecycle.JobState.UPLOADED, w_log())
        assert job.id not in w.held and w.stats.leases_lost == 1
        assert not w.scheduler.is_scheduled(job.id)
    finally:
        await repo.close()


async def test_the_intake_never_replaces_a_held_job_with_its_inserted_row(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The intake hands a burst to the worker once the burst is inserted; the self-check may
    have adopted one of its jobs first and a step moved it on. The inserted (older) row must
    not replace it: that would run the claim step again and drop the job on its lost guard."""
    from orchestrator import jobs, worker

    settings, repo = await _setup(tmp_path, monkeypatch)
    try:
        (job,) = await repo.create_jobs(
            [jobs.NewJob(id="c" * 32, service="svc", watch=None, claim_key="k3",
                         source_path="/x/c.csv", input_name="c.csv", output_dir="/o",
                         archive_dir="/a", failed_dir="/f")],
            worker_id="w-test", now=clock.now(), lease_s=30.0)
        w = worker.Worker(settings, repo)
        w.held.adopt(job)  # the self-check's adoption
        advanced = dataclasses.replace(job, state=lifecycle.JobState.ACCEPTED)
        w.held.update(advanced)  # its claim step ran
        w.scheduler.cancel(job.id)  # waiting between steps (as the held copy is tracked)
        w.scheduler.schedule(job.id, 60.0)
        w._adopt_created(job)  # the intake's hand-over, with the row as inserted
        held = w.held.get(job.id)
        assert held is not None and held.state is lifecycle.JobState.ACCEPTED
        assert w.stats.orphans == 0
    finally:
        await repo.close()


def w_log() -> Any:
    from orchestrator import logs

    return logs.get("test")


@pytest.mark.skipif(not hasattr(repository.Repository, "leased_jobs"),
                    reason="needs Repository.leased_jobs(worker_id) (the repository's part)")
async def test_self_check_adopts_a_job_leased_to_this_worker_that_it_does_not_hold(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A row leased to this worker that it does not hold: nobody else may take it, and the
    heartbeat renews its lease forever. The self-check adopts it."""
    from orchestrator import jobs

    settings, repo = await _setup(tmp_path, monkeypatch)
    backend = ef.FakeBackend(polls=0)
    try:
        async with ef.running_daemon(settings, repo, backend) as (d, _task):
            await repo.create_jobs(
                [jobs.NewJob(id="b" * 32, service="svc", watch=None, claim_key="k2",
                             source_path="/x/b.csv", input_name="b.csv", output_dir="/o",
                             archive_dir="/a", failed_dir="/f")],
                worker_id="w-test", now=clock.now(), lease_s=30.0)
            await asyncio.sleep(1.5)  # several claim rounds: none takes it
            assert d.worker.stats.done == 0
            assert await d.worker.self_check() == 1
            await ef.wait_until(lambda: d.worker.stats.done == 1, 20, "adopted and done")
    finally:
        await repo.close()
