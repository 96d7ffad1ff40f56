"""Per-service remote slots: at most `max_in_flight` BES jobs per service at once.

Pure bookkeeping, no I/O and no asyncio (tested with plain numbers in tests/test_slots.py).
A slot is taken by a job being submitted (`reserve`) and by every held job in a remote state
(`occupy`: submitted or started, a BES job exists server-side). A job that finds no free slot
is parked in a FIFO holding nothing; each `release` hands the freed slot's turn to the oldest
parked job still waiting, which the caller schedules (it reserves again when it runs).
"""

from __future__ import annotations

import collections
from collections.abc import Mapping


class Slots:
    def __init__(self, limits: Mapping[str, int]) -> None:
        self._limits = dict(limits)
        self._used: collections.Counter[str] = collections.Counter()
        self._queues: dict[str, collections.deque[str]] = collections.defaultdict(
            collections.deque
        )
        #: job id -> service, for the jobs parked now (a queue may hold stale ids: skipped).
        self._parked: dict[str, str] = {}

    def used(self, service: str) -> int:
        return self._used[service]

    def limit(self, service: str) -> int | None:
        """None: no such service (its jobs are not limited here; they fail on their own)."""
        return self._limits.get(service)

    def parked(self, service: str | None = None) -> int:
        if service is None:
            return len(self._parked)
        return sum(1 for s in self._parked.values() if s == service)

    def is_parked(self, job_id: str) -> bool:
        return job_id in self._parked

    def _room(self, service: str) -> int:
        limit = self._limits.get(service)
        if limit is None:
            return 1 << 30
        return limit - self._used[service]

    def reserve(self, service: str, job_id: str) -> bool:
        """Take a slot for `job_id`'s submit step; False parks the job (FIFO) instead."""
        if self._room(service) > 0:
            self._used[service] += 1
            self._parked.pop(job_id, None)
            return True
        if job_id not in self._parked:
            self._parked[job_id] = service
            self._queues[service].append(job_id)
        return False

    def occupy(self, service: str) -> None:
        """A held job entered a remote state: it holds a slot whatever the limit (a job taken
        over with its BES job already running cannot be refused)."""
        self._used[service] += 1

    def release(self, service: str) -> str | None:
        """A slot is free again: the parked job whose turn it is, or None."""
        if self._used[service] > 0:
            self._used[service] -= 1
        return self._next(service)

    def forget(self, job_id: str) -> None:
        """A parked job left this worker (dropped, or failed by another path)."""
        self._parked.pop(job_id, None)

    def set_limits(self, limits: Mapping[str, int]) -> list[str]:
        """New limits (a configuration reload): the parked jobs that now have room."""
        self._limits = dict(limits)
        woken: list[str] = []
        for service in list(self._queues):
            room = self._room(service)
            while room > 0:
                job_id = self._next(service)
                if job_id is None:
                    break
                woken.append(job_id)
                room -= 1
        return woken

    def _next(self, service: str) -> str | None:
        if self._room(service) <= 0:
            return None
        queue = self._queues.get(service)
        while queue:
            job_id = queue.popleft()
            if self._parked.get(job_id) == service:
                del self._parked[job_id]
                return job_id
        return None
