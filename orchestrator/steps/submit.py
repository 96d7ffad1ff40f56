"""UPLOADED -> SUBMITTED: ask BES for a job. The returned id is committed by the worker before
start is ever called (SPEC §2): a crash in between leaves an unstarted BES job, which costs
nothing, and the retry submits again."""

from __future__ import annotations

import datetime as dt
from typing import Any

from orchestrator import clock, config, jobs, lifecycle, steps
from orchestrator.bes import protocol
from orchestrator.steps import upload
from orchestrator.storage import naming


def submit_body(job: jobs.Job, service: config.ServiceConfig, ctx: steps.Context) -> dict[str, Any]:
    inputs: dict[str, dict[str, Any]] = {
        service.input_name: ctx.blobs.reference(upload.input_blob(job, service.input_name),
                                                write=False)
    }
    for name, location in service.extra_inputs.items():
        container, _, blob_name = location.strip("/").partition("/")
        inputs[name] = ctx.blobs.reference_for(container, blob_name, write=False)
    outputs = {
        name: ctx.blobs.reference(naming.output_blob_name(job.id, name, ext), write=True)
        for name, ext in service.outputs.items()
    }
    return protocol.build_submit_body(
        inputs=inputs, outputs=outputs, global_parameters=service.global_parameters
    )


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    service = ctx.service(job.service)
    bes_job_id = await ctx.client(job.service).submit(submit_body(job, service, ctx))
    now = clock.now()
    return steps.Advance(
        to=lifecycle.JobState.SUBMITTED,
        message=f"BES job {bes_job_id} submitted",
        fields={
            "bes_job_id": bes_job_id,
            "bes_status": protocol.BesStatus.NOT_STARTED.value,
            "submitted_at": now,
            "deadline_at": now + dt.timedelta(seconds=service.job_timeout_s),
        },
    )
