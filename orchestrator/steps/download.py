"""REMOTE_FINISHED -> DOWNLOADED: fetch every output into the output folder.

The backend streams each output (`Backend.open_result`); `backends.results` writes it to a
hidden temp name, fsyncs and renames it, so a reader never sees a partial result. Result names
are a pure function of the job (`<input stem>.<output name><ext>`), so a repeat after a crash
rewrites the same files, and a second input of the same name never replaces the first's result.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Protocol

from orchestrator import errors, fsutil, jobs, lifecycle, metrics, steps
from orchestrator.backends import base, results
from orchestrator.storage import naming


class HasOutputs(Protocol):
    """A backend or a service section: `outputs` maps output name -> result extension."""

    @property
    def outputs(self) -> Mapping[str, str]: ...


def result_path(job: jobs.Job, service: HasOutputs, output: str, ref_location: str) -> Path:
    """Where output `output` of `job` goes. The extension is the reference's own (BES writes
    `…/output1.tsv`), else the configured one."""
    ext = PurePosixPath(ref_location).suffix.lower() or service.outputs.get(output, ".csv")
    return naming.safe_child(
        Path(job.output_dir), naming.result_file_name(job.input_name, output, ext)
    )


def alternative(job: jobs.Job, output: str, dest: Path) -> Path:
    """The unique-name rule: where the result goes when another job's file holds `dest`."""
    p = PurePosixPath(job.input_name)
    tail = f".{job.short_id}{p.suffix}"
    return dest.with_name(naming.result_file_name(f"{naming.fit(p.stem, tail)}{tail}", output,
                                                  dest.suffix))


def _location(ref: base.ResultRef) -> str:
    """The path part of a reference's public URL (its extension names the file type)."""
    return urllib.parse.urlsplit(ref.public_url).path


async def _refs(job: jobs.Job, ctx: steps.Context) -> Mapping[str, base.ResultRef]:
    cached = ctx.result_cache.pop(job.id, None)
    if cached:
        return cached
    assert job.bes_job_id is not None
    backend = ctx.backend(job.service)
    report = await backend.status(job)
    if report.phase is not base.Phase.FINISHED:
        raise errors.PermanentError(
            f"the service now reports {report.status} for a finished {backend.noun}",
            code=f"{backend.code_prefix}StateChanged",
        )
    return report.results


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    backend = ctx.backend(job.service)
    refs = await _refs(job, ctx)
    if not refs:
        raise errors.PermanentError(f"the {backend.noun} finished but returned no outputs",
                                    code="NoResults")
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
        dest = result_path(job, backend, name, _location(ref))
        if job.attempts > 1:  # resumed: a killed attempt may have left a hidden temp file
            await asyncio.to_thread(fsutil.remove_stale_temps, dest)
        async with ctx.downloads:
            size, landed = await results.write(backend.open_result(ref), dest,
                                               alternative(job, name, dest))
        metrics.bytes_downloaded.labels(job.service).inc(size)
        total += size
        outputs[name] = str(landed)
    return steps.Advance(
        to=lifecycle.JobState.DOWNLOADED,
        message=f"downloaded {len(outputs)} output(s), {total} bytes",
        fields={"outputs": outputs},
    )
