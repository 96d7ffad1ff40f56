"""CLAIMED -> ACCEPTED: move the input into the daemon's spool folder and record its checksum.

The row was inserted first (it names the source), so a crash before the rename leaves a row
whose file is still at the source, and a crash after leaves the file in the spool: both resume
here. The spool name is the job id, so it never collides and is found again after a crash.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from orchestrator import errors, fsutil, jobs, lifecycle, steps
from orchestrator.storage import naming

MAX_SUFFIX_LEN = 16


def spool_path(spool_dir: Path, job: jobs.Job) -> Path:
    suffix = Path(job.input_name).suffix
    if len(suffix) > MAX_SUFFIX_LEN or not suffix[1:].isalnum():
        suffix = ""
    return spool_dir / f"{job.id}{suffix.lower()}"


def _claim(source: Path, target: Path, failed_dir: Path) -> tuple[str, int]:
    if not target.exists():
        if not source.exists():
            raise errors.PermanentError(
                f"input {source} disappeared before it was claimed", code="InputVanished"
            )
        if source.is_symlink():
            # Only reached with follow_symlinks (the watcher refuses links otherwise, and any
            # pointing outside the inbox): take the target's bytes, remove only the link.
            fsutil.copy_durable(source.resolve(), target)
            source.unlink()
        else:
            fsutil.move_durable(source, target)
        if source.parent == failed_dir:  # `jobs retry`: the old error file no longer applies
            error_file = failed_dir / naming.error_file_name(source.name)
            error_file.unlink(missing_ok=True)
    target.chmod(fsutil.FILE_MODE & 0o600)
    return fsutil.sha256_file(target)


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    target = spool_path(ctx.settings.daemon.spool_dir, job)
    try:
        digest, size = await asyncio.to_thread(
            _claim, Path(job.source_path), target, Path(job.failed_dir)
        )
    except PermissionError as exc:
        raise errors.PermanentError(
            f"cannot move {job.source_path} into the spool folder: {exc.strerror}",
            code="InputNotReadable",
        ) from None
    return steps.Advance(
        to=lifecycle.JobState.ACCEPTED,
        message=f"input moved to spool ({size} bytes)",
        fields={"input_path": str(target), "input_sha256": digest, "input_size": size},
    )
