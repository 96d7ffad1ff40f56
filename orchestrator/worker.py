"""The daemon's engine: claim jobs, run their steps, apply the results.

A job this worker holds is one dict entry and one timer-heap entry. A fixed pool of executor
tasks runs whatever is due; a job waiting for BES holds no executor, no semaphore and no
coroutine (DESIGN.md, "The core idea"). Results go through the batch writer as guarded
transitions; a guard that fails means another worker (or a person) owns the job now, and it is
dropped from memory without guessing.

Concurrency limits: per service (`max_in_flight` BES jobs submitted and not yet seen to end;
jobs ready to submit beyond that wait in a FIFO without holding anything), per stage (uploads,
downloads, inside `storage.blob`), and global (open HTTP connections: the session's connector).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import heapq
import itertools
import os
import random
import socket
from collections.abc import Callable
from typing import Any

import aiohttp

from orchestrator import (
    backoff,
    clock,
    config,
    errors,
    jobs,
    lifecycle,
    logs,
    pipeline,
    steps,
    watcher,
    writer,
)
from orchestrator.db import repository
from orchestrator.steps import intake

CLAIM_INTERVAL_S = 0.5
CLAIM_BATCH = 500
#: Failed inserts of one batch of files before they are left to the next rescan.
MAX_INSERT_FAILURES = 6
LAG_REPORT_S = 10.0
MAX_LAG_SAMPLES = 100_000
#: A bug in a step is retried like a transient error, but not forever.
MAX_INTERNAL_ERRORS = 5

log = logs.get("bes.worker")
#: Transitions logged at info; the others at debug (six info lines a job cost 0.7 ms of CPU).
_NOTEWORTHY = frozenset({
    lifecycle.JobState.STARTED, lifecycle.JobState.FAILING, *lifecycle.TERMINAL_STATES,
})

JobState = lifecycle.JobState


@dataclasses.dataclass(kw_only=True)
class Stats:
    """What this worker did in this run (for `run --once`'s summary and progress bar)."""

    claimed: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    transient_errors: int = 0
    throttled: int = 0
    polls: int = 0


class Worker:
    def __init__(
        self,
        settings: config.Settings,
        repo: repository.Repository,
        *,
        once: bool = False,
        on_change: Callable[[jobs.Job], None] | None = None,
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.once = once
        self.worker_id = settings.daemon.worker_id
        self.stats = Stats()
        self._on_change = on_change
        self._held: dict[str, jobs.Job] = {}
        self._gen: dict[str, int] = {}
        self._heap: list[tuple[float, int, str, int]] = []
        self._seq = itertools.count()
        #: (job id, generation, when it was due): the due time measures scheduling lag.
        self._ready: asyncio.Queue[tuple[str, int, float]] = asyncio.Queue()
        self._lags: list[float] = []
        self._heap_changed = asyncio.Event()
        self._claim_wake = asyncio.Event()
        self._remote: collections.Counter[str] = collections.Counter()
        self._parked: dict[str, collections.deque[str]] = collections.defaultdict(
            collections.deque
        )
        self._failures: collections.Counter[str] = collections.Counter()
        self._rng = random.Random()
        self._writer = writer.BatchWriter(repo, self.worker_id)
        self._watcher: watcher.FolderWatcher | None = None
        self._files: list[watcher.Candidate] = []  #: settled files not yet inserted
        self._files_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._intake_done = asyncio.Event()
        self.ready = asyncio.Event()  #: set once intake is up (systemd READY=1)

    # -- held jobs ---------------------------------------------------------------------------
    def _set(self, job: jobs.Job) -> None:
        old = self._held.get(job.id)
        if old is not None and old.state in lifecycle.REMOTE_STATES:
            self._remote[old.service] -= 1
        if job.state in lifecycle.TERMINAL_STATES:
            self._drop(job.id, already_uncounted=True)
        else:
            self._held[job.id] = job
            if job.state in lifecycle.REMOTE_STATES:
                self._remote[job.service] += 1
        if old is not None and old.state in lifecycle.REMOTE_STATES and (
            job.state not in lifecycle.REMOTE_STATES
        ):
            self._unpark(job.service)
        if self._on_change is not None:
            self._on_change(job)

    def _drop(self, job_id: str, *, already_uncounted: bool = False) -> None:
        old = self._held.pop(job_id, None)
        self._gen.pop(job_id, None)
        self._failures.pop(job_id, None)
        if old is not None and not already_uncounted and old.state in lifecycle.REMOTE_STATES:
            self._remote[old.service] -= 1
            self._unpark(old.service)
        self._claim_wake.set()

    def _schedule(self, job_id: str, delay_s: float = 0.0) -> None:
        gen = self._gen.get(job_id, 0) + 1
        self._gen[job_id] = gen
        if delay_s <= 0:
            self._ready.put_nowait((job_id, gen, clock.monotonic()))
            return
        heapq.heappush(self._heap, (clock.monotonic() + delay_s, next(self._seq), job_id, gen))
        self._heap_changed.set()

    def _adopt(self, job: jobs.Job) -> None:
        self.stats.claimed += 1
        self._set(job)
        if job.id in self._held:
            delay = (job.next_run_at - clock.now()).total_seconds()
            self._schedule(job.id, max(0.0, delay))

    def _unpark(self, service: str) -> None:
        queue = self._parked.get(service)
        svc = self.settings.services.get(service)
        if svc is not None and self._remote[service] >= svc.max_in_flight:
            return
        while queue:
            job_id = queue.popleft()
            if job_id in self._held:
                self._schedule(job_id)
                return

    def _take_remote_slot(self, job: jobs.Job) -> bool:
        svc = self.settings.services.get(job.service)
        if svc is None or self._remote[job.service] < svc.max_in_flight:
            self._remote[job.service] += 1  # reserved for the duration of the submit step
            return True
        self._parked[job.service].append(job.id)
        return False

    # -- the loops ---------------------------------------------------------------------------
    async def _timer(self) -> None:
        """Move due heap entries to the ready queue. One task for any number of waiting jobs."""
        while True:
            now = clock.monotonic()
            while self._heap and self._heap[0][0] <= now:
                due, _, job_id, gen = heapq.heappop(self._heap)
                if self._gen.get(job_id) == gen:
                    self._ready.put_nowait((job_id, gen, due))
            timeout = self._heap[0][0] - now if self._heap else 3600.0
            self._heap_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._heap_changed.wait(), timeout)

    async def _executor(self, ctx: steps.Context) -> None:
        while True:
            job_id, gen, due = await self._ready.get()
            job = self._held.get(job_id)
            if job is None or self._gen.get(job_id) != gen:
                continue
            if len(self._lags) < MAX_LAG_SAMPLES:
                self._lags.append(clock.monotonic() - due)
            await self._run_one(job, ctx)

    async def _run_one(self, job: jobs.Job, ctx: steps.Context) -> None:
        step, fn = pipeline.step_for(job.state)
        bound = log.bind(job_id=job.short_id, service=job.service, step=step.value)
        reserved = False
        if step is lifecycle.Step.SUBMIT:
            if not self._take_remote_slot(job):
                return
            reserved = True
        try:
            result = await self._call(job, fn, ctx, bound)
            if result is not None:
                await self._apply(job, step, result, bound)
        finally:
            if reserved:  # the SUBMITTED state (if reached) now holds the slot itself
                self._remote[job.service] -= 1
                self._unpark(job.service)

    async def _call(
        self, job: jobs.Job, fn: pipeline.StepFn, ctx: steps.Context, bound: Any
    ) -> steps.StepResult | None:
        """Run a step; map exceptions to a result, or None when the job was rescheduled."""
        if job.service not in self.settings.services:
            return steps.Fail(code="UnknownService", message=f"no service named {job.service!r}")
        if job.attempts > self.settings.daemon.max_claims and job.state not in (
            JobState.FAILING, JobState.CANCELLING
        ):
            return steps.Fail(
                code="TooManyAttempts",
                message=f"claimed {job.attempts} times without finishing (a crash loop?)",
            )
        try:
            return await fn(job, ctx)
        except errors.PermanentError as exc:
            return steps.Fail(code=exc.code or "Error", message=str(exc))
        except errors.ThrottledError as exc:
            self.stats.throttled += 1
            delay = exc.retry_after_s if exc.retry_after_s is not None else 5.0
            bound.info("step_throttled", retry_after_s=delay)
            self._schedule(job.id, delay)
            return None
        except errors.TransientError as exc:
            return self._transient(job, exc, bound)
        except Exception as exc:  # a bug: keep the daemon alive, retry a few times, then fail
            bound.exception("step_crashed", error=str(exc))
            self._failures[job.id] += 1
            if self._failures[job.id] >= MAX_INTERNAL_ERRORS:
                return steps.Fail(code="InternalError", message=f"{type(exc).__name__}: {exc}")
            self._schedule(job.id, backoff.retry_delay_s(
                self.settings.service(job.service).retry, self._failures[job.id], rng=self._rng))
            return None

    def _transient(
        self, job: jobs.Job, exc: errors.TransientError, bound: Any
    ) -> steps.Fail | None:
        self.stats.transient_errors += 1
        self._failures[job.id] += 1
        policy = self.settings.service(job.service).retry
        if backoff.retries_exhausted(policy, self._failures[job.id]):
            return steps.Fail(code=exc.code or "TransientError", message=str(exc))
        delay = backoff.retry_delay_s(
            policy, self._failures[job.id], retry_after_s=exc.retry_after_s, rng=self._rng
        )
        bound.info("step_retry", error=str(exc), failures=self._failures[job.id],
                   retry_in_s=round(delay, 2))
        self._schedule(job.id, delay)
        return None

    async def _apply(
        self, job: jobs.Job, step: lifecycle.Step, result: steps.StepResult, bound: Any
    ) -> None:
        now = clock.now()
        if isinstance(result, steps.Wait):
            self.stats.polls += 1
            self._failures.pop(job.id, None)
            next_run = now + dt.timedelta(seconds=result.delay_s)
            new = dataclasses.replace(job, bes_status=result.bes_status,
                                      poll_count=result.poll_count, next_run_at=next_run)
            self._held[job.id] = new
            self._schedule(job.id, result.delay_s)
            if result.bes_status != job.bes_status:
                # Only a status change is written (with its event): "still running" costs no
                # write, so thousands of waiting jobs cost no database time. After a crash the
                # job is polled at once and its backoff restarts from the stored poll_count.
                fut = self._writer.submit(jobs.Reschedule(
                    job_id=job.id, expected=job.state, next_run_at=next_run,
                    bes_status=result.bes_status, poll_count=result.poll_count,
                ))
                fut.add_done_callback(functools.partial(self._on_reschedule_done, job.id))
            return
        if isinstance(result, steps.Fail):
            to, message = JobState.FAILING, f"{result.code}: {result.message}"
            fields: dict[str, object] = {
                **result.fields, "error": result.message, "error_code": result.code
            }
            bound.warning("job_failing", code=result.code, error=result.message)
        else:
            to, message, fields = result.to, result.message, dict(result.fields)
        if to in lifecycle.TERMINAL_STATES:
            fields.setdefault("finished_at", now)
        t = jobs.Transition(job_id=job.id, expected=job.state, to=to, message=message,
                            fields=fields, next_run_at=now)
        applied = await asyncio.shield(self._writer.submit(t))
        if not applied:
            bound.warning("lease_lost", expected=job.state.value)
            self._drop(job.id)
            return
        self._failures.pop(job.id, None)
        new = dataclasses.replace(job, state=to, updated_at=now, next_run_at=now, **fields)  # type: ignore[arg-type]
        level = bound.info if to in _NOTEWORTHY else bound.debug
        level("job_" + to.value, message=message)
        self._count(to)
        self._set(new)
        if new.id in self._held:
            # A job just started cannot have finished yet: its first poll waits initial_s.
            delay = (self.settings.service(new.service).poll.initial_s
                     if to is JobState.STARTED and new.service in self.settings.services
                     else 0.0)
            self._schedule(new.id, delay)

    def _on_reschedule_done(self, job_id: str, fut: asyncio.Future[bool]) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result() is False:
            log.warning("lease_lost", job_id=job_id[:8])
            self._drop(job_id)

    def _count(self, state: JobState) -> None:
        if state is JobState.DONE:
            self.stats.done += 1
        elif state is JobState.FAILED:
            self.stats.failed += 1
        elif state is JobState.CANCELLED:
            self.stats.cancelled += 1

    async def _claimer(self) -> None:
        d = self.settings.daemon
        while not self._stopping.is_set():
            room = d.max_jobs_held - len(self._held)
            try:
                if room > 0:
                    now = clock.now()
                    got = await self.repo.claim_due(
                        worker_id=self.worker_id, now=now, lease_s=d.lease_s,
                        limit=min(room, CLAIM_BATCH))
                    got += await self.repo.claim_queue(
                        worker_id=self.worker_id, now=now, lease_s=d.lease_s,
                        limit=max(0, min(room - len(got), CLAIM_BATCH)),
                        make_job=self._queue_job)
                    for job in got:
                        self._adopt(job)
                    if len(got) >= CLAIM_BATCH:
                        continue
            except Exception as exc:
                log.warning("claim_failed", error=str(exc))
            self._claim_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._claim_wake.wait(), CLAIM_INTERVAL_S)

    async def _report_lag(self) -> None:
        """Every LAG_REPORT_S, how late executors picked up due jobs (a poll's lateness against
        its schedule, before its HTTP call): the health of the timer heap and executor pool."""
        while True:
            await asyncio.sleep(LAG_REPORT_S)
            lags, self._lags = sorted(self._lags), []
            if lags:
                log.info("schedule_lag", n=len(lags), p50_s=round(lags[len(lags) // 2], 4),
                         p99_s=round(lags[int(len(lags) * 0.99)], 4), max_s=round(lags[-1], 4),
                         held=len(self._held))

    def _queue_job(self, item: jobs.QueueItem) -> jobs.NewJob:
        return intake.from_queue(self.settings, item)

    async def _heartbeat(self) -> None:
        d = self.settings.daemon
        while True:
            await asyncio.sleep(d.heartbeat_s)
            try:
                await self.repo.heartbeat(self.worker_id, now=clock.now(), lease_s=d.lease_s)
            except Exception as exc:
                log.warning("heartbeat_failed", error=str(exc))

    async def _on_file(self, item: watcher.Candidate | watcher.Rejected) -> None:
        """The watcher's callback: returns at once; `_claim_files` inserts in batches."""
        if isinstance(item, watcher.Rejected):
            log.warning("input_rejected", path=str(item.path), reason=item.reason)
            return
        self._files.append(item)
        self._files_wake.set()

    async def _claim_files(self) -> None:
        """Insert the job rows of settled files, everything waiting in one transaction (a
        burst of 1,000 files is a few commits, not 1,000), then hand the jobs to executors."""
        d = self.settings.daemon
        failures = 0
        while True:
            await self._files_wake.wait()
            self._files_wake.clear()
            while self._files:
                batch = self._files[:CLAIM_BATCH]
                try:
                    made = await self.repo.create_jobs(
                        [intake.from_candidate(self.settings, c) for c in batch],
                        worker_id=self.worker_id, now=clock.now(), lease_s=d.lease_s)
                except Exception as exc:  # the database is briefly unavailable: files wait
                    failures += 1
                    log.warning("claim_insert_retry", files=len(batch), error=str(exc))
                    if failures >= MAX_INSERT_FAILURES:  # let a later rescan offer them again
                        del self._files[:len(batch)]
                        assert self._watcher is not None
                        for cand in batch:
                            self._watcher.forget(cand.path)
                    await asyncio.sleep(min(10.0, 0.1 * 2 ** failures))
                    continue
                failures = 0
                del self._files[:len(batch)]
                assert self._watcher is not None
                for cand in batch:  # claimed now, or earlier / by another host: done either way
                    self._watcher.done(cand)
                for job in made:
                    log.info("input_claimed", job_id=job.short_id, path=job.source_path,
                             service=job.service)
                    self._adopt(job)

    async def _intake(self) -> None:
        if not self.settings.watches:
            self._intake_done.set()
            self.ready.set()
            await self._stopping.wait()
            return
        self._watcher = watcher.FolderWatcher(
            self.settings.watches, rescan_s=self.settings.daemon.rescan_s
        )
        stop = asyncio.Event()
        task = asyncio.create_task(self._watcher.run(self._on_file, stop))
        self.ready.set()
        try:
            if self.once:
                await self._watcher.started.wait()
                while self._watcher.pending_count():  # noqa: ASYNC110 - no idle event to wait on
                    await asyncio.sleep(0.05)  # files still settling
                self._intake_done.set()
            await self._stopping.wait()
        finally:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)

    async def _drained(self) -> None:
        """`--once`: intake idle, nothing held, and no active job left in the database."""
        await self._intake_done.wait()
        while True:
            await asyncio.sleep(0.2)
            if self._held or self._files or not self._ready.empty():
                continue
            counts = await self.repo.count_by_state()
            if not any(counts.get(s, 0) for s in lifecycle.ACTIVE_STATES):
                return

    # -- running -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> Stats:
        d = self.settings.daemon
        await self.repo.register_worker(
            self.worker_id, host=socket.gethostname(), pid=os.getpid(), now=clock.now())
        connector = aiohttp.TCPConnector(limit=d.http_connections, limit_per_host=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            ctx = await steps.open_context(self.settings, session, rng=self._rng)
            self._writer.start()
            tasks = [
                asyncio.create_task(self._timer(), name="timer"),
                asyncio.create_task(self._claimer(), name="claimer"),
                asyncio.create_task(self._heartbeat(), name="heartbeat"),
                asyncio.create_task(self._report_lag(), name="lag-report"),
                asyncio.create_task(self._intake(), name="intake"),
                asyncio.create_task(self._claim_files(), name="claim-files"),
                *(asyncio.create_task(self._executor(ctx), name=f"executor-{i}")
                  for i in range(d.executors)),
            ]
            waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
            if self.once:
                waiters.append(asyncio.create_task(self._drained()))
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                log.info("worker_stopping", held=len(self._held))
                self._stopping.set()
                for w in waiters:
                    w.cancel()
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, *waiters, return_exceptions=True)
                await self._writer.close()
                with contextlib.suppress(Exception):
                    await self.repo.release(self.worker_id, now=clock.now())
                await steps.close_context(ctx)
        return self.stats
