"""The ordered stages, declared once: which function runs for which lifecycle step."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from orchestrator import jobs, lifecycle, steps
from orchestrator.steps import claim, download, finish, poll, start, submit, upload

StepFn = Callable[[jobs.Job, steps.Context], Awaitable[steps.StepResult]]

STEPS: dict[lifecycle.Step, StepFn] = {
    lifecycle.Step.CLAIM: claim.run,
    lifecycle.Step.UPLOAD: upload.run,
    lifecycle.Step.SUBMIT: submit.run,
    lifecycle.Step.START: start.run,
    lifecycle.Step.POLL: poll.run,
    lifecycle.Step.DOWNLOAD: download.run,
    lifecycle.Step.FINISH: finish.done,
    lifecycle.Step.FAIL: finish.fail,
    lifecycle.Step.CANCEL: finish.cancel,
}


def step_for(state: lifecycle.JobState) -> tuple[lifecycle.Step, StepFn]:
    step = lifecycle.STEP_FOR_STATE[state]
    return step, STEPS[step]
