"""Batches the worker's state writes: many jobs moving at once cost one transaction.

Each `submit` returns a future that resolves to True when the change is committed, False when
its guard failed (the lease was lost), or raises `ItemRejected` when the change is a bug (an
illegal state change, a field no change may set, a value the database refuses): that item
alone is dropped and the others are written. The batch window is a few milliseconds, so a lone
transition is barely delayed while thousands of "still running" polls share a commit
(executemany of 100 rows is ~17x faster than 100 statements).

Failures of the database are sorted by what a retry can do. Transient ones (connection lost,
database locked, disk full) keep the batch and retry it. Any other error of a batch means one
of its items is bad: the batch is applied item by item, and only the item that fails again is
rejected, so one poisoned write never blocks the others.
"""

from __future__ import annotations

import asyncio

from orchestrator import clock, errors, jobs, logs
from orchestrator.db import repository

BATCH_WINDOW_S = 0.005
MAX_BATCH = 1000
RETRY_DB_S = 1.0

log = logs.get("bes.writer")

Item = jobs.Transition | jobs.Reschedule
_Entry = tuple[Item, "asyncio.Future[bool]"]


class ItemRejected(errors.OrchestratorError):
    """This change was not written because it is wrong (a bug), not because of the database;
    the job should fail InternalError with this reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BatchWriter:
    def __init__(self, repo: repository.Repository, worker_id: str) -> None:
        self._repo = repo
        self._worker_id = worker_id
        self._pending: list[_Entry] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: Writes retried because the database was briefly unavailable (for metrics/tests).
        self.transient_retries = 0
        self.rejected = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-writer")

    def submit(self, item: Item) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        self._wake.set()
        return fut

    async def close(self) -> None:
        """Commit everything queued so far, then stop. Called on graceful stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._closing:
                await asyncio.sleep(BATCH_WINDOW_S)
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                await self._flush(batch)
            if self._closing and not self._pending:
                return

    async def _flush(self, batch: list[_Entry]) -> None:
        # In submission order: a job's reschedule and the transition after it may share a batch.
        try:
            outcomes = await self._write([item for item, _ in batch])
        except _GiveUp as stop:
            _fail_all(batch, stop.error)
            return
        except Exception as exc:  # not transient: some item is bad; find it one by one
            log.warning("db_write_batch_refused", error=str(exc), items=len(batch))
            for entry in batch:
                await self._flush_one(entry)
            return
        for (_, fut), outcome in zip(batch, outcomes, strict=True):
            self._settle(fut, outcome)

    async def _flush_one(self, entry: _Entry) -> None:
        item, fut = entry
        try:
            [outcome] = await self._write([item])
        except _GiveUp as stop:
            _fail_all([entry], stop.error)
            return
        except Exception as exc:  # this item alone is refused by the database: a bug
            outcome = repository.Rejected(reason=f"{type(exc).__name__}: {exc}")
        self._settle(fut, outcome)

    async def _write(self, items: list[Item]) -> list[repository.Outcome]:
        """Apply `items`, retrying while the database's trouble is transient. Other errors are
        raised; _GiveUp when closing stops the retries."""
        while True:
            try:
                return await self._repo.apply(items, worker_id=self._worker_id, now=clock.now())
            except Exception as exc:
                if not self._repo.is_transient(exc):
                    raise
                self.transient_retries += 1
                log.warning("db_write_retry", error=str(exc), items=len(items))
                if self._closing:
                    raise _GiveUp(exc) from exc
                await asyncio.sleep(RETRY_DB_S)

    def _settle(self, fut: asyncio.Future[bool], outcome: repository.Outcome) -> None:
        if fut.done():
            return
        if isinstance(outcome, repository.Rejected):
            self.rejected += 1
            log.error("db_write_rejected", reason=outcome.reason)
            fut.set_exception(ItemRejected(outcome.reason))
        else:
            fut.set_result(isinstance(outcome, repository.Applied))


class _GiveUp(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _fail_all(batch: list[_Entry], exc: Exception) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
