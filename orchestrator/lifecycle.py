"""The job state machine: which milestones exist and which step moves a job from each.

Pure: no I/O. A state names the last milestone *already reached*, so a crash after any
external effect resumes at the step that comes next, and each step is written to be safe to
repeat. `EDGES` lists every state change that may be written; the repository refuses others.
"""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    #: A row exists and names the file; the file may still be at its source path.
    CLAIMED = "claimed"
    #: The input sits in the daemon's spool folder and its checksum is recorded.
    ACCEPTED = "accepted"
    #: Every input blob is in storage under the job's deterministic blob name.
    UPLOADED = "uploaded"
    #: BES gave a job id and it is committed; start may be called.
    SUBMITTED = "submitted"
    #: BES accepted start (or a status call showed the job past NotStarted).
    STARTED = "started"
    #: BES said Finished; the output references are known (SAS tokens are never stored).
    REMOTE_FINISHED = "remote_finished"
    #: Every output is in the output folder under its final name.
    DOWNLOADED = "downloaded"
    #: The job must fail: the reason is stored, the input is still in the spool folder.
    FAILING = "failing"
    #: A person asked to cancel: the BES job (if any) is to be deleted, then the input moved.
    CANCELLING = "cancelling"
    #: Terminal: results written, input archived.
    DONE = "done"
    #: Terminal: the input is in the failed folder beside `<name>.error.txt`.
    FAILED = "failed"
    #: Terminal: cancelled by a person; the input is in the failed folder.
    CANCELLED = "cancelled"


#: States that need no more work.
TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.DONE, JobState.FAILED, JobState.CANCELLED}
)
#: States some step still has to move forward.
ACTIVE_STATES: frozenset[JobState] = frozenset(set(JobState) - TERMINAL_STATES)
#: States in which a BES job exists server-side and has not been seen to end.
REMOTE_STATES: frozenset[JobState] = frozenset({JobState.SUBMITTED, JobState.STARTED})
#: States before a BES job id is stored: nothing remote to cancel or poll.
LOCAL_STATES: frozenset[JobState] = frozenset(
    {JobState.CLAIMED, JobState.ACCEPTED, JobState.UPLOADED}
)


class Step(enum.StrEnum):
    """The pipeline's stages, named as in `orchestrator/steps/`."""

    CLAIM = "claim"
    UPLOAD = "upload"
    SUBMIT = "submit"
    START = "start"
    POLL = "poll"
    DOWNLOAD = "download"
    FINISH = "finish"
    FAIL = "fail"
    CANCEL = "cancel"


#: Which step moves a job out of each active state.
STEP_FOR_STATE: dict[JobState, Step] = {
    JobState.CLAIMED: Step.CLAIM,
    JobState.ACCEPTED: Step.UPLOAD,
    JobState.UPLOADED: Step.SUBMIT,
    JobState.SUBMITTED: Step.START,
    JobState.STARTED: Step.POLL,
    JobState.REMOTE_FINISHED: Step.DOWNLOAD,
    JobState.DOWNLOADED: Step.FINISH,
    JobState.FAILING: Step.FAIL,
    JobState.CANCELLING: Step.CANCEL,
}

class Actor(enum.StrEnum):
    """Who makes a state change: the daemon holding the lease, or a person's command."""

    WORKER = "worker"
    PERSON = "person"


