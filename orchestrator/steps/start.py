"""SUBMITTED -> STARTED. Only stored ids are started. A lost start response is resolved by
calling start again: either it takes effect now (the first never arrived) or BES answers
CannotStartJob, which means it had (SPEC §2), so no job is ever started twice."""

from __future__ import annotations

from orchestrator import clock, errors, jobs, lifecycle, steps
from orchestrator.bes import client as bes_client
from orchestrator.bes import protocol


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    assert job.bes_job_id is not None, "SUBMITTED without a BES job id"
    client = ctx.client(job.service)
    started = steps.Advance(
        to=lifecycle.JobState.STARTED, message="", fields={"started_at": clock.now()}
    )
    if job.attempts > 1 or job.id in ctx.start_uncertain:
        # An earlier start may have taken effect (lost response, or a crash after the call):
        # a status past NotStarted proves it, and then start is not called again.
        report = await client.status(job.bes_job_id)
        if report.status is not protocol.BesStatus.NOT_STARTED:
            return _with(started, f"BES job already {report.status.value}; not started again")
    try:
        await client.start(job.bes_job_id)
    except bes_client.StartConflict:
        return _with(started, "BES job was already started (CannotStartJob)")
    except errors.TransientError:
        ctx.start_uncertain.add(job.id)
        raise
    ctx.start_uncertain.discard(job.id)
    return _with(started, "BES job started")


def _with(result: steps.Advance, message: str) -> steps.Advance:
    return steps.Advance(to=result.to, message=message, fields=result.fields)
