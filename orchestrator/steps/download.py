"""REMOTE_FINISHED -> DOWNLOADED: fetch every output from its SAS URL into the output folder.

Each file is streamed to a hidden temp name, fsynced and renamed (in `storage.blob`), so a
reader never sees a partial result. Result names are a pure function of the job, so a repeat
after a crash rewrites the same files.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from orchestrator import config, errors, fsutil, jobs, lifecycle, steps
from orchestrator.bes import protocol
from orchestrator.storage import naming


def result_path(
    job: jobs.Job, service: config.ServiceConfig, output: str, ref_location: str
) -> Path:
    ext = PurePosixPath(ref_location).suffix.lower() or service.outputs.get(output, ".csv")
    return naming.safe_child(
        Path(job.output_dir), naming.result_file_name(job.input_name, output, ext)
    )


async def _refs(job: jobs.Job, ctx: steps.Context) -> Mapping[str, protocol.ResultRef]:
    cached = ctx.sas_cache.pop(job.id, None)
    if cached:
        return cached
    assert job.bes_job_id is not None
    report = await ctx.client(job.service).status(job.bes_job_id)
    if report.status is not protocol.BesStatus.FINISHED:
        raise errors.PermanentError(
            f"BES now reports {report.status.value} for a finished job", code="BesStateChanged"
        )
    return report.results


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    service = ctx.service(job.service)
    refs = await _refs(job, ctx)
    if not refs:
        raise errors.PermanentError("BES finished but returned no outputs", code="NoResults")
    try:
        await asyncio.to_thread(fsutil.ensure_dir, Path(job.output_dir))
    except OSError as exc:
        raise errors.PermanentError(
            f"cannot create the output folder {job.output_dir}: {exc.strerror}",
            code="ResultUnwritable",
        ) from None
    outputs: dict[str, str] = {}
    total = 0
    for name, ref in sorted(refs.items()):
        dest = result_path(job, service, name, ref.relative_location)
        if job.attempts > 1:  # resumed: a killed attempt may have left a hidden temp file
            await asyncio.to_thread(fsutil.remove_stale_temps, dest)
        # Two inputs of the same name: the second result must not replace the first.
        p = PurePosixPath(job.input_name)
        tail = f".{job.short_id}{p.suffix}"
        alt = dest.with_name(naming.result_file_name(f"{naming.fit(p.stem, tail)}{tail}", name,
                                                     dest.suffix))
        async with ctx.downloads:
            size, landed = await ctx.blobs.download_unique(ref, dest, alt)
        total += size
        outputs[name] = str(landed)
    return steps.Advance(
        to=lifecycle.JobState.DOWNLOADED,
        message=f"downloaded {len(outputs)} output(s), {total} bytes",
        fields={"outputs": outputs},
    )
