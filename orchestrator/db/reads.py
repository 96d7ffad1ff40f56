"""What the database-only commands (`status`, `jobs list|show`) read, behind one interface:
`sqlite_reads.SqliteReads` for SQLite (no SQLAlchemy imported), `RepositoryReads` for
PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator import jobs, lifecycle

if TYPE_CHECKING:
    from orchestrator.db import repository



class Reads(Protocol):
    def count_by_state(self) -> dict[lifecycle.JobState, int]: ...

    def oldest_active(self) -> jobs.Job | None: ...

    def polling_counts(self) -> dict[str, int]: ...

    def list_jobs(self, *, state: lifecycle.JobState | None, service: str | None,
                  limit: int) -> list[jobs.Job]: ...

    def get_job(self, id_or_prefix: str) -> jobs.Job: ...

    def events(self, job_id: str) -> list[jobs.JobEvent]: ...


class RepositoryReads:
    """`Reads` through the repository, each call run to the end on one event loop."""

    def __init__(self, runner: asyncio.Runner, repo: repository.Repository) -> None:
        self._run = runner.run
        self._repo = repo

    def count_by_state(self) -> dict[lifecycle.JobState, int]:
        return self._run(self._repo.count_by_state())

    def oldest_active(self) -> jobs.Job | None:
        return self._run(self._repo.oldest_active())

    def polling_counts(self) -> dict[str, int]:
        from orchestrator.backends.batch_endpoint import status as be_status

        return self._run(be_status.polling_counts(self._repo.read_engine))

    def list_jobs(self, *, state: lifecycle.JobState | None, service: str | None,
                  limit: int) -> list[jobs.Job]:
        return self._run(self._repo.list_jobs(state=state, service=service, limit=limit))

    def get_job(self, id_or_prefix: str) -> jobs.Job:
        return self._run(self._repo.get_job(id_or_prefix))

    def events(self, job_id: str) -> list[jobs.JobEvent]:
        return self._run(self._repo.events(job_id))


@contextlib.contextmanager
def through_repository(
    opening: Coroutine[Any, Any, repository.Repository],
) -> Iterator[RepositoryReads]:
    """The repository `opening` returns, as `Reads`; closed at the end."""
    with asyncio.Runner() as runner:
        repo = runner.run(opening)
        try:
            yield RepositoryReads(runner, repo)
        finally:
            runner.run(repo.close())