_W, _P = Actor.WORKER, Actor.PERSON
_S = JobState
#: Every state change that may ever be written, and who may make it. Anything else is a bug
#: and is refused before it reaches the database (the job then fails InternalError).
#: FAILING -> FAILING re-records the reason when the fail step itself cannot finish.
EDGES: dict[tuple[JobState, JobState], frozenset[Actor]] = {
    (_S.CLAIMED, _S.ACCEPTED): frozenset({_W}),  # claim: the input is in the spool
    (_S.ACCEPTED, _S.UPLOADED): frozenset({_W}),
    (_S.UPLOADED, _S.SUBMITTED): frozenset({_W}),
    (_S.SUBMITTED, _S.STARTED): frozenset({_W}),
    (_S.STARTED, _S.REMOTE_FINISHED): frozenset({_W}),
    # The remote job failed because of its environment: upload and submit again.
    (_S.STARTED, _S.ACCEPTED): frozenset({_W}),
    (_S.REMOTE_FINISHED, _S.DOWNLOADED): frozenset({_W}),
    # A resumed run found the remote results gone: run the whole job again.
    (_S.REMOTE_FINISHED, _S.CLAIMED): frozenset({_W}),
    (_S.DOWNLOADED, _S.DONE): frozenset({_W}),
    **{(s, _S.FAILING): frozenset({_W})
       for s in (_S.CLAIMED, _S.ACCEPTED, _S.UPLOADED, _S.SUBMITTED, _S.STARTED,
                 _S.REMOTE_FINISHED, _S.DOWNLOADED, _S.FAILING, _S.CANCELLING)},
    (_S.FAILING, _S.FAILED): frozenset({_W}),
    (_S.CANCELLING, _S.CANCELLED): frozenset({_W}),
    # `jobs cancel`: any job still moving forward.
    **{(s, _S.CANCELLING): frozenset({_P})
       for s in (_S.CLAIMED, _S.ACCEPTED, _S.UPLOADED, _S.SUBMITTED, _S.STARTED,
                 _S.REMOTE_FINISHED, _S.DOWNLOADED)},
    # `jobs retry`: from the start, or resumed where a local failure stopped it.
    (_S.FAILED, _S.CLAIMED): frozenset({_P}),
    (_S.CANCELLED, _S.CLAIMED): frozenset({_P}),
    (_S.FAILED, _S.REMOTE_FINISHED): frozenset({_P}),
    (_S.FAILED, _S.DOWNLOADED): frozenset({_P}),
}


def allowed(from_state: JobState, to_state: JobState, actor: Actor = Actor.WORKER) -> bool:
    """Pure: may `actor` move a job from `from_state` to `to_state`?"""
    return actor in EDGES.get((from_state, to_state), frozenset())


def refusal(from_state: JobState, to_state: JobState, actor: Actor = Actor.WORKER) -> str | None:
    """Why the change is illegal (one line), or None when it is allowed."""
    if allowed(from_state, to_state, actor):
        return None
    return f"illegal state change {from_state} -> {to_state} by a {actor}"


#: Failures of the download step that leave the remote results valid (the local disk, the
#: network or this program failed): `jobs retry` resumes these at the download.
LOCAL_FAILURE_CODES: frozenset[str] = frozenset({
    "ResultUnwritable", "DownloadFailed", "Truncated", "StorageUnavailable", "ConnectionError",
    "Timeout", "TransientError", "InternalError", "TooManyAttempts",
})


def resume_state(failed_from: JobState | None, error_code: str | None) -> JobState:
    """Pure: where `jobs retry` restarts a FAILED job that was in `failed_from` when it began to
    fail. Results already downloaded are finished again; results still remote after a local
    failure are fetched again (the download asks the service for fresh references; a remote
    job found gone sends the job back to CLAIMED, a full run). Anything else runs from the
    start, so a result the service itself spoiled is never fetched twice."""
    if failed_from is JobState.DOWNLOADED:
        return JobState.DOWNLOADED
    if failed_from is JobState.REMOTE_FINISHED and error_code in LOCAL_FAILURE_CODES:
        return JobState.REMOTE_FINISHED
    return JobState.CLAIMED


def is_terminal(state: JobState) -> bool:
    return state in TERMINAL_STATES


def can_cancel(state: JobState) -> bool:
    """A person may cancel any job that has not ended and is not already being failed."""
    return state in ACTIVE_STATES and state not in {JobState.FAILING, JobState.CANCELLING}


def can_retry(state: JobState) -> bool:
    """Only ended, unsuccessful jobs are retried; their input is in the failed folder."""
    return state in {JobState.FAILED, JobState.CANCELLED}
