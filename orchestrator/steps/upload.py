"""ACCEPTED -> UPLOADED: make the input available to the service (`Backend.prepare_input`:
BES uploads it to blob storage under the job's deterministic name; RRS checks it fits).

A repeated upload after a crash overwrites the same blob: harmless.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from orchestrator import errors, jobs, lifecycle, steps


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    path = Path(job.input_path)
    if not await asyncio.to_thread(path.exists):
        raise errors.PermanentError(f"input {path} is missing from the spool", code="InputVanished")
    async with ctx.uploads:
        message = await ctx.backend(job.service).prepare_input(job)
    return steps.Advance(to=lifecycle.JobState.UPLOADED, message=message)
