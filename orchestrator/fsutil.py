"""Durable file operations: rename-or-copy moves, atomic writes, checksums. Blocking: callers
run them in a thread (`asyncio.to_thread`) so the event loop never waits on a disk."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from pathlib import Path

from orchestrator.storage import naming

#: Folders the daemon creates: owner and group only (inputs and results may be sensitive).
DIR_MODE = 0o750
#: Files the daemon creates: never world-readable.
FILE_MODE = 0o640
_CHUNK = 1024 * 1024


def ensure_dir(path: Path, mode: int = DIR_MODE) -> None:
    path.mkdir(mode=mode, parents=True, exist_ok=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_durable(src: Path, dst: Path) -> None:
    """Move `src` to `dst` (never over an existing file), durable once this returns.

    Same filesystem: one rename. Across filesystems: copy to a hidden temp name beside `dst`,
    fsync, rename into place, then remove `src` — so at every instant at least one complete
    copy exists under a name the recovery code looks for.
    """
    ensure_dir(dst.parent)
    if dst.exists():
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_durable(src, dst)
        os.unlink(src)
        fsync_dir(src.parent)
        return
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def copy_durable(src: Path, dst: Path, *, mode: int = FILE_MODE) -> None:
    """Copy `src` to `dst` through a hidden temp name beside it, fsynced, then renamed: `dst`
    is either absent or complete, whatever happens."""
    tmp, _digest, _size = copy_to_temp(src, dst, mode=mode)
    try:
        os.rename(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(dst.parent)


def copy_to_temp(src: Path, dst: Path, *, mode: int = FILE_MODE) -> tuple[Path, str, int]:
    """Copy `src` to a new hidden temp name beside `dst`, fsynced, hashing the bytes on the way
    (one read): returns the temp path, SHA-256 hex digest and size. The caller renames the temp
    into place (or removes it). The copy belongs to this process's user whoever owns `src`."""
    ensure_dir(dst.parent)
    tmp = naming.temp_name(dst)
    h = hashlib.sha256()
    size = 0
    try:
        with open(src, "rb") as fin, open(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb"
        ) as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp, h.hexdigest(), size


def write_text_atomic(path: Path, text: str, *, sync_dir: bool = True) -> None:
    """Write to a temp name, fsync, rename: a reader sees the old file or the whole new one.
    `sync_dir=False` leaves the folder's fsync to the caller (one fsync for several renames)."""
    ensure_dir(path.parent)
    tmp = naming.temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if sync_dir:
        fsync_dir(path.parent)


def remove_stale_temps(final: Path) -> int:
    """Remove what a killed attempt left while writing `final`; returns how many."""
    removed = 0
    for tmp in naming.stale_temps(final):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed += 1
    return removed


def sha256_file(path: Path) -> tuple[str, int]:
    """Hex digest and size, streamed."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def free_name(folder: Path, name: str, short_id: str) -> Path:
    """`folder/name`, or `folder/<stem>.<short_id><suffix>` when another file has that name."""
    plain = folder / name
    if not plain.exists():
        return plain
    p = Path(name)
    tail = f".{short_id}{p.suffix}"
    return folder / f"{naming.fit(p.stem, tail)}{tail}"
