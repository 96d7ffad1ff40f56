"""Batches the worker's state writes: many jobs moving at once cost one transaction.

Each `submit` returns a future that resolves to True when the change is committed, or False
when the guard failed (the lease was lost). The batch window is a few milliseconds, so a lone
transition is barely delayed while thousands of "still running" polls share a commit
(DESIGN.md: executemany of 100 rows ~17x faster than 100 statements).
"""

from __future__ import annotations

import asyncio

from orchestrator import clock, jobs, logs
from orchestrator.db import repository

BATCH_WINDOW_S = 0.005
MAX_BATCH = 1000
RETRY_DB_S = 1.0

log = logs.get("bes.writer")

Item = jobs.Transition | jobs.Reschedule


class BatchWriter:
    def __init__(self, repo: repository.Repository, worker_id: str) -> None:
        self._repo = repo
        self._worker_id = worker_id
        self._pending: list[tuple[Item, asyncio.Future[bool]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

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

    async def _flush(self, batch: list[tuple[Item, asyncio.Future[bool]]]) -> None:
        # In submission order: a job's reschedule and the transition after it may share a batch.
        items = [i for i, _ in batch]
        while True:
            try:
                applied = await self._repo.apply_in_order(
                    items, worker_id=self._worker_id, now=clock.now()
                )
                break
            except Exception as exc:  # the database is down or locked: keep the batch, retry
                log.warning("db_write_retry", error=str(exc), items=len(batch))
                if self._closing:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    return
                await asyncio.sleep(RETRY_DB_S)
        for (_, fut), ok in zip(batch, applied, strict=True):
            if not fut.done():
                fut.set_result(ok)
