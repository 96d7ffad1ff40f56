"""The daemon's engine: the jobs this worker holds, the steps that move them, the results.

A held job is one dict entry and one scheduler entry (`scheduler.py`). A fixed pool of executor
tasks runs whatever is due; a job waiting for its backend holds no executor, no semaphore and
no coroutine. Results go through the batch writer as guarded transitions; a guard that fails
means another worker (or a person) owns the job now, and it is dropped from memory without
guessing, unless another step of this worker has moved it on meanwhile.

The parts: `held.Held` (the held jobs and where each is), `scheduler.Scheduler` (when each
job runs), `slots.Slots` (per-service `max_in_flight`), `step_errors` (what an exception
means), `leases.Leases` (claim loop, heartbeat, self-check), `intake_buffer.FileIntake`
(watched folders to job rows), and this module: the executors and applying their results.
`daemon.py` wires them and supervises the tasks `tasks()` returns; docs/architecture.md,
"The worker's parts", walks one job through them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import random
from collections.abc import Callable, Coroutine
from typing import Any

from orchestrator import (
    clock,
    config,
    held,
    intake_buffer,
    jobs,
    leases,
    lifecycle,
    logs,
    metrics,
    pipeline,
    scheduler,
    slots,
    step_errors,
    steps,
    writer,
)
from orchestrator.db import repository

#: How often the claim loop looks for due jobs (tests/test_scaleout.py bounds takeovers by it).
CLAIM_INTERVAL_S = leases.CLAIM_INTERVAL_S

log = logs.get("bes.worker")
#: Transitions logged at info; the others at debug (six info lines a job cost 0.7 ms of CPU).
_NOTEWORTHY = frozenset({
    lifecycle.JobState.STARTED, lifecycle.JobState.FAILING, *lifecycle.TERMINAL_STATES,
})
_OUTCOME = {
    lifecycle.JobState.DONE: "done",
    lifecycle.JobState.FAILED: "failed",
    lifecycle.JobState.CANCELLED: "cancelled",
}

JobState = lifecycle.JobState
StepFor = Callable[[JobState], tuple[lifecycle.Step, pipeline.StepFn]]


@dataclasses.dataclass(kw_only=True)
class Stats:
    """What this worker did in this run (for `run --once`'s summary and progress bar)."""

    claimed: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    transient_errors: int = 0
    internal_errors: int = 0
    throttled: int = 0
    polls: int = 0
    leases_lost: int = 0
    orphans: int = 0


def _limits(settings: config.Settings) -> dict[str, int]:
    return {name: svc.max_in_flight for name, svc in settings.services.items()}


class Worker:
    def __init__(
        self,
        settings: config.Settings,
        repo: repository.Repository,
        *,
        once: bool = False,
        on_change: Callable[[jobs.Job], None] | None = None,
        step_for: StepFor = pipeline.step_for,
        check: Callable[[], None] | None = None,
    ) -> None:
        """`step_for` picks each state's step (tests pass fakes); `check` runs at every
        heartbeat and may raise (the daemon checks the database file is still the same)."""
        self.settings = settings
        self.repo = repo
        self.once = once
        self.worker_id = settings.daemon.worker_id
        self.stats = Stats()
        self._step_for = step_for
        self.scheduler = scheduler.Scheduler()
        self.slots = slots.Slots(_limits(settings))
        self._claim_wake = asyncio.Event()
        self.held = held.Held(self.scheduler, self.slots, on_change=on_change,
                              on_forget=self._claim_wake.set)
        self.rng = random.Random()
        self._writer = writer.BatchWriter(repo, self.worker_id)
        self._ctx: steps.Context | None = None
        self._closed = False
        self.intake = intake_buffer.FileIntake(
            settings, repo, self.worker_id, adopt=self._adopt_created, once=once)
        self.leases = leases.Leases(settings, repo, self.held, wake=self._claim_wake,
                                    adopt=lambda job, new: self._adopt(job, new=new),
                                    check=check)
        metrics.jobs_held.set_function(lambda: len(self.held))
        metrics.executors_busy.set_function(self.held.running)

    # -- what the daemon sees ----------------------------------------------------------------
    def idle(self) -> bool:
        """Nothing held, buffered or due (for `--once`'s drain check)."""
        return not self.held and not self.intake.pending() and self.scheduler.idle()

    def tasks(self, ctx: steps.Context) -> dict[str, Coroutine[Any, Any, None]]:
        """The coroutines the daemon runs and supervises: each runs until cancelled."""
        self._ctx = ctx
        n = self.settings.daemon.executors
        metrics.executors.set(n)
        self._writer.start()
        return {
            "writer": self._run_writer(),
            "timer": self.scheduler.run(),
            "claimer": self.leases.claim_loop(),
            "heartbeat": self.leases.heartbeat_loop(),
            "intake": self.intake.run(),
            "self-check": self._self_check_loop(),
            "lag-report": self.scheduler.report_lag(lambda: len(self.held)),
            **{f"executor-{i}": self._executor(ctx) for i in range(n)},
        }

    async def close(self, *, release: bool = True) -> None:
        """After the tasks are cancelled: commit what is queued, free this worker's leases.
        Safe to call again (it does nothing then). `release=False`: no database access."""
        if self._closed:
            return
        self._closed = True
        log.info("worker_stopping", held=len(self.held), running=self.held.running())
        if not release:
            return
        writer_task: asyncio.Task[None] | None = getattr(self._writer, "_task", None)
        if writer_task is not None and writer_task.done():
            log.error("writer_gone", error="queued changes not written; the next start "
                                           "redoes their steps")
        else:
            try:
                await self._writer.close()
            except Exception as exc:  # what it had not written is redone after the restart
                log.error("writer_close_failed", error=f"{type(exc).__name__}: {exc}")
        try:
            await self.repo.release(self.worker_id, now=clock.now())
        except Exception as exc:  # they expire on their own after lease_s
            log.warning("release_failed", error=str(exc))

    def reload(self, settings: config.Settings) -> None:
        """New limits, policies and watches (the daemon has checked the rest is unchanged)."""
        self.settings = settings
        if self._ctx is not None:
            self._ctx.settings = settings
        for job_id in self.slots.set_limits(_limits(settings)):
            self.scheduler.schedule(job_id)
        self.intake.reload(settings)
        self.leases.settings = settings
        self._claim_wake.set()

    # -- held jobs ---------------------------------------------------------------------------
    def _adopt(self, job: jobs.Job, *, new: bool = True) -> None:
        """A job just claimed or created; one already held and tracked is left as it is."""
        how = self.held.adopt(job)
        if how == "held":
            log.debug("job_reclaimed_while_held", job_id=job.short_id)
        elif how == "changed":
            log.info("job_changed_while_held", job_id=job.short_id, state=job.state.value)
        elif how == "orphan":
            log.warning("job_orphan_recovered", job_id=job.short_id, state=job.state.value,
                        found="reclaimed")
            self.stats.orphans += 1
        elif new:
            self.stats.claimed += 1

    def _adopt_created(self, job: jobs.Job) -> None:
        """A job the intake just inserted. It hands a burst over once the whole burst is in, so
        the self-check may have found and adopted the job meanwhile, and a step may have moved
        it on: the copy already held is the newer one, never replaced by the inserted row."""
        if job.id not in self.held:
            self._adopt(job)

    def _drop(self, job_id: str) -> None:
        """The lease is gone: forget the job, never guess at it."""
        self.held.drop(job_id)
        self.stats.leases_lost += 1
        metrics.leases_lost.inc()

    # -- running steps -----------------------------------------------------------------------
    async def _executor(self, ctx: steps.Context) -> None:
        while True:
            job_id = await self.scheduler.next()
            job = self.held.get(job_id)
            if job is None:
                continue
            with self.held.run(job_id):
                await self._run_one(job, ctx)

    async def _run_one(self, job: jobs.Job, ctx: steps.Context) -> None:
        step, fn = self._step_for(job.state)
        bound = _Bound(job_id=job.short_id, service=job.service, step=step.value)
        reserved = False
        if step is lifecycle.Step.SUBMIT and job.service in self.settings.services:
            if not self.slots.reserve(job.service, job.id):
                return  # parked: `held.release` schedules it when a slot frees
            reserved = True
        try:
            result = await self._call(job, fn, ctx, bound)
            if result is not None:
                await self._apply(job, result, bound)
        finally:
            if reserved:  # the SUBMITTED state (if reached) now holds the slot itself
                self.held.release(job.service)

    async def _call(
        self, job: jobs.Job, fn: pipeline.StepFn, ctx: steps.Context, bound: Any
    ) -> steps.StepResult | None:
        """Run a step; map exceptions to a result, or None when the job was rescheduled."""
        refused = step_errors.refusal(job, self.settings)
        if refused is not None:
            return refused
        try:
            return await fn(job, ctx)
        except Exception as exc:
            return self._on_error(job, exc, bound)

    def _on_error(self, job: jobs.Job, exc: Exception, bound: Any) -> steps.Fail | None:
        kind = step_errors.kind_of(exc)
        failures = 0
        if kind is step_errors.Kind.THROTTLED:
            self.stats.throttled += 1  # the metric counts answers, in the backend's client
        elif kind is step_errors.Kind.TRANSIENT:
            self.stats.transient_errors += 1
            metrics.transient_errors.labels(job.service).inc()
            self.held.transient[job.id] += 1
            failures = self.held.transient[job.id]
        elif kind is step_errors.Kind.INTERNAL:
            self.stats.internal_errors += 1
            metrics.internal_errors.labels(job.service).inc()
            self.held.internal[job.id] += 1
            failures = self.held.internal[job.id]
            bound.error("step_crashed", error=f"{type(exc).__name__}: {exc}",
                        failures=failures, exc_info=exc)
        decision = step_errors.decide(exc, failures=failures, rng=self.rng,
                                      policy=self.settings.service(job.service).retry)
        if isinstance(decision, steps.Fail):
            return decision
        if kind is step_errors.Kind.THROTTLED:
            bound.info("step_throttled", retry_after_s=decision.delay_s)
        elif kind is step_errors.Kind.TRANSIENT:
            bound.info("step_retry", error=str(exc), failures=failures,
                       retry_in_s=round(decision.delay_s, 2))
        self.scheduler.schedule(job.id, decision.delay_s)
        return None

    # -- applying results --------------------------------------------------------------------
    async def _apply(self, job: jobs.Job, result: steps.StepResult, bound: Any) -> None:
        now = clock.now()
        if isinstance(result, steps.Wait):
            self._wait(job, result, now)
            return
        fields: dict[str, Any]
        if isinstance(result, steps.Fail):
            to, message = JobState.FAILING, f"{result.code}: {result.message}"
            fields = {**result.fields, "error": result.message, "error_code": result.code}
            bound.warning("job_failing", code=result.code, error=result.message)
        else:
            to, message, fields = result.to, result.message, dict(result.fields)
        if to in lifecycle.TERMINAL_STATES:
            fields.setdefault("finished_at", now)
        t = jobs.Transition(job_id=job.id, expected=job.state, to=to, message=message,
                            fields=fields,  # type: ignore[arg-type]
                            next_run_at=now)
        try:
            applied = await asyncio.shield(self._writer.submit(t))
        except Exception as exc:
            if not _is_rejected(exc):
                raise
            await self._rejected(job, str(exc), bound)
            return
        if not applied:
            self._lost_guard(job.id, job.state, bound)
            return
        self.held.transient.pop(job.id, None)
        self.held.internal.pop(job.id, None)
        new = dataclasses.replace(job, state=to, updated_at=now, next_run_at=now, **fields)
        level = bound.info if to in _NOTEWORTHY else bound.debug
        level("job_" + to.value, message=message)
        self._count(new, now)
        self.held.update(new)
        if new.id in self.held:
            # A job just started cannot have finished yet: its first poll waits initial_s.
            delay = (self.settings.service(new.service).poll.initial_s
                     if to is JobState.STARTED and new.service in self.settings.services
                     else 0.0)
            self.scheduler.schedule(new.id, delay)

    def _wait(self, job: jobs.Job, result: steps.Wait, now: dt.datetime) -> None:
        self.stats.polls += 1
        self.held.transient.pop(job.id, None)
        self.held.internal.pop(job.id, None)
        next_run = now + dt.timedelta(seconds=result.delay_s)
        self.held.replace(_replaced(
            job, bes_status=result.bes_status, poll_count=result.poll_count,
            next_run_at=next_run))
        self.scheduler.schedule(job.id, result.delay_s)
        if result.bes_status != job.bes_status:
            # Only a status change is written (with its event): "still running" costs no
            # write, so thousands of waiting jobs cost no database time. After a crash the
            # job is polled at once and its backoff restarts from the stored poll_count.
            fut = self._writer.submit(jobs.Reschedule(
                job_id=job.id, expected=job.state, next_run_at=next_run,
                bes_status=result.bes_status, poll_count=result.poll_count,
            ))
            fut.add_done_callback(functools.partial(self._on_reschedule_done, job.id, job.state))

    def _on_reschedule_done(
        self, job_id: str, expected: JobState, fut: asyncio.Future[bool]
    ) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            if _is_rejected(exc):
                job = self.held.get(job_id)
                if job is not None and job.state is expected:
                    self._fail_rejected(job, str(exc))
            return
        if fut.result() is False:
            self._lost_guard(job_id, expected, log.bind(job_id=job_id[:8]))

    def _lost_guard(self, job_id: str, expected: JobState, bound: Any) -> None:
        """A guarded write changed no row. Drop the job only if this worker still has it in the
        state the write expected: if another of its steps has moved it on meanwhile, that
        step's write succeeded and the job is still ours."""
        held = self.held.get(job_id)
        if held is not None and held.state is not expected:
            bound.warning("stale_write_ignored", expected=expected.value, now=held.state.value)
            return
        bound.warning("lease_lost", expected=expected.value)
        self._drop(job_id)

    async def _rejected(self, job: jobs.Job, reason: str, bound: Any) -> None:
        """The writer refused the change for good (a bug, e.g. a bad field): fail the job with
        the reason, a change that can always be written, instead of retrying it forever."""
        bound.error("write_rejected", error=reason)
        self._fail_rejected(job, reason)

    def _fail_rejected(self, job: jobs.Job, reason: str) -> None:
        now = clock.now()
        message = f"the change could not be written: {reason}"
        t = jobs.Transition(
            job_id=job.id, expected=job.state, to=JobState.FAILING,
            message=f"InternalError: {message}",
            fields={"error": message, "error_code": "InternalError"}, next_run_at=now)
        if job.state is JobState.FAILING and job.error_code == "InternalError":
            # Its own failure cannot be written either: stop here, loudly, and let a restart
            # (or `jobs show`) look at it rather than loop.
            log.error("job_stuck", job_id=job.short_id, error=reason)
            self.held.forget(job.id)
            return
        fut = self._writer.submit(t)
        failing = dataclasses.replace(job, state=JobState.FAILING, error=message,
                                      error_code="InternalError", next_run_at=now)

        def done(f: asyncio.Future[bool]) -> None:
            if f.cancelled() or f.exception() is not None or not f.result():
                log.error("job_stuck", job_id=job.short_id, error=reason)
                self.held.forget(job.id)
                return
            self.held.update(failing)
            self.scheduler.schedule(job.id)

        fut.add_done_callback(done)

    def _count(self, job: jobs.Job, now: dt.datetime) -> None:
        outcome = _OUTCOME.get(job.state)
        if outcome is None:
            return
        if job.state is JobState.DONE:
            self.stats.done += 1
        elif job.state is JobState.FAILED:
            self.stats.failed += 1
        else:
            self.stats.cancelled += 1
        metrics.jobs_finished.labels(job.service, outcome).inc()
        metrics.job_duration.labels(job.service, outcome).observe(
            max(0.0, (now - job.created_at).total_seconds()))

    # -- the loops ---------------------------------------------------------------------------
    async def _run_writer(self) -> None:
        """The batch writer's task, supervised like the others. Cancelling this does not stop
        the writer: `close()` flushes it after the executors are gone."""
        task: asyncio.Task[None] | None = getattr(self._writer, "_task", None)
        if task is None:  # pragma: no cover - the writer always has its task once started
            raise RuntimeError("the batch writer has no task")
        await asyncio.shield(task)
        raise RuntimeError("the batch writer stopped")

    async def _self_check_loop(self) -> None:
        while True:
            await asyncio.sleep(leases.SELF_CHECK_S)
            await self.self_check()

    async def self_check(self) -> int:
        """See `leases.Leases.self_check`; returns how many orphans it found."""
        orphans = await self.leases.self_check()
        self.stats.orphans += len(orphans)
        return len(orphans)


# `_replaced` copies the fields' dict: right only while Job has no __post_init__ and no slots.
assert not hasattr(jobs.Job, "__post_init__") and "__slots__" not in vars(jobs.Job)


def _replaced(job: jobs.Job, **changes: Any) -> jobs.Job:
    """`dataclasses.replace` for the poll path (every "still running" answer): the same record,
    about 4× cheaper than calling the 33-field frozen __init__ again."""
    new = object.__new__(jobs.Job)
    new.__dict__.update(job.__dict__, **changes)
    return new


class _Bound:
    """`log.bind(**context)`, made on first use: a poll that only says "still running" logs
    nothing, and binding cost ~1.5 % of the daemon's CPU at 333 polls/s."""

    __slots__ = ("_context", "_logger")

    def __init__(self, **context: Any) -> None:
        self._context = context
        self._logger: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._logger is None:
            self._logger = log.bind(**self._context)
        return getattr(self._logger, name)


def _is_rejected(exc: BaseException) -> bool:
    """The writer's "this item can never apply"."""
    return isinstance(exc, writer.ItemRejected)

