"""CLAIMED -> ACCEPTED: take the input into the daemon's spool folder and record its checksum.

The row was inserted first (it names the source), so a crash before the input reaches the
spool leaves a row whose file is still at the source, and a crash after leaves the file in the
spool: both resume here. The spool name is the job id, so it never collides and is found again
after a crash; its record (`spool.Record`, written before the input appears) lets a daemon
rebuild the job even without the database.

Two ways in:
- the daemon's own file (same owner, one link): renamed, then made private (0600);
- anyone else's file, a followed symlink, or a file with other hard links: copied (hashing on
  the way) into a new file the daemon owns, fsynced, renamed into place, and only then is the
  original removed. The daemon never needs to change a file it does not own, so a file dropped
  by another user into a group-writable inbox is claimed like any other.

A claim that fails leaves the input where the job's history says it is (`input_path`, the
source): nothing half-moved is left in the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from pathlib import Path

from orchestrator import errors, fsutil, jobs, lifecycle, spool, steps
from orchestrator.storage import naming

#: The spooled input's mode: only the daemon's user reads it.
SPOOL_FILE_MODE = 0o600

MAX_SUFFIX_LEN = spool.MAX_SUFFIX_LEN


def spool_path(spool_dir: Path, job: jobs.Job) -> Path:
    return spool.input_path(spool_dir, job.id, job.input_name)


def _vanished(source: Path) -> errors.PermanentError:
    return errors.PermanentError(f"input {source} disappeared before it was claimed",
                                 code="InputVanished")


def _unreadable(source: Path, exc: OSError) -> errors.PermanentError:
    return errors.PermanentError(f"cannot read {source}: {exc.strerror}",
                                 code="InputNotReadable")


def _must_copy(source: Path, st: os.stat_result) -> bool:
    return source.is_symlink() or st.st_uid != os.geteuid() or st.st_nlink > 1


def _is_original(job: jobs.Job, source: Path, digest: str, size: int) -> bool:
    """After a crash between copying into the spool and removing the original: is the file at
    the source still that original (and not a new file dropped under the same name)? A watch
    job knows its file version from the claim key; otherwise the bytes must be the same."""
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        return False
    if job.watch is not None and job.claim_key.startswith(f"{job.watch}:"):
        inode, fsize, mtime_ns = job.claim_key.rsplit(":", 3)[1:]
        return (str(st.st_ino), str(st.st_size), str(st.st_mtime_ns)) == (inode, fsize,
                                                                           mtime_ns)
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return False
    try:
        return fsutil.sha256_file(source)[0] == digest
    except OSError:
        return False


def _remove_original(source: Path) -> None:
    source.unlink()
    fsutil.fsync_dir(source.parent)


def _resume(job: jobs.Job, source: Path, target: Path, spool_dir: Path) -> tuple[str, int]:
    """The input reached the spool before a crash (or was re-registered from it)."""
    digest, size = fsutil.sha256_file(target)
    if not spool.record_path(spool_dir, job.id).exists():
        spool.write_record(spool_dir, spool.record_for(job, sha256=digest, size=size))
    if source != target and _is_original(job, source, digest, size):
        with contextlib.suppress(OSError):  # best effort: the job does not depend on it
            _remove_original(source)
    return digest, size


def _copy_in(job: jobs.Job, source: Path, target: Path, spool_dir: Path) -> tuple[str, int]:
    try:
        tmp, digest, size = fsutil.copy_to_temp(source, target, mode=SPOOL_FILE_MODE)
    except FileNotFoundError:
        raise _vanished(source) from None
    except PermissionError as exc:
        raise _unreadable(source, exc) from None
    try:
        spool.write_record(spool_dir, spool.record_for(job, sha256=digest, size=size),
                           sync_dir=False)
        os.rename(tmp, target)
        fsutil.fsync_dir(spool_dir)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    try:
        _remove_original(source)
    except FileNotFoundError:
        pass  # someone removed it meanwhile: the spool has the bytes
    except OSError as exc:
        # Undo: the input must be only where the history says it is (the source).
        target.unlink(missing_ok=True)
        spool.remove_record(spool_dir, job.id)
        fsutil.fsync_dir(spool_dir)
        raise errors.PermanentError(
            f"cannot remove {source} after copying it into the spool: {exc.strerror}; the "
            f"daemon's user needs write permission on {source.parent} (and no sticky bit)",
            code="InputNotRemovable",
        ) from None
    return digest, size


def _rename_in(job: jobs.Job, source: Path, target: Path, spool_dir: Path) -> tuple[str, int]:
    try:
        digest, size = fsutil.sha256_file(source)
    except FileNotFoundError:
        raise _vanished(source) from None
    except PermissionError as exc:
        raise _unreadable(source, exc) from None
    spool.write_record(spool_dir, spool.record_for(job, sha256=digest, size=size),
                       sync_dir=False)
    try:
        fsutil.move_durable(source, target)  # fsyncs the spool folder: the record's too
    except BaseException:
        spool.remove_record(spool_dir, job.id)
        raise
    target.chmod(SPOOL_FILE_MODE)
    return digest, size


def _claim(job: jobs.Job, source: Path, target: Path, spool_dir: Path) -> tuple[str, int]:
    if job.attempts > 1:  # resumed: a killed attempt may have left hidden temp files
        fsutil.remove_stale_temps(target)
        fsutil.remove_stale_temps(spool.record_path(spool_dir, job.id))
    if target.exists():
        return _resume(job, source, target, spool_dir)
    try:
        st = os.stat(source)  # follows a (permitted) symlink
    except FileNotFoundError:
        raise _vanished(source) from None
    except PermissionError as exc:
        raise _unreadable(source, exc) from None
    fsutil.ensure_dir(spool_dir)
    if _must_copy(source, st):
        digest, size = _copy_in(job, source, target, spool_dir)
    else:
        digest, size = _rename_in(job, source, target, spool_dir)
    if source.parent == Path(job.failed_dir):  # `jobs retry`: the old error file is stale
        with contextlib.suppress(OSError):
            (source.parent / naming.error_file_name(source.name)).unlink(missing_ok=True)
    return digest, size


async def run(job: jobs.Job, ctx: steps.Context) -> steps.StepResult:
    spool_dir = ctx.settings.daemon.spool_dir
    target = spool_path(spool_dir, job)
    try:
        digest, size = await asyncio.to_thread(_claim, job, Path(job.source_path), target,
                                               spool_dir)
    except PermissionError as exc:  # the source folder refused the rename
        raise errors.PermanentError(
            f"cannot move {job.source_path} into the spool folder: {exc.strerror}",
            code="InputNotReadable",
        ) from None
    return steps.Advance(
        to=lifecycle.JobState.ACCEPTED,
        message=f"input moved to spool ({size} bytes)",
        fields={"input_path": str(target), "input_sha256": digest, "input_size": size},
    )
