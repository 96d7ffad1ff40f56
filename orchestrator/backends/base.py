"""The backend seam: a remote service that runs one job per input.

Steps reach a service only through `Backend` (docs/architecture.md, "The backend seam"). Each
method is one external effect the lifecycle already knows how to make crash-safe:

- `prepare_input`: make the input reachable by the service (upload it; or check it fits).
  Repeatable: a repeat writes the same thing again.
- `submit`: ask for a remote job; returns its id, which the worker commits before anything that
  depends on it. `maybe_submitted` says an earlier submit for this job may have taken effect
  (its answer was lost, or the daemon died before committing the id): a backend whose submit
  also starts the job must find that job (e.g. by our tags) instead of submitting again.
- `start`: start the committed job (a no-op where submit starts it). `maybe_started` says an
  earlier start may have taken effect: the backend checks before starting again.
- `status`: a neutral `Report`; the service's own status word is kept for the history.
- `cancel`: stop the remote job; one that is already gone is not an error.
- `open_result`: a byte stream of one output. Writing it (temp name, fsync, rename, the
  unique-name rule) is common code in `backends.results`, not the backend's.

Errors follow `orchestrator.errors`: `TransientError` / `ThrottledError` are retried by the
worker; `PermanentError` fails the job. An error no retry can fix (a malformed URL, 400, 401,
404) must be permanent: it is never retried forever.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from orchestrator import jobs

#: The kind used when a service section does not name one.
DEFAULT_KIND = "bes"


class Phase(enum.StrEnum):
    """Where a remote job is, in words every backend can map its own statuses onto."""

    #: Accepted, not running yet (it may wait long in the service's queue).
    QUEUED = "queued"
    #: Executing.
    RUNNING = "running"
    #: Ended well: `Report.results` names every output.
    FINISHED = "finished"
    #: Ended with an error: `Report.details` says why.
    FAILED = "failed"
    #: Stopped before it ended (by us on timeout, or by someone else).
    CANCELLED = "cancelled"


#: Phases after which the remote job never changes again.
TERMINAL_PHASES: frozenset[Phase] = frozenset({Phase.FINISHED, Phase.FAILED, Phase.CANCELLED})


class ResultRef(Protocol):
    """Where one output is. The object may hold a secret (a SAS token): only `public_url` is
    ever logged or stored."""

    @property
    def public_url(self) -> str: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Report:
    """One status answer, neutral across backends."""

    phase: Phase
    #: The service's own status word (BES `Running`, batch `Completed`): the history's
    #: `bes_status` column.
    status: str
    #: Output name -> reference; filled when `phase` is FINISHED.
    results: Mapping[str, ResultRef] = dataclasses.field(default_factory=dict)
    #: The service's reason for a failure or cancellation (may be empty).
    details: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Submitted:
    """A remote job exists: `remote_id` is committed (as `bes_job_id`) before it is started."""

    remote_id: str
    #: The service's status word right after submit (the history's `bes_status`).
    status: str
    #: For the job's event row, e.g. "BES job 1a2b… submitted".
    message: str


@typing.runtime_checkable
class PacedPolls(Protocol):
    """An optional capability: a backend whose status reads share a budget (batch endpoints:
    one ARM read budget per subscription) spaces its polls itself. The poll step asks it when
    a poll may go out and reserves the next one; a job waiting for its slot holds nothing."""

    def poll_wait_s(self, job: jobs.Job) -> float:
        """Seconds until the job's read slot (0: poll now)."""
        ...

    def next_poll_delay_s(self, job: jobs.Job, wanted_s: float) -> float:
        """Reserve the job's next read at or after `wanted_s`; returns the actual delay."""
        ...


class Backend(Protocol):
    """A remote service that runs one job per input. One instance per configured service."""

    #: The service's configured name (`[services.NAME]`).
    name: str
    #: The config's `kind`: "bes", "rrs", "batch_endpoint".
    kind: str
    #: How messages name a remote job: "BES job", "RRS request", "batch job".
    noun: str
    #: Prefix of failure codes: "Bes" gives BesJobFailed / BesJobCancelled.
    code_prefix: str
    #: Output name -> extension of each result file a finished job yields
    #: (`<input stem>.<output name><ext>`).
    outputs: Mapping[str, str]

    async def prepare_input(self, job: jobs.Job) -> str:
        """Make the input available to the service; returns the event message."""
        ...

    async def submit(self, job: jobs.Job, *, maybe_submitted: bool) -> Submitted:
        """Create the remote job (or find the one an earlier, uncertain submit created)."""
        ...

    async def start(self, job: jobs.Job, *, maybe_started: bool) -> str:
        """Start the committed remote job `job.bes_job_id`; returns the event message."""
        ...

    async def status(self, job: jobs.Job) -> Report:
        """The remote job's status now."""
        ...

    async def cancel(self, remote_id: str) -> None:
        """Stop the remote job; one the service no longer knows is already gone."""
        ...

    def open_result(self, ref: ResultRef) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Entering sends the request (and raises on refusal); the iterator yields the bytes and
        raises `TransientError` if the stream ends early."""
        ...

    async def cleanup(self, job: jobs.Job) -> None:
        """Remove what `prepare_input` and the job left in the service's storage (optional
        housekeeping after success; missing things are fine)."""
        ...

    async def close(self) -> None:
        """Release what the backend holds (not the shared HTTP session)."""
        ...
