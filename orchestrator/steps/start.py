"""SUBMITTED -> STARTED. Only stored ids are started. A lost start response is resolved by
calling start again: either it takes effect now (the first never arrived) or BES answers
CannotStartJob, which means it had (SPEC §2), so no job is ever started twice."""

from __future__ import annotations

from orchestrator import clock, jobs, lifecycle, steps
from orchestrator.bes import client as bes_client


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    assert job.bes_job_id is not None, "SUBMITTED without a BES job id"
    try:
        await ctx.client(job.service).start(job.bes_job_id)
        message = "BES job started"
    except bes_client.StartConflict:
        message = "BES job was already started (CannotStartJob)"
    return steps.Advance(
        to=lifecycle.JobState.STARTED, message=message, fields={"started_at": clock.now()}
    )
