"""Domain records. Frozen, keyword-only; ORM rows never leave `orchestrator/db/`."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from typing import TypedDict

from orchestrator import errors, lifecycle


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    id: str  #: ours: 32 hex chars (uuid4)
    state: lifecycle.JobState
    service: str
    watch: str | None  #: the watch that found it, None for queue-table jobs
    claim_key: str  #: unique: what was claimed (watch + file identity, or queue row)
    source_path: str  #: where the input was found
    input_name: str  #: the input's original file name
    input_path: str  #: where the input is now (source, spool, archive or failed folder)
    input_sha256: str | None
    input_size: int | None
    output_dir: str
    archive_dir: str
    failed_dir: str
    bes_job_id: str | None
    bes_status: str | None
    #: Output name -> blob URL without any SAS token, once BES said Finished.
    result_refs: Mapping[str, str]
    #: Output name -> local result path, once downloaded.
    outputs: Mapping[str, str]
    error: str | None
    error_code: str | None
    attempts: int  #: times a daemon took this job in this run (crash-loop guard counts these)
    runs: int  #: 1 + how many times `jobs retry` ran it again
    poll_count: int
    #: BES jobs submitted again after a failure the environment caused (`resubmit_on`).
    resubmits: int
    cancel_requested: bool
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    next_run_at: dt.datetime
    deadline_at: dt.datetime | None  #: past this the BES job is cancelled and the job fails
    created_at: dt.datetime
    updated_at: dt.datetime
    submitted_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @property
    def short_id(self) -> str:
        return self.id[:8]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NewJob:
    """What intake knows when it claims a file."""

    id: str
    service: str
    watch: str | None
    claim_key: str
    source_path: str
    input_name: str
    output_dir: str
    archive_dir: str
    failed_dir: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobEvent:
    id: int
    job_id: str
    at: dt.datetime
    from_state: lifecycle.JobState | None
    to_state: lifecycle.JobState
    worker: str | None
    message: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueueItem:
    id: int
    path: str
    service: str
    created_at: dt.datetime
    job_id: str | None


class Fields(TypedDict, total=False):
    """The columns a state change may set alongside the state (names and types as on `Job`).
    A misspelt name is a type error; the repository also refuses unknown names at run time.
    The guard's columns (id, state, lease) and the identity of the job are not among them."""

    input_path: str
    source_path: str
    input_sha256: str | None
    input_size: int | None
    bes_job_id: str | None
    bes_status: str | None
    result_refs: Mapping[str, str]
    outputs: Mapping[str, str]
    error: str | None
    error_code: str | None
    attempts: int
    runs: int
    poll_count: int
    resubmits: int
    cancel_requested: bool
    deadline_at: dt.datetime | None
    submitted_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


#: Every name `Fields` declares, for the repository's run-time check.
FIELD_NAMES: frozenset[str] = frozenset(Fields.__annotations__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Transition:
    """One guarded state change, applied with its event row in one transaction. The only way
    a job's state changes after it is created: workers' steps and people's commands alike."""

    job_id: str
    expected: lifecycle.JobState
    to: lifecycle.JobState
    message: str
    #: Column values to set alongside; e.g. bes_job_id, outputs.
    fields: Fields = dataclasses.field(default_factory=lambda: Fields())
    next_run_at: dt.datetime | None = None
    #: A person's command is guarded by the state alone (people overrule workers) and frees
    #: the lease; a worker's change also needs the lease.
    actor: lifecycle.Actor = lifecycle.Actor.WORKER


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reschedule:
    """A poll that found the BES job still waiting: no state change, no event row
    unless `bes_status` changed (then the repository writes an event with the same state)."""

    job_id: str
    expected: lifecycle.JobState
    next_run_at: dt.datetime
    bes_status: str | None
    poll_count: int


def fresh_run(job: Job) -> Fields:
    """The fields that start `job` over from CLAIMED: nothing remote, no result, and the input
    taken from where it is now (the claim step moves it back into the spool)."""
    return {
        "source_path": job.input_path,
        "bes_job_id": None,
        "bes_status": None,
        "result_refs": {},
        "outputs": {},
        "error": None,
        "error_code": None,
        "poll_count": 0,
        "resubmits": 0,
        "cancel_requested": False,
        "submitted_at": None,
        "started_at": None,
        "finished_at": None,
        "deadline_at": None,
    }


#: The shortest id prefix `jobs show|retry|cancel` accept.
MIN_PREFIX = 4
_HEX_DIGITS = frozenset("0123456789abcdef")


def lookup_key(id_or_prefix: str) -> str:
    """A person's job id or id prefix, normalised; raise NotFound for one that cannot name a job.
    Pure: every reader (SQLAlchemy's, the CLI's sqlite3) resolves ids by this rule."""
    key = id_or_prefix.strip().lower()
    if len(key) < MIN_PREFIX or not set(key) <= _HEX_DIGITS:
        raise errors.NotFound(
            f"no job {id_or_prefix!r}: give the job id or at least {MIN_PREFIX} of its "
            "leading hex digits"
        )
    return key


def resolved(id_or_prefix: str, found: list[Job]) -> Job:
    """The one job `found` for a lookup (at most two rows asked for); raise NotFound, or
    InvalidState if a prefix is ambiguous."""
    if not found:
        raise errors.NotFound(f"no job {id_or_prefix!r}")
    if len(found) > 1:
        raise errors.InvalidState(f"job id prefix {id_or_prefix!r} is ambiguous: give more digits")
    return found[0]
