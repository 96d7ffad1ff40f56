"""SUBMITTED -> STARTED. Only committed ids are started. A start whose answer was lost is
resolved by the backend before it starts again (BES: a status past NotStarted proves it, and a
second start is refused with CannotStartJob), so no job is ever started twice. Where submit
already started the job (batch endpoints, RRS) this step only records the milestone."""

from __future__ import annotations

from orchestrator import clock, errors, jobs, lifecycle, steps


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    assert job.bes_job_id is not None, "SUBMITTED without a remote job id"
    maybe = job.attempts > 1 or job.id in ctx.start_uncertain
    try:
        message = await ctx.backend(job.service).start(job, maybe_started=maybe)
    except errors.TransientError:
        ctx.start_uncertain.add(job.id)
        raise
    ctx.start_uncertain.discard(job.id)
    return steps.Advance(
        to=lifecycle.JobState.STARTED, message=message, fields={"started_at": clock.now()}
    )
