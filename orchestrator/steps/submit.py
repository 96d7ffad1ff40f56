"""UPLOADED -> SUBMITTED: ask the service for a remote job. The returned id is committed by the
worker before start is ever called (docs/architecture.md, "Crash safety, step by step").

A submit whose answer was lost may have taken effect; the backend is told so
(`maybe_submitted`) and resolves it its own way before creating anything: BES submits again (an
unstarted BES job costs nothing and never runs), a batch endpoint looks its job up by our tags.
"""

from __future__ import annotations

import datetime as dt

from orchestrator import clock, errors, jobs, lifecycle, steps


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    service = ctx.service(job.service)
    backend = ctx.backend(job.service)
    # Resumed after a crash or a lost lease: an earlier daemon may have submitted.
    maybe = job.attempts > 1 or job.id in ctx.submit_uncertain
    try:
        submitted = await backend.submit(job, maybe_submitted=maybe)
    except errors.TransientError:
        ctx.submit_uncertain.add(job.id)
        raise
    ctx.submit_uncertain.discard(job.id)
    now = clock.now()
    return steps.Advance(
        to=lifecycle.JobState.SUBMITTED,
        message=submitted.message,
        fields={
            "bes_job_id": submitted.remote_id,
            "bes_status": submitted.status,
            "submitted_at": now,
            "deadline_at": now + dt.timedelta(seconds=service.job_timeout_s),
        },
    )
