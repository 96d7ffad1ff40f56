"""The jobs one worker holds, and where each one is: due (`scheduler`), running (an executor),
or parked (`slots`, waiting for a per-service slot). Synchronous bookkeeping, no I/O.

Every held job is in at least one of those places; `orphans()` lists any that is in none (a
bug this makes survivable: the worker's self-check schedules them). A job held in a remote
state (submitted, started) holds its service's slot; leaving those states frees it and wakes
the parked job whose turn it is.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator

from orchestrator import clock, jobs, lifecycle, scheduler, slots


class Held:
    def __init__(
        self,
        sched: scheduler.Scheduler,
        service_slots: slots.Slots,
        *,
        on_change: Callable[[jobs.Job], None] | None = None,
        on_forget: Callable[[], None] | None = None,
    ) -> None:
        self.scheduler = sched
        self.slots = service_slots
        self._jobs: dict[str, jobs.Job] = {}
        #: job id -> executors running it now (a count: a job rescheduled at once may be
        #: taken by a second executor while the first is still leaving).
        self._running: collections.Counter[str] = collections.Counter()
        #: Consecutive failures per job, of each kind (counted apart: a long outage's
        #: transient errors must not use up the few retries a bug gets).
        self.transient: collections.Counter[str] = collections.Counter()
        self.internal: collections.Counter[str] = collections.Counter()
        self._on_change = on_change
        self._on_forget = on_forget
        #: While someone compares the held jobs with the database: the ids forgotten meanwhile.
        self._forgotten: set[str] | None = None

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> jobs.Job | None:
        return self._jobs.get(job_id)

    def running(self) -> int:
        return len(self._running)

    def ids(self) -> set[str]:
        return set(self._jobs)

    @contextlib.contextmanager
    def run(self, job_id: str) -> Iterator[None]:
        """An executor runs `job_id` inside this block."""
        self._running[job_id] += 1
        try:
            yield
        finally:
            self._running[job_id] -= 1
            if self._running[job_id] <= 0:
                del self._running[job_id]

    def update(self, job: jobs.Job) -> None:
        """The job's new state (a terminal one forgets it); keeps the slot count in step."""
        old = self._jobs.get(job.id)
        was_remote = old is not None and old.state in lifecycle.REMOTE_STATES
        is_remote = job.state in lifecycle.REMOTE_STATES
        if job.state in lifecycle.TERMINAL_STATES:
            self.forget(job.id)
        else:
            self._jobs[job.id] = job
        if is_remote and not was_remote:
            self.slots.occupy(job.service)
        elif was_remote and not is_remote:
            assert old is not None
            self.release(old.service)
        if self._on_change is not None:
            self._on_change(job)

    def replace(self, job: jobs.Job) -> None:
        """Same state, other fields (a poll's answer): no slot or listener involved."""
        self._jobs[job.id] = job

    def forget(self, job_id: str) -> jobs.Job | None:
        """Out of this worker's hands (ended, or its lease is gone). Frees its slot if the job
        held one; returns what was held."""
        if self._forgotten is not None:
            self._forgotten.add(job_id)
        old = self._jobs.pop(job_id, None)
        self.scheduler.cancel(job_id)
        self.slots.forget(job_id)
        self.transient.pop(job_id, None)
        self.internal.pop(job_id, None)
        if self._on_forget is not None:
            self._on_forget()
        return old

    def drop(self, job_id: str) -> None:
        """The lease is gone: forget the job, freeing the slot a remote state held."""
        old = self.forget(job_id)
        if old is not None and old.state in lifecycle.REMOTE_STATES:
            self.release(old.service)

    def release(self, service: str) -> None:
        woken = self.slots.release(service)
        if woken is not None:
            self.scheduler.schedule(woken)

    def tracked(self, job_id: str) -> bool:
        """Some part of this worker will move the job on: due, running, or parked."""
        return (self.scheduler.is_scheduled(job_id) or job_id in self._running
                or self.slots.is_parked(job_id))

    def adopt(self, job: jobs.Job) -> str:
        """A job just claimed: "new", "held" (already held and tracked: left as it is),
        "changed" (held and waiting, but the claimed row is in another state: the row replaces
        it), or "orphan" (held but tracked nowhere: taken from the claimed row and scheduled).

        A job already held had its lease lapse in the database (a late heartbeat, a clock
        step) and the claim renewed it, but a step may be running it now: a second copy would
        run that step twice and the slower one's lost guard would strand the job."""
        known = job.id in self._jobs
        if known and self.tracked(job.id):
            held = self._jobs[job.id]
            if job.state is held.state or job.id in self._running:
                # Same row, or a step is running it: that step's guarded write settles it
                # (a lost guard drops the job, and the self-check adopts it from the database).
                return "held"
            # Moved by someone else while it waited here (a person's `jobs cancel`, which
            # frees the lease): the database's row wins, and it is due now.
            self.drop(job.id)
            self.update(job)
            self.scheduler.schedule(job.id, 0.0)
            return "changed"
        self.update(job)
        if job.id in self._jobs:
            delay = (job.next_run_at - clock.now()).total_seconds()
            self.scheduler.schedule(job.id, max(0.0, delay))
        return "orphan" if known else "new"

    def orphans(self) -> list[jobs.Job]:
        return [j for j in self._jobs.values() if not self.tracked(j.id)]

    @contextlib.contextmanager
    def watching_forgets(self) -> Iterator[set[str]]:
        """The ids forgotten while the block runs (a database read that may predate them)."""
        self._forgotten = set()
        try:
            yield self._forgotten
        finally:
            self._forgotten = None
