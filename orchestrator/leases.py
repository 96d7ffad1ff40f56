"""The worker's side of leases: the claim loop, the heartbeat, and the self-check that every
job this worker leases is being moved on.

The claim loop takes due jobs (and queue rows) up to `daemon.max_jobs_held` every
CLAIM_INTERVAL_S, or at once when a held job ends. The heartbeat, every `heartbeat_s` (a
monotonic interval), renews in one statement the leases of this worker that come near expiry
(claims.heartbeat says how near) and runs the daemon's check (the database file is still the
one it opened). The self-check, every SELF_CHECK_S, schedules any held job tracked nowhere
and adopts any job the database says this worker leases but it does not hold.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection

from orchestrator import clock, config, held, jobs, logs, metrics
from orchestrator.db import repository
from orchestrator.steps import intake

CLAIM_INTERVAL_S = 0.5
CLAIM_BATCH = 500
#: How often every held job is checked to be scheduled, running or parked.
SELF_CHECK_S = 15.0

log = logs.get("bes.worker")

#: (job, new): take a job just claimed; `new=False` for one recovered by the self-check.
Adopt = Callable[[jobs.Job, bool], None]


class Leases:
    def __init__(
        self,
        settings: config.Settings,
        repo: repository.Repository,
        jobs_held: held.Held,
        *,
        adopt: Adopt,
        wake: asyncio.Event,
        check: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._repo = repo
        self._held = jobs_held
        self._adopt = adopt
        self._wake = wake
        self._check = check
        self.worker_id = settings.daemon.worker_id
        self._renewed_at = clock.monotonic()

    async def claim_loop(self) -> None:
        while True:
            d = self.settings.daemon
            room = d.max_jobs_held - len(self._held)
            try:
                if room > 0:
                    now = clock.now()
                    got = await self._repo.claim_due(
                        worker_id=self.worker_id, now=now, lease_s=d.lease_s,
                        limit=min(room, CLAIM_BATCH))
                    queued = await self._repo.claim_queue(
                        worker_id=self.worker_id, now=now, lease_s=d.lease_s,
                        limit=max(0, min(room - len(got), CLAIM_BATCH)),
                        make_job=self._queue_job)
                    for job in queued:
                        metrics.files_claimed.labels(job.service).inc()
                    for job in (*got, *queued):
                        self._adopt(job, True)
                    if len(got) + len(queued) >= CLAIM_BATCH:
                        continue
            except Exception as exc:  # the database is briefly unavailable: try again soon
                log.warning("claim_failed", error=str(exc))
            self._wake.clear()
            try:
                async with asyncio.timeout(CLAIM_INTERVAL_S):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _queue_job(self, item: jobs.QueueItem) -> jobs.NewJob:
        return intake.from_queue(self.settings, item)

    async def heartbeat_loop(self) -> None:
        while True:
            d = self.settings.daemon
            await asyncio.sleep(d.heartbeat_s)
            if self._check is not None:
                self._check()
            try:
                n = await self._repo.heartbeat(self.worker_id, now=clock.now(),
                                               lease_s=d.lease_s, heartbeat_s=d.heartbeat_s)
            except Exception as exc:
                log.warning("heartbeat_failed", error=str(exc),
                            since_renewal_s=round(clock.monotonic() - self._renewed_at, 1))
                continue
            self._renewed_at = clock.monotonic()
            metrics.leases_renewed.inc(n)

    async def self_check_loop(self) -> None:
        while True:
            await asyncio.sleep(SELF_CHECK_S)
            await self.self_check()

    async def self_check(self) -> list[jobs.Job]:
        """Every held job must be scheduled, running or parked; any other is an orphan (a bug
        this check makes survivable): log it and schedule it. Jobs the database says this
        worker leases but that it does not hold are adopted. Returns the orphans found."""
        orphans = self._held.orphans()
        for job in orphans:
            log.warning("job_orphan_recovered", job_id=job.short_id, state=job.state.value,
                        found="held")
            self._held.scheduler.schedule(job.id)
        leased_by = getattr(self._repo, "leased_jobs", None)
        if leased_by is not None:
            # A job held at the start, or forgotten while the query ran (it ended), is not
            # an orphan even if the snapshot the query read still shows it leased.
            seen = self._held.ids()
            with self._held.watching_forgets() as forgotten:
                leased: list[jobs.Job] = await self._leased_not_held(seen, leased_by)
            for job in leased:
                if job.id not in seen and job.id not in forgotten and job.id not in self._held:
                    log.warning("job_orphan_recovered", job_id=job.short_id,
                                state=job.state.value, found="leased")
                    orphans.append(job)
                    self._adopt(job, False)
        return orphans

    async def _leased_not_held(
        self, seen: Collection[str], leased_by: Callable[[str], Awaitable[list[jobs.Job]]]
    ) -> list[jobs.Job]:
        """The rows leased to this worker whose ids it did not hold at `seen`: the ids first
        (one column), then the full rows of those alone. Reading every leased row as a record
        blocked the loop ~1 s every 15 s with 10,000 jobs held (bench/inflight.py)."""
        ids_of = getattr(self._repo, "leased_job_ids", None)
        among = getattr(self._repo, "leased_jobs_among", None)
        if ids_of is None or among is None:
            return await leased_by(self.worker_id)
        ids: set[str] = await ids_of(self.worker_id)
        missing = sorted(ids.difference(seen))
        if not missing:
            return []
        found: list[jobs.Job] = await among(self.worker_id, missing)
        return found
