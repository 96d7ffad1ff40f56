"""Writing a result file, the same for every backend: stream to a hidden temp name beside the
final one, fsync, rename into place, fsync the folder. A reader never sees a partial result, and
a repeat after a crash rewrites the same name.

The unique-name rule: with `alt`, a different file already at `dest` (another job's result for an
input of the same name) is never replaced; the result goes to `alt` instead. A file with the same
bytes is kept as it is (a repeat after a crash, or identical results).
"""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp

from orchestrator import errors
from orchestrator.storage import naming

#: Result files are never world-readable.
FILE_MODE = 0o640
DIR_MODE = 0o750


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(fd: int, tmp: Path, dest: Path, alt: Path | None) -> Path:
    """fsync the data, close `fd`, rename into place, fsync the folder; returns where it landed.
    Blocking: run it in a thread."""
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if alt is None:
        os.replace(tmp, dest)
    else:
        try:
            os.link(tmp, dest)  # never over an existing file
            os.unlink(tmp)
        except FileExistsError:
            if filecmp.cmp(tmp, dest, shallow=False):
                os.unlink(tmp)
            else:
                os.replace(tmp, alt)
                dest = alt
    _fsync_dir(dest.parent)
    return dest


async def write(
    stream: AbstractAsyncContextManager[AsyncIterator[bytes]], dest: Path, alt: Path | None
) -> tuple[int, Path]:
    """Write what `stream` yields to `dest` atomically; returns the byte count and the path it
    landed at (`alt` under the unique-name rule). Errors of the stream pass through as they are;
    a local write error is permanent (`ResultUnwritable`)."""
    tmp = naming.temp_name(dest)
    fd: int | None = None
    committed = False
    try:
        async with stream as chunks:
            dest.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            total = 0
            async for data in chunks:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                total += len(data)
        owned, fd = fd, None  # commit closes it, whatever happens
        landed = await asyncio.to_thread(commit, owned, tmp, dest, alt)
        committed = True
        return total, landed
    except (TimeoutError, aiohttp.ClientError) as exc:  # a stream that let one through
        raise errors.TransientError(
            f"fetching result {dest.name!r} failed: {type(exc).__name__}", code="DownloadFailed"
        ) from None
    except OSError as exc:
        raise errors.PermanentError(
            f"cannot write result {dest.name!r}: {exc.strerror}", code="ResultUnwritable"
        ) from None
    finally:
        if fd is not None:
            os.close(fd)
        if not committed:  # never created, or its folder is not one: nothing to remove
            with contextlib.suppress(OSError):
                os.unlink(tmp)
