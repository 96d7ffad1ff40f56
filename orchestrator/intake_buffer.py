"""File intake for the worker: the folder watcher's settled files, inserted as job rows in
batches, and `--once`'s "nothing more is coming from the folders" signal.

The watcher's callback only appends to a buffer; one task inserts everything waiting in one
transaction (a burst of 1,000 files is a few commits, not 1,000) and hands the new jobs to the
worker. A reload with other watches restarts the watcher (it rescans at start; a file already
claimed is skipped by its unique claim key).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from orchestrator import clock, config, jobs, logs, metrics, watcher
from orchestrator.db import repository
from orchestrator.steps import intake

CLAIM_BATCH = 500
#: Jobs inserted but not yet handed to the worker, at most: a long stream of files still starts.
ADOPT_AFTER = 5_000
#: Failed inserts of one batch of files before they are left to the next rescan.
MAX_INSERT_FAILURES = 6

log = logs.get("bes.worker")


class FileIntake:
    def __init__(
        self,
        settings: config.Settings,
        repo: repository.Repository,
        worker_id: str,
        *,
        adopt: Callable[[jobs.Job], None],
        once: bool = False,
    ) -> None:
        self.settings = settings
        self._repo = repo
        self._worker_id = worker_id
        self._adopt = adopt
        self._once = once
        self._services = {w.name: w.service for w in settings.watches}
        #: Settled files not yet inserted, with the watcher that offered each.
        self._files: list[tuple[watcher.FolderWatcher, watcher.Candidate]] = []
        self._wake = asyncio.Event()
        self._restart = asyncio.Event()
        self._watcher: watcher.FolderWatcher | None = None
        #: Set once the watcher runs (systemd READY=1 waits for it).
        self.up = asyncio.Event()
        #: `--once`: the start-up scan is done and no file is settling.
        self.drained = asyncio.Event()

    def pending(self) -> int:
        """Files offered but not yet inserted as jobs."""
        return len(self._files)

    def reload(self, settings: config.Settings) -> None:
        old = (tuple(self.settings.watches), self.settings.daemon.rescan_s)
        self.settings = settings
        self._services = {w.name: w.service for w in settings.watches}
        if (tuple(settings.watches), settings.daemon.rescan_s) != old:
            self._restart.set()

    async def run(self) -> None:
        """The watcher and the inserter; returns only when cancelled, raises if either dies."""
        inserter = asyncio.create_task(self._insert_loop(), name="intake-insert")
        try:
            while True:
                self._restart.clear()
                await self._watch_until_restart(inserter)
                log.info("intake_restarted", watches=len(self.settings.watches))
        finally:
            inserter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await inserter

    async def _watch_until_restart(self, inserter: asyncio.Task[None]) -> None:
        restart = asyncio.create_task(self._restart.wait())
        if not self.settings.watches:
            self._watcher = None
            self.up.set()
            self.drained.set()
            try:
                done, _ = await asyncio.wait({inserter, restart},
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                restart.cancel()
            if inserter in done:
                _raise_ended(inserter)
            return
        w = watcher.FolderWatcher(self.settings.watches, rescan_s=self.settings.daemon.rescan_s)
        self._watcher = w
        stop = asyncio.Event()
        watching = asyncio.create_task(w.run(self._on_file, stop), name="watcher")
        draining = asyncio.create_task(self._detect_drained(w))
        self.up.set()
        try:
            done, _ = await asyncio.wait({watching, inserter, restart},
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in (watching, inserter):
                if task in done:
                    _raise_ended(task)
        finally:
            restart.cancel()
            draining.cancel()
            stop.set()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(watching, 5)

    async def _detect_drained(self, w: watcher.FolderWatcher) -> None:
        if not self._once:
            return
        await w.started.wait()
        while w.pending_count():  # noqa: ASYNC110 - the watcher has no idle event to wait on
            await asyncio.sleep(0.05)  # files still settling
        self.drained.set()

    async def _on_file(self, item: watcher.Candidate | watcher.Rejected) -> None:
        """The watcher's callback: returns at once; `_insert_loop` inserts in batches."""
        if isinstance(item, watcher.Rejected):
            log.warning("input_rejected", path=str(item.path), reason=item.reason)
            return
        assert self._watcher is not None
        metrics.files_seen.labels(self._services.get(item.watch, "")).inc()
        self._files.append((self._watcher, item))
        self._wake.set()

    async def _insert_loop(self) -> None:
        d = self.settings.daemon
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            made_now: list[jobs.Job] = []
            while self._files:
                batch = self._files[:CLAIM_BATCH]
                watches = {w.name for w in self.settings.watches}
                news = [intake.from_candidate(self.settings, c)
                        for _, c in batch if c.watch in watches]  # else: removed by a reload
                try:
                    made = await self._repo.create_jobs(
                        news, worker_id=self._worker_id, now=clock.now(), lease_s=d.lease_s)
                except Exception as exc:  # the database is briefly unavailable: files wait
                    failures += 1
                    log.warning("claim_insert_retry", files=len(batch), error=str(exc))
                    if failures >= MAX_INSERT_FAILURES:  # let a later rescan offer them again
                        del self._files[:len(batch)]
                        for w, cand in batch:
                            w.forget(cand.path)
                    await asyncio.sleep(min(10.0, 0.1 * 2 ** failures))
                    continue
                failures = 0
                del self._files[:len(batch)]
                for w, cand in batch:  # claimed now, or earlier / by another host: done anyway
                    w.done(cand)
                for job in made:
                    log.info("input_claimed", job_id=job.short_id, path=job.source_path,
                             service=job.service)
                    metrics.files_claimed.labels(job.service).inc()
                made_now += made
                if len(made_now) >= ADOPT_AFTER:
                    self._adopt_all(made_now)
                    made_now = []
            # A burst is recorded whole before its jobs start: their steps would otherwise
            # compete with the inserts of the burst's later files for the event loop.
            self._adopt_all(made_now)

    def _adopt_all(self, made: list[jobs.Job]) -> None:
        for job in made:
            self._adopt(job)


def _raise_ended(task: asyncio.Task[None]) -> None:
    """A task that must run until cancelled has ended: re-raise its error, or say so."""
    exc = task.exception()
    if exc is not None:
        raise exc
    raise RuntimeError(f"{task.get_name()} ended unexpectedly")
