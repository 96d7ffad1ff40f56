"""ACCEPTED -> UPLOADED: put the input in blob storage under the job's deterministic name.

A repeated upload after a crash overwrites the same blob: harmless.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from orchestrator import errors, jobs, lifecycle, steps
from orchestrator.storage import naming


def input_blob(job: jobs.Job, input_name: str) -> str:
    return naming.input_blob_name(job.id, input_name, Path(job.input_name).suffix.lower() or ".csv")


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    service = ctx.service(job.service)
    path = Path(job.input_path)
    if not await asyncio.to_thread(path.exists):
        raise errors.PermanentError(f"input {path} is missing from the spool", code="InputVanished")
    async with ctx.uploads:
        size = await ctx.blobs.upload_file(path, input_blob(job, service.input_name))
    return steps.Advance(to=lifecycle.JobState.UPLOADED, message=f"uploaded {size} bytes")
