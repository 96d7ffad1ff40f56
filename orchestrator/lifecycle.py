"""The job state machine: which milestones exist and which step moves a job from each.

Pure: no I/O. A state names the last milestone *already reached*, so a crash after any
external effect resumes at the step that comes next, and each step is written to be safe to
repeat (DESIGN.md, "Lifecycle and crash safety").
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

#: The state each step's success leads to.
NEXT_STATE: dict[Step, JobState] = {
    Step.CLAIM: JobState.ACCEPTED,
    Step.UPLOAD: JobState.UPLOADED,
    Step.SUBMIT: JobState.SUBMITTED,
    Step.START: JobState.STARTED,
    Step.POLL: JobState.REMOTE_FINISHED,
    Step.DOWNLOAD: JobState.DOWNLOADED,
    Step.FINISH: JobState.DONE,
    Step.FAIL: JobState.FAILED,
    Step.CANCEL: JobState.CANCELLED,
}


def is_terminal(state: JobState) -> bool:
    return state in TERMINAL_STATES


def can_cancel(state: JobState) -> bool:
    """A person may cancel any job that has not ended and is not already being failed."""
    return state in ACTIVE_STATES and state not in {JobState.FAILING, JobState.CANCELLING}


def can_retry(state: JobState) -> bool:
    """Only ended, unsuccessful jobs are retried; their input is in the failed folder."""
    return state in {JobState.FAILED, JobState.CANCELLED}
