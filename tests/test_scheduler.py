"""The scheduler (orchestrator/scheduler.py): due order, rescheduling, cancelling, lateness."""

from __future__ import annotations

import asyncio

from orchestrator import scheduler


async def _collect(s: scheduler.Scheduler, n: int, timeout_s: float = 5.0) -> list[str]:
    async with asyncio.timeout(timeout_s):
        return [await s.next() for _ in range(n)]


async def test_due_jobs_come_out_in_due_order() -> None:
    s = scheduler.Scheduler()
    timer = asyncio.create_task(s.run())
    try:
        s.schedule("c", 0.15)
        s.schedule("a", 0.05)
        s.schedule("b", 0.10)
        s.schedule("now")
        assert await _collect(s, 4) == ["now", "a", "b", "c"]
        assert len(s) == 0
    finally:
        timer.cancel()


async def test_rescheduling_replaces_the_earlier_entry() -> None:
    s = scheduler.Scheduler()
    timer = asyncio.create_task(s.run())
    try:
        s.schedule("a", 0.05)
        s.schedule("a", 0.2)  # later now: the first entry is stale
        s.schedule("b", 0.1)
        assert s.is_scheduled("a") and len(s) == 2
        assert await _collect(s, 2) == ["b", "a"]
        s.schedule("x")
        s.schedule("x", 0.05)  # the ready entry is stale too
        assert await _collect(s, 1) == ["x"]
        assert s.idle()
    finally:
        timer.cancel()


async def test_cancelled_and_taken_jobs_are_not_scheduled() -> None:
    s = scheduler.Scheduler()
    timer = asyncio.create_task(s.run())
    try:
        s.schedule("a")
        s.schedule("b", 0.05)
        s.cancel("a")
        assert not s.is_scheduled("a")
        assert await _collect(s, 1) == ["b"]
        assert not s.is_scheduled("b")  # taken: an executor runs it now
        s.schedule("b")  # a fresh schedule after being taken is a new entry
        assert await _collect(s, 1) == ["b"]
    finally:
        timer.cancel()


async def test_an_earlier_entry_wakes_a_sleeping_timer() -> None:
    s = scheduler.Scheduler()
    timer = asyncio.create_task(s.run())
    try:
        s.schedule("late", 30.0)
        await asyncio.sleep(0.01)  # the timer now sleeps ~30 s
        s.schedule("soon", 0.02)
        assert await _collect(s, 1, timeout_s=2.0) == ["soon"]
    finally:
        timer.cancel()


async def test_lateness_is_measured_from_the_due_time() -> None:
    s = scheduler.Scheduler()
    timer = asyncio.create_task(s.run())
    try:
        for i in range(10):
            s.schedule(f"j{i}", 0.01)
        await asyncio.sleep(0.2)  # nobody takes them for ~0.19 s: each is that late
        await _collect(s, 10)
        lags = s.take_lags()
        assert len(lags) == 10
        assert min(lags) >= 0.15
        assert s.take_lags() == []
    finally:
        timer.cancel()
