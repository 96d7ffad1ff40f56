"""The last moves: the input leaves the spool folder for the archive (DONE) or the failed
folder beside `<name>.error.txt` (FAILED, CANCELLED).

Idempotent by search: if the spool file is gone, an earlier run already moved it, and it is
found again at one of the two names `_destination` could have chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from orchestrator import clock, errors, fsutil, jobs, lifecycle, spool, steps
from orchestrator.steps import download
from orchestrator.storage import naming


def _candidates(folder: Path, job: jobs.Job) -> list[Path]:
    p = Path(job.input_name)
    tail = f".{job.short_id}{p.suffix}"  # as fsutil.free_name chooses it
    return [folder / f"{naming.fit(p.stem, tail)}{tail}", folder / job.input_name]


def _move_input(job: jobs.Job, folder: Path, spool_dir: Path) -> str | None:
    """Move the spooled input into `folder`; returns where it is now (None if it vanished).
    Once it has left the spool, its spool record goes too."""
    src = Path(job.input_path)
    fsutil.ensure_dir(folder)
    where: str | None
    if src.exists() and (src.parent != folder):
        dst = fsutil.free_name(folder, naming.safe_child(folder, job.input_name).name, job.short_id)
        fsutil.move_durable(src, dst)
        where = str(dst)
    elif src.exists():
        where = str(src)
    else:
        where = next((str(c) for c in _candidates(folder, job) if c.exists()), None)
    spool.remove_record(spool_dir, job.id)
    return where


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else f"{text}."


def error_text(job: jobs.Job, state: lifecycle.JobState, *, note: str = "") -> str:
    """The `<name>.error.txt` beside a failed input: sentences for a person, one per line."""
    if state is lifecycle.JobState.CANCELLED:
        head = f"The job for {job.input_name} was cancelled."
        why = (f"Reason: {_sentence(job.error)}" if job.error
               else "It was cancelled on request (bes-orchestrator jobs cancel).")
    else:
        head = f"The job for {job.input_name} failed."
        why = (f"Reason: {_sentence(job.error)}" if job.error
               else "No reason was recorded.")
    lines = [head, "", why]
    if job.error_code:
        lines.append(f"Error code: {job.error_code}.")
    if note:
        lines.append(_sentence(note))
    lines += [
        "",
        f"Job id: {job.id}.",
        f"BES job id: {job.bes_job_id}." if job.bes_job_id
        else "BES job id: none (the job was never submitted).",
        f"Service: {job.service}.",
        f"Written at {clock.iso(clock.now())}.",
        "",
        f"To run it again: bes-orchestrator jobs retry {job.short_id}",
    ]
    return "\n".join(lines) + "\n"


def _fail_files(job: jobs.Job, state: lifecycle.JobState,
                outputs: dict[str, str], spool_dir: Path) -> str | None:
    folder = Path(job.failed_dir)
    note = ""
    try:
        where = _move_input(job, folder, spool_dir)
    except PermissionError as exc:
        # An input that never reached the spool (its claim failed) and that the daemon may not
        # move: it stays where it is, and the error file says so.
        if Path(job.input_path).parent == spool_dir:
            raise
        where = job.input_path
        note = f"The input was left at {where}: it could not be moved here ({exc.strerror})"
    name = naming.error_file_name(Path(where).name if where else job.input_name)
    error_file = naming.safe_child(folder, name)
    if job.attempts > 1:  # resumed: a killed attempt may have left hidden temp files
        fsutil.remove_stale_temps(error_file)
        for dest in outputs.values():
            fsutil.remove_stale_temps(Path(dest))
    fsutil.write_text_atomic(error_file, error_text(job, state, note=note))
    return where


def _result_paths(job: jobs.Job, ctx: steps.Context) -> dict[str, str]:
    """Where this job's results would have gone (a failed download may have left temps)."""
    service = ctx.settings.services.get(job.service)
    if service is None:
        return {}
    paths = {}
    for name, ext in service.outputs.items():
        with contextlib.suppress(errors.PermanentError):
            paths[name] = str(download.result_path(job, service, name, f"x{ext}"))
    return paths


def _archive(job: jobs.Job, spool_dir: Path) -> str | None:
    """Archive the input; a `jobs retry` that resumed after a local failure found it in the
    failed folder beside an error file that no longer tells the truth: that file goes."""
    src = Path(job.input_path)
    if src.parent == Path(job.failed_dir):
        stale = naming.safe_child(src.parent, naming.error_file_name(src.name))
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    return _move_input(job, Path(job.archive_dir), spool_dir)


async def done(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    where = await asyncio.to_thread(_archive, job, ctx.settings.daemon.spool_dir)
    if ctx.settings.storage.delete_blobs_after_success:
        with contextlib.suppress(errors.TransientError):
            await ctx.backend(job.service).cleanup(job)
    return steps.Advance(
        to=lifecycle.JobState.DONE,
        message=f"input archived to {where}",
        fields={"input_path": where or job.input_path},
    )


async def fail(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    where = await asyncio.to_thread(_fail_files, job, lifecycle.JobState.FAILED,
                                    _result_paths(job, ctx), ctx.settings.daemon.spool_dir)
    return steps.Advance(
        to=lifecycle.JobState.FAILED,
        message=f"input moved to {where or '(input was gone)'}",
        fields={"input_path": where or job.input_path},
    )


async def cancel(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    if job.bes_job_id is not None:
        await ctx.backend(job.service).cancel(job.bes_job_id)
    where = await asyncio.to_thread(_fail_files, job, lifecycle.JobState.CANCELLED,
                                    _result_paths(job, ctx), ctx.settings.daemon.spool_dir)
    return steps.Advance(
        to=lifecycle.JobState.CANCELLED,
        message=f"cancelled; input moved to {where or '(input was gone)'}",
        fields={"input_path": where or job.input_path},
    )
