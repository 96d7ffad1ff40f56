"""When each held job runs next: one timer heap, one owner, and how late due jobs are picked up.

A waiting job is one heap entry, not a coroutine or a timer handle: one task (`run`) moves due
entries to a ready queue that the executors read with `next()`. Rescheduling a job bumps its
generation, so an older heap entry for it is skipped instead of searched for and removed.
A job is "scheduled" from `schedule()` until an executor takes it with `next()`.

The timer wakes at most once per TICK_S: what falls due in between goes out together, up to
TICK_S late. At 333 polls a second (10,000 jobs at a 30 s cap) each poll otherwise had a wake-up
of its own, and its answer one more: an aiohttp GET issued on its own timer costs about 0.55 ms
of CPU here, issued in 50 ms groups about 0.42 ms (`bench/poll_client.py --rate 333
--window-ms 50`), because each turn of the event loop then handles many sockets at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Callable

from orchestrator import clock, logs, metrics

LAG_REPORT_S = 10.0
MAX_LAG_SAMPLES = 100_000
#: The timer sleeps at most this long with nothing due (wakes earlier on any new entry).
IDLE_S = 3600.0
#: The timer's shortest sleep between wake-ups: due jobs are picked up at most this late.
TICK_S = 0.05

log = logs.get("bes.worker")


class Scheduler:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, int]] = []
        #: job id -> generation of its one live entry (heap or ready queue).
        self._gen: dict[str, int] = {}
        self._seq = itertools.count()
        #: (job id, generation, monotonic time it was due).
        self._ready: asyncio.Queue[tuple[str, int, float]] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._lags: list[float] = []

    def __len__(self) -> int:
        return len(self._gen)

    def schedule(self, job_id: str, delay_s: float = 0.0) -> None:
        """Run `job_id` after `delay_s` (replacing any earlier schedule of it)."""
        gen = next(self._seq)
        self._gen[job_id] = gen
        now = clock.monotonic()
        if delay_s <= 0:
            self._ready.put_nowait((job_id, gen, now))
            return
        due = now + delay_s
        earliest = not self._heap or due < self._heap[0][0]
        heapq.heappush(self._heap, (due, gen, job_id, gen))
        if earliest:  # else the timer wakes in time for it anyway
            self._changed.set()

    def cancel(self, job_id: str) -> None:
        self._gen.pop(job_id, None)

    def is_scheduled(self, job_id: str) -> bool:
        return job_id in self._gen

    def idle(self) -> bool:
        """Nothing due right now (the ready queue is empty)."""
        return self._ready.empty()

    async def next(self) -> str:
        """The next due job; it is no longer scheduled once returned (an executor runs it)."""
        while True:
            job_id, gen, due = await self._ready.get()
            if self._gen.get(job_id) != gen:
                continue  # rescheduled or cancelled since
            del self._gen[job_id]
            lag = clock.monotonic() - due
            metrics.schedule_lateness.observe(lag)
            if len(self._lags) < MAX_LAG_SAMPLES:
                self._lags.append(lag)
            return job_id

    async def run(self) -> None:
        """Move due heap entries to the ready queue. One task for any number of waiting jobs."""
        while True:
            now = clock.monotonic()
            while self._heap and self._heap[0][0] <= now:
                due, _, job_id, gen = heapq.heappop(self._heap)
                if self._gen.get(job_id) == gen:
                    self._ready.put_nowait((job_id, gen, due))
            woke = now
            timeout = min(IDLE_S, self._heap[0][0] - now) if self._heap else IDLE_S
            while True:
                self._changed.clear()
                # asyncio.timeout, not wait_for: no new task per wake-up (one per due poll).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._changed.wait()
                # An earlier entry (set by `schedule`) wakes the timer, but not sooner than
                # TICK_S after its last wake-up.
                timeout = woke + TICK_S - clock.monotonic()
                if timeout <= 0 or not self._heap:
                    break

    def take_lags(self) -> list[float]:
        """The lateness samples since the last call, sorted."""
        lags, self._lags = sorted(self._lags), []
        return lags

    async def report_lag(self, held: Callable[[], int]) -> None:
        """Every LAG_REPORT_S, how late executors picked up due jobs (a poll's lateness against
        its schedule, before its HTTP call): the health of the timer heap and executor pool."""
        while True:
            await asyncio.sleep(LAG_REPORT_S)
            lags = self.take_lags()
            if lags:
                log.info("schedule_lag", n=len(lags), p50_s=round(lags[len(lags) // 2], 4),
                         p99_s=round(lags[int(len(lags) * 0.99)], 4), max_s=round(lags[-1], 4),
                         held=held())
