"""The one module that owns SQL (DESIGN.md style 4). CONTRACT STUB: to be implemented.

Every state change is one guarded UPDATE
    ... WHERE id = :id AND state = :expected AND lease_owner = :me
plus a `job_events` row, in one transaction. Zero rows changed means the lease was lost.
Works on SQLite (WAL, busy_timeout) and PostgreSQL (FOR UPDATE SKIP LOCKED) alike.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from orchestrator import errors, jobs, lifecycle


class LeaseLost(errors.OrchestratorError):
    """A guarded update changed no row: another worker (or a person) owns the job now."""


class NotFound(errors.OrchestratorError):
    """No job with that id (or id prefix)."""


class InvalidState(errors.OrchestratorError):
    """The job is not in a state that allows the requested action."""


class Repository:
    @classmethod
    async def open(cls, url: str, *, password: str | None = None) -> Repository:
        """Create the engine (SQLite: WAL, busy_timeout, foreign keys) and return a repository."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def check_schema(self) -> None:
        """Raise errors.DatabaseVersionError unless the database is at this program's head."""
        raise NotImplementedError

    # -- workers and leases ----------------------------------------------------------------
    async def register_worker(self, worker_id: str, *, host: str, pid: int, now: dt.datetime) -> None:
        raise NotImplementedError

    async def heartbeat(self, worker_id: str, *, now: dt.datetime, lease_s: float) -> int:
        """Renew every lease this worker holds (one UPDATE) and its workers row."""
        raise NotImplementedError

    async def release(self, worker_id: str, *, now: dt.datetime) -> int:
        """Graceful stop: free this worker's leases (attempts - 1, a clean stop is no crash)."""
        raise NotImplementedError

    # -- intake -----------------------------------------------------------------------------
    async def create_job(
        self, new: jobs.NewJob, *, worker_id: str, now: dt.datetime, lease_s: float
    ) -> jobs.Job | None:
        """Insert in CLAIMED, leased to `worker_id`, attempts 1, with a 'claimed' event.
        None if `claim_key` is taken (the file was claimed already, maybe by another host)."""
        raise NotImplementedError

    async def enqueue(self, paths: Sequence[str], *, service: str, now: dt.datetime) -> list[int]:
        """Insert queue-table rows; returns their ids."""
        raise NotImplementedError

    async def claim_queue(
        self,
        *,
        worker_id: str,
        now: dt.datetime,
        lease_s: float,
        limit: int,
        make_job: Callable[[jobs.QueueItem], jobs.NewJob],
    ) -> list[jobs.Job]:
        """Turn up to `limit` unclaimed queue rows into CLAIMED jobs leased to `worker_id`,
        marking each row with its job id, in one transaction (SKIP LOCKED on PostgreSQL)."""
        raise NotImplementedError

    # -- the claim loop ----------------------------------------------------------------------
    async def claim_due(
        self, *, worker_id: str, now: dt.datetime, lease_s: float, limit: int
    ) -> list[jobs.Job]:
        """Claim active jobs with next_run_at <= now whose lease is free or expired:
        lease_owner, lease_expires_at, attempts + 1. A takeover of an expired lease writes an
        event naming the previous owner."""
        raise NotImplementedError

    async def transition(
        self, t: jobs.Transition, *, worker_id: str, now: dt.datetime
    ) -> jobs.Job:
        """Apply one guarded transition with its event; raise LeaseLost if no row matched.
        Terminal states free the lease."""
        raise NotImplementedError

    async def apply(
        self,
        transitions: Sequence[jobs.Transition],
        reschedules: Sequence[jobs.Reschedule],
        *,
        worker_id: str,
        now: dt.datetime,
    ) -> set[str]:
        """Batch form of `transition` plus poll reschedules, in one transaction.
        Returns the ids whose lease was lost (their changes were not applied)."""
        raise NotImplementedError

    # -- people's actions -------------------------------------------------------------------
    async def request_cancel(self, job_id: str, *, now: dt.datetime) -> jobs.Job:
        """Any non-terminal job -> CANCELLING with the lease freed, so whichever worker claims
        it next runs the cancel step. Raise InvalidState if it already ended."""
        raise NotImplementedError

    async def retry(self, job_id: str, *, now: dt.datetime) -> jobs.Job:
        """FAILED/CANCELLED -> CLAIMED with source_path = current input_path, runs + 1,
        attempts 0, BES fields, error and outputs cleared. Raise InvalidState otherwise."""
        raise NotImplementedError

    # -- reading ------------------------------------------------------------------------------
    async def get_job(self, id_or_prefix: str) -> jobs.Job:
        """Raise NotFound, or InvalidState if a prefix is ambiguous."""
        raise NotImplementedError

    async def list_jobs(
        self,
        *,
        state: lifecycle.JobState | None = None,
        service: str | None = None,
        limit: int = 100,
    ) -> list[jobs.Job]:
        """Newest first."""
        raise NotImplementedError

    async def events(self, job_id: str) -> list[jobs.JobEvent]:
        raise NotImplementedError

    async def count_by_state(self) -> dict[lifecycle.JobState, int]:
        raise NotImplementedError

    async def oldest_active(self) -> jobs.Job | None:
        raise NotImplementedError

    async def history(self, *, limit: int = 1000) -> list[dict[str, Any]]:
        """Rows of the `job_history` view, newest first."""
        raise NotImplementedError
