"""STARTED -> REMOTE_FINISHED, or wait, or fail. One status call per run; the worker keeps the
job in its timer heap between polls, so a waiting job holds no slot and no coroutine."""

from __future__ import annotations

from orchestrator import backoff, clock, config, jobs, lifecycle, steps
from orchestrator.bes import protocol

#: A poll is never scheduled later than this past the job's deadline.
DEADLINE_SLACK_S = 0.5


def environmental(details: str, service: config.ServiceConfig) -> bool:
    """Pure: does the failure say the environment (storage, network) failed, not the input?"""
    text = details.lower()
    return any(pattern.lower() in text for pattern in service.resubmit_on)


def resubmit(
    job: jobs.Job, report: protocol.StatusReport, service: config.ServiceConfig
) -> steps.Advance:
    """Back to ACCEPTED: the input is uploaded again (waiting out a storage outage through the
    upload step's transient retries) and a new BES job is submitted. The failed BES job is
    over, so nothing is started twice."""
    n = job.resubmits + 1
    return steps.Advance(
        to=lifecycle.JobState.ACCEPTED,
        message=(
            f"BES job {job.bes_job_id} failed because of its environment ({report.details});"
            f" submitting again ({n} of {service.max_resubmits})"
        ),
        fields={
            "resubmits": n, "bes_job_id": None, "bes_status": report.status.value,
            "poll_count": 0, "submitted_at": None, "started_at": None, "deadline_at": None,
        },
    )


def decide(
    job: jobs.Job, report: protocol.StatusReport, service: config.ServiceConfig, ctx: steps.Context
) -> steps.StepResult:
    """Pure: what a status report means for the job."""
    status = report.status
    if status is protocol.BesStatus.FINISHED:
        return steps.Advance(
            to=lifecycle.JobState.REMOTE_FINISHED,
            message="BES job finished",
            fields={
                "bes_status": status.value,
                "result_refs": {n: r.public_url for n, r in report.results.items()},
            },
        )
    if status is protocol.BesStatus.FAILED and environmental(report.details, service):
        if job.resubmits < service.max_resubmits:
            return resubmit(job, report, service)
    if status is protocol.BesStatus.FAILED:
        return steps.Fail(
            code="BesJobFailed",
            message=f"the BES job failed: {report.details or '(no details given)'}",
            fields={"bes_status": status.value},
        )
    if status is protocol.BesStatus.CANCELLED:
        return steps.Fail(
            code="BesJobCancelled",
            message=f"the BES job was cancelled outside this daemon: {report.details}".strip(),
            fields={"bes_status": status.value},
        )
    delay = backoff.poll_delay_s(service.poll, job.poll_count, rng=ctx.rng)
    if job.deadline_at is not None:
        left = (job.deadline_at - clock.now()).total_seconds()
        delay = min(delay, max(0.0, left) + DEADLINE_SLACK_S)
    return steps.Wait(delay_s=delay, bes_status=status.value, poll_count=job.poll_count + 1)


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    assert job.bes_job_id is not None
    service = ctx.service(job.service)
    client = ctx.client(job.service)
    if job.deadline_at is not None and clock.now() >= job.deadline_at:
        await client.cancel(job.bes_job_id)
        return steps.Fail(
            code="Timeout",
            message=(
                f"the job did not finish within its timeout of {service.job_timeout_s:g} s "
                f"(last BES status {job.bes_status or 'unknown'}); the BES job was cancelled"
            ),
            fields={"bes_status": protocol.BesStatus.CANCELLED.value},
        )
    report = await client.status(job.bes_job_id)
    result = decide(job, report, service, ctx)
    if isinstance(result, steps.Advance):
        ctx.sas_cache[job.id] = report.results
    return result
