"""STARTED -> REMOTE_FINISHED, or wait, or fail. One status call per run; the worker keeps the
job in its timer heap between polls, so a waiting job holds no slot and no coroutine."""

from __future__ import annotations

import dataclasses
import functools
import random
import typing

from orchestrator import backoff, clock, config, jobs, lifecycle, metrics, steps
from orchestrator.backends import base

#: A poll is never scheduled later than this past the job's deadline.
DEADLINE_SLACK_S = 0.5


def _resubmit_on(service: config.ServiceConfig) -> tuple[str, ...]:
    return service.resubmit_on if isinstance(service, config.BesService) else ()


def _max_resubmits(service: config.ServiceConfig) -> int:
    return service.max_resubmits if isinstance(service, config.BesService) else 0


def environmental(details: str, service: config.ServiceConfig) -> bool:
    """Pure: does the failure say the environment (storage, network) failed, not the input?
    (`resubmit_on`, a BES setting: other kinds never resubmit.)"""
    text = details.lower()
    return any(pattern.lower() in text for pattern in _resubmit_on(service))


def resubmit(
    job: jobs.Job, report: base.Report, service: config.ServiceConfig, noun: str = "BES job"
) -> steps.Advance:
    """Back to ACCEPTED: the input is prepared again (waiting out a storage outage through the
    upload step's transient retries) and a new remote job is submitted. The failed one is
    over, so nothing is started twice."""
    n = job.resubmits + 1
    return steps.Advance(
        to=lifecycle.JobState.ACCEPTED,
        message=(
            f"{noun} {job.bes_job_id} failed because of its environment ({report.details});"
            f" submitting again ({n} of {_max_resubmits(service)})"
        ),
        fields={
            "resubmits": n, "bes_job_id": None, "bes_status": report.status,
            "poll_count": 0, "submitted_at": None, "started_at": None, "deadline_at": None,
        },
    )


def decide(
    job: jobs.Job,
    report: base.Report,
    service: config.ServiceConfig,
    *,
    rng: random.Random,
    noun: str = "BES job",
    code_prefix: str = "Bes",
) -> steps.StepResult:
    """Pure: what a status report means for the job. `noun` and `code_prefix` come from the
    backend ("BES job", "Bes" give "the BES job failed" and BesJobFailed)."""
    phase = report.phase
    if phase is base.Phase.FINISHED:
        return steps.Advance(
            to=lifecycle.JobState.REMOTE_FINISHED,
            message=f"{noun} finished",
            fields={
                "bes_status": report.status,
                "result_refs": {n: r.public_url for n, r in report.results.items()},
            },
        )
    if phase is base.Phase.FAILED and environmental(report.details, service):
        if job.resubmits < _max_resubmits(service):
            return resubmit(job, report, service, noun)
    if phase is base.Phase.FAILED:
        return steps.Fail(
            code=f"{code_prefix}JobFailed",
            message=f"the {noun} failed: {report.details or '(no details given)'}",
            fields={"bes_status": report.status},
        )
    if phase is base.Phase.CANCELLED:
        return steps.Fail(
            code=f"{code_prefix}JobCancelled",
            message=f"the {noun} was cancelled outside this daemon: {report.details}".strip(),
            fields={"bes_status": report.status},
        )
    delay = backoff.poll_delay_s(service.poll, job.poll_count, rng=rng)
    if job.deadline_at is not None:
        left = (job.deadline_at - clock.now()).total_seconds()
        delay = min(delay, max(0.0, left) + DEADLINE_SLACK_S)
    return steps.Wait(delay_s=delay, bes_status=report.status, poll_count=job.poll_count + 1)


@functools.cache
def _paced(kind: type) -> bool:
    """Does this backend class pace its polls? (Asked once per class: an isinstance check
    against a runtime-checkable protocol cost ~3 % of the daemon's CPU at 333 polls/s.)"""
    return issubclass(kind, base.PacedPolls)


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    assert job.bes_job_id is not None
    service = ctx.service(job.service)
    backend = ctx.backend(job.service)
    if job.deadline_at is not None and clock.now() >= job.deadline_at:
        await backend.cancel(job.bes_job_id)
        return steps.Fail(
            code="Timeout",
            message=(
                f"the job did not finish within its timeout of {service.job_timeout_s:g} s "
                f"(last status {job.bes_status or 'unknown'}); the {backend.noun} was cancelled"
            ),
            fields={"bes_status": "Cancelled"},
        )
    paced = typing.cast(base.PacedPolls, backend) if _paced(type(backend)) else None
    if paced is not None and (wait_s := paced.poll_wait_s(job)) > 0:
        # Not this job's read slot yet: wait for it without a call (and without a write).
        return steps.Wait(delay_s=wait_s, bes_status=job.bes_status or "",
                          poll_count=job.poll_count)
    metrics.polls.labels(job.service).inc()
    report = await backend.status(job)
    result = decide(job, report, service, rng=ctx.rng, noun=backend.noun,
                    code_prefix=backend.code_prefix)
    if paced is not None and isinstance(result, steps.Wait):
        result = dataclasses.replace(
            result, delay_s=paced.next_poll_delay_s(job, result.delay_s))
    if isinstance(result, steps.Advance) and result.to is lifecycle.JobState.REMOTE_FINISHED:
        ctx.result_cache[job.id] = report.results
    return result
