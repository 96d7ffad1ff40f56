"""The daemon's long-running tasks, watched: one that ends is a failure of the whole daemon.

Every task the daemon starts (executors, timer, claimer, heartbeat, writer, intake, ...) runs
until it is cancelled at shutdown. If one returns or raises before that, the daemon cannot do
its work any more: the failure is logged once at error level (with its traceback, or as one
line for a `Fatal`), `failed` is set, and the daemon exits non-zero so systemd restarts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from orchestrator import errors, logs

log = logs.get("bes.daemon")


class Fatal(errors.OrchestratorError):
    """The daemon must stop: the message is the one line logged (no traceback)."""


class Supervisor:
    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task[None], str] = {}
        self._stopping = False
        #: Set when a supervised task ended on its own.
        self.failed = asyncio.Event()
        #: One line: which task ended and why.
        self.failure: str | None = None
        #: The first failure was a `Fatal` (a condition, not a bug).
        self.fatal = False

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks[task] = name
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        name = self._tasks.get(task, task.get_name())
        exc = None if task.cancelled() else task.exception()
        if task.cancelled():  # not by `stop()`: something cancelled what must run
            reason = f"task {name} was cancelled"
            log.error("task_died", task=name, error="cancelled")
        elif isinstance(exc, Fatal):
            reason = str(exc)
            log.error("daemon_fatal", task=name, error=reason)
        elif exc is not None:
            reason = f"task {name} died: {type(exc).__name__}: {exc}"
            log.error("task_died", task=name, error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        else:
            reason = f"task {name} ended unexpectedly"
            log.error("task_died", task=name, error="returned")
        if self.failure is None:
            self.failure = reason
            self.fatal = isinstance(exc, Fatal)
        self.failed.set()

    def alive(self) -> tuple[bool, str]:
        """(True, "ok") while every task runs; else (False, what ended)."""
        if self.failure is not None:
            return False, self.failure
        for task, name in self._tasks.items():
            if task.done():
                return False, f"task {name} is not running"
        return True, "ok"

    async def stop(self) -> None:
        """Cancel every task and wait for them (their own clean-up included)."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
