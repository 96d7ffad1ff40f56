"""Folder watcher: which files in the watched folders are ready to be claimed.

A file is offered (`Candidate`) once its name is acceptable and its size and mtime have not
changed for the watch's `settle_s`. Files that can never be taken although their name matches
(unreadable, symlinks not followed or pointing outside, FIFOs) are reported once per version
(`Rejected`). A file whose name no watch on its folder accepts (`*.txt` in a `*.csv` inbox) is
logged once per name at info (`input_ignored`), so no file sits in an inbox unexplained. Names
of files still being written (hidden, `*.part`, …) and directories are ignored without a word.

Patterns match case-insensitively unless the watch says `case_sensitive = true`: `*.csv` takes
`DATA.CSV` and `data.Csv` too.

Finding files fast and never missing one: watchfiles (inotify) with a short debounce reports
changes within milliseconds; a scan at start and a periodic rescan are the safety net for what
events miss (inotify queue overflow at 16,384 events, network filesystems, a watcher restart).
Settle checks sit in one timer heap: a pending file costs a heap entry, not a coroutine.

Readability: a file is "not readable" when no read bit is set for anyone (`mode & 0o444 == 0`)
or `os.access(R_OK)` says no. The mode-bit rule is what makes the check meaningful for a daemon
running as root, for whom every permission check passes; a file that root can read only by
privilege would otherwise be taken and then fail later in a less obvious place.

The pure decisions (`classify_name`, `settled`, `settle_due_s`, `readable_by_mode`) are apart
from the I/O (`inspect`) and from the loop (`FolderWatcher`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import fnmatch
import heapq
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path

import watchfiles

from orchestrator import clock, config, logs

#: Name endings of files still being written by downloaders and copy tools (compared lowercased).
TEMP_SUFFIXES: tuple[str, ...] = (".tmp", ".part", ".partial", ".crdownload")
#: watchfiles batches events until STEP_MS pass without one, for at most DEBOUNCE_MS. The library
#: defaults (1,600 / 50) delay a trickle by up to 1.6 s (measured on a 2-core box: with 200 / 5
#: a steady trickle was seen in 8 ms p50).
DEBOUNCE_MS = 20
STEP_MS = 5
#: A batch this large hints that the kernel queue (16,384 events) may have overflowed…
FLOOD_EVENTS = 4096
#: …so the folders are rescanned this soon after it instead of waiting for rescan_s.
FLOOD_RESCAN_S = 2.0
#: Files handled between two yields to the event loop during a burst.
YIELD_EVERY = 64
#: Mode of watched folders created at start: owner and group only.
FOLDER_MODE = 0o750
#: Pause before re-creating the event watcher after it failed (rescans go on meanwhile).
WATCH_RETRY_S = 1.0
MAX_WATCH_RETRY_S = 60.0

_log = logs.get("bes.watcher")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Candidate:
    """A settled file version that may be claimed."""

    watch: str  #: WatchConfig.name
    path: Path  #: absolute path in the watched folder
    size: int
    mtime_ns: int
    inode: int
    device: int

    def claim_key(self) -> str:
        """Identifies this exact file version: the same name dropped again later is a new key,
        one file seen twice (or by two hosts sharing the folder) is one key. The device number
        is left out: on network filesystems it differs from host to host."""
        return f"{self.watch}:{self.path.name}:{self.inode}:{self.size}:{self.mtime_ns}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rejected:
    """A file whose name matches but which cannot be taken; reported once per file version."""

    watch: str
    path: Path
    reason: str  #: one line, e.g. "not readable (permission denied)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FileVersion:
    """What identifies one version of a file: a change in any of these restarts settling."""

    size: int
    mtime_ns: int
    inode: int
    device: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sighting:
    version: FileVersion
    since_s: float  #: monotonic time this version was first seen


@dataclasses.dataclass(frozen=True, kw_only=True)
class Look:
    """What one inspection of a path found: a file version, and why it cannot be taken (if so)."""

    version: FileVersion
    problem: str | None = None


# --------------------------------------------------------------------------------------------
# Pure decisions


def classify_name(name: str, pattern: str, *, case_sensitive: bool = False) -> str | None:
    """None if a file of this name may be taken, else why it is ignored.

    `pattern` is an fnmatch glob (POSIX semantics on every platform), matched ignoring case
    unless `case_sensitive`.
    """
    if name.startswith("."):
        return "hidden"
    lower = name.lower()
    for suffix in TEMP_SUFFIXES:
        if lower.endswith(suffix):
            return f"temporary (*{suffix})"
    if name.endswith("~"):
        return "temporary (*~)"
    if case_sensitive:
        matched = fnmatch.fnmatchcase(name, pattern)
    else:
        matched = fnmatch.fnmatchcase(name.casefold(), pattern.casefold())
    if not matched:
        return "pattern"
    return None


def settle_due_s(sighting: Sighting, settle_s: float) -> float:
    """When `sighting` becomes settled if nothing changes (monotonic seconds)."""
    return sighting.since_s + max(settle_s, 0.0)


def settled(first: Sighting, current: FileVersion, now_s: float, settle_s: float) -> bool:
    """True once the version first seen at `first.since_s` is still the current one and has been
    for `settle_s`. settle_s <= 0: settled as soon as seen."""
    return first.version == current and now_s >= settle_due_s(first, settle_s)


def readable_by_mode(mode: int) -> bool:
    """False when no read bit is set for anyone (see the module docstring for why)."""
    return bool(mode & (stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH))


def _version(st: os.stat_result) -> FileVersion:
    return FileVersion(
        size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino, device=st.st_dev
    )


def _inside(real: str, folder_real: str) -> bool:
    return real != folder_real and os.path.commonpath([real, folder_real]) == folder_real


# --------------------------------------------------------------------------------------------
# I/O: one look at one path (blocking, thread-safe: no shared state)


def inspect(path: Path, *, folder_real: str, follow_symlinks: bool) -> Look | None:
    """Stat `path`. None when it is gone or is to be ignored (a directory). Never opens the file:
    a FIFO would block the reader."""
    try:
        lst = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return Look(version=FileVersion(size=0, mtime_ns=0, inode=0, device=0),
                    problem=f"cannot stat ({exc.strerror})")
    if stat.S_ISDIR(lst.st_mode):
        return None
    st = lst
    if stat.S_ISLNK(lst.st_mode):
        if not follow_symlinks:
            return Look(version=_version(lst), problem="symbolic link (follow_symlinks is off)")
        if not _inside(os.path.realpath(path), folder_real):
            return Look(version=_version(lst), problem="symlink outside the inbox")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return Look(version=_version(lst), problem="broken symbolic link")
        except OSError as exc:
            return Look(version=_version(lst), problem=f"cannot stat ({exc.strerror})")
        if stat.S_ISDIR(st.st_mode):
            return None
    version = _version(st)
    if not stat.S_ISREG(st.st_mode):
        return Look(version=version, problem="not a regular file")
    if not readable_by_mode(st.st_mode) or not os.access(path, os.R_OK):
        return Look(version=version, problem="not readable (permission denied)")
    return Look(version=version)


# --------------------------------------------------------------------------------------------
# The watcher


class _State(enum.Enum):
    #: Seen, waiting for its size and mtime to stay unchanged for settle_s.
    PENDING = "pending"
    #: Offered to the caller, who has not said done: offered again by a rescan rescan_s later.
    EMITTED = "emitted"
    #: The caller claimed it or gave up on it for good: not offered again while unchanged.
    DONE = "done"
    #: Reported as Rejected: not reported again while unchanged.
    REJECTED = "rejected"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Entry:
    sighting: Sighting
    state: _State
    reason: str = ""
    emitted_s: float = 0.0  #: monotonic time of the last emit (EMITTED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Folder:
    path: Path  #: absolute, as configured (symlinks not resolved)
    real: str  #: with symlinks resolved, for the "points outside" check
    watches: tuple[config.WatchConfig, ...]


_Key = tuple[str, str]  # (watch name, file name)
Emit = Callable[[Candidate | Rejected], Awaitable[None]]


class FolderWatcher:
    """Watches every configured folder and emits each file version once it is ready.

    `run()` calls `emit` for each Candidate / Rejected, one at a time; an exception from `emit`
    ends `run()`. Tell the watcher what became of a candidate: `done(candidate)` once claimed (or
    given up for good), `forget(path)` when the claim failed and should be offered again (at the
    next event or rescan). A candidate neither done nor forgotten is offered again by a rescan
    once `rescan_s` has passed, while it is still there unchanged; the caller's unique claim_key
    makes that harmless.
    """

    def __init__(self, watches: Sequence[config.WatchConfig], *, rescan_s: float = 30.0) -> None:
        self._watches = {w.name: w for w in watches}
        self._rescan_s = rescan_s
        folders: dict[Path, list[config.WatchConfig]] = {}
        for w in watches:
            folders.setdefault(Path(os.path.abspath(w.folder)), []).append(w)
        self._folders = {
            str(p): _Folder(path=p, real="", watches=tuple(ws)) for p, ws in folders.items()
        }
        self._folder_of = {w.name: str(Path(os.path.abspath(w.folder))) for w in watches}
        self._entries: dict[_Key, _Entry] = {}
        #: folder -> names logged as matching no pattern (logged once while they stay)
        self._ignored: dict[str, set[str]] = {}
        self._heap: list[tuple[float, int, _Key]] = []
        self._armed: set[_Key] = set()
        self._seq = 0
        self._dirty: set[str] = set()
        self._rescan_requested = True
        self._flood = False
        self._wake = asyncio.Event()
        #: Set once events are being watched and the start-up scan's files were emitted.
        self.started = asyncio.Event()

    # ---- what the caller tells us

    def done(self, candidate: Candidate) -> None:
        """The caller claimed `candidate` (or gave up on it for good): do not offer it again
        while that version sits in the folder."""
        key = (candidate.watch, candidate.path.name)
        entry = self._entries.get(key)
        version = FileVersion(size=candidate.size, mtime_ns=candidate.mtime_ns,
                              inode=candidate.inode, device=candidate.device)
        if entry is not None and entry.sighting.version == version:
            self._entries[key] = dataclasses.replace(entry, state=_State.DONE)

    def forget(self, path: Path) -> None:
        """Drop what is known about `path`: it is looked at afresh at the next event or rescan
        (settling again), so a failed claim is offered again."""
        folder = self._folders.get(str(Path(os.path.abspath(path)).parent))
        if folder is None:
            return
        for w in folder.watches:
            self._entries.pop((w.name, path.name), None)

    def pending_count(self) -> int:
        """Files waiting to settle (for status pages and tests)."""
        return sum(1 for e in self._entries.values() if e.state is _State.PENDING)

    # ---- the loop

    async def run(self, emit: Emit, stop: asyncio.Event) -> None:
        """Scan every folder, then watch them until `stop` is set."""
        # watchfiles logs every batch at INFO: noise in the daemon's log.
        logging.getLogger("watchfiles").setLevel(logging.WARNING)
        await self._prepare_folders()
        watch_stop = asyncio.Event()
        events = asyncio.create_task(self._watch_events(watch_stop), name="watcher-events")
        relay = asyncio.create_task(self._relay_stop(stop), name="watcher-stop")
        try:
            # One turn of the loop lets awatch register its inotify watches, so nothing created
            # after the start-up scan's listing can slip between scan and watch.
            await asyncio.sleep(0)
            next_rescan_s = clock.monotonic()
            while not stop.is_set():
                self._wake.clear()
                if self._rescan_requested or clock.monotonic() >= next_rescan_s:
                    self._rescan_requested = False
                    await self._emit_all(emit, await self._rescan())
                    next_rescan_s = clock.monotonic() + self._rescan_s
                    self.started.set()
                if self._flood:
                    # inotify may have dropped events and watchfiles does not say so (its
                    # issue #348): look at the folders again soon rather than in rescan_s.
                    self._flood = False
                    next_rescan_s = min(next_rescan_s, clock.monotonic() + FLOOD_RESCAN_S)
                if self._dirty:
                    batch, self._dirty = self._dirty, set()
                    await self._emit_all(emit, self._on_events(batch))
                await self._emit_all(emit, self._on_timers())
                await self._sleep_until(min(next_rescan_s, self._next_timer_s()))
        finally:
            watch_stop.set()
            relay.cancel()
            # awatch's thread notices watch_stop within STEP_MS; wait so no thread outlives run().
            await asyncio.gather(events, relay, return_exceptions=True)

    async def _emit_all(self, emit: Emit, items: Iterable[Candidate | Rejected]) -> None:
        for n, item in enumerate(items, 1):
            await emit(item)
            if n % YIELD_EVERY == 0:
                # A burst must not hold the loop: let the event task fetch the next batch
                # (and the caller's claims proceed) while this one is worked through.
                await asyncio.sleep(0)

    async def _sleep_until(self, deadline_s: float) -> None:
        delay = deadline_s - clock.monotonic()
        if delay <= 0 or self._wake.is_set() or self._rescan_requested:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    async def _relay_stop(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _prepare_folders(self) -> None:
        self._folders = await asyncio.to_thread(_prepared, self._folders)

    async def _watch_events(self, watch_stop: asyncio.Event) -> None:
        """Feed changed paths to the loop. Re-created when it fails or when a watched folder
        itself changes (removed, renamed, replaced): its inotify watch would be dead."""
        retry_s = WATCH_RETRY_S
        while not watch_stop.is_set():
            paths = [f.path for f in self._folders.values()]
            try:
                async with contextlib.aclosing(watchfiles.awatch(
                    *paths,
                    watch_filter=None,
                    debounce=DEBOUNCE_MS,
                    step=STEP_MS,
                    stop_event=watch_stop,
                    recursive=False,
                    ignore_permission_denied=True,
                )) as batches:
                    async for changes in batches:
                        raw = {p for _change, p in changes}
                        self._dirty.update(raw)
                        self._flood = self._flood or len(raw) >= FLOOD_EVENTS
                        self._wake.set()
                        retry_s = WATCH_RETRY_S
                        if not raw.isdisjoint(self._folders):
                            _log.warning("watch_folder_changed",
                                         folders=sorted(raw.intersection(self._folders)))
                            break
            except Exception as exc:  # e.g. a watched folder cannot be watched: rescans carry on
                _log.warning("watch_failed", error=f"{type(exc).__name__}: {exc}",
                             retry_in_s=retry_s)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(retry_s):
                        await watch_stop.wait()
                retry_s = min(retry_s * 2, MAX_WATCH_RETRY_S)
            if watch_stop.is_set():
                break
            await self._prepare_folders()  # re-creates a removed folder
            # Events may have been lost while no watch was in place.
            self._rescan_requested = True
            self._wake.set()

    # ---- decisions applied to the state

    def _on_events(self, raw_paths: set[str]) -> Iterator[Candidate | Rejected]:
        """Lazily, so the first file of a burst is emitted before the last one is looked at
        (hence the clock read per file: emitting takes time)."""
        for raw in raw_paths:
            folder = self._folders.get(os.path.dirname(raw))
            if folder is None:  # the folder itself: _watch_events restarts and asks a rescan
                continue
            name = os.path.basename(raw)
            yield from self._look_and_consider(folder, name, clock.monotonic())

    def _on_timers(self) -> Iterator[Candidate | Rejected]:
        while self._heap and self._heap[0][0] <= (now := clock.monotonic()):
            _due, _seq, key = heapq.heappop(self._heap)
            self._armed.discard(key)
            entry = self._entries.get(key)
            if entry is None or entry.state is not _State.PENDING:
                continue
            watch = self._watches[key[0]]
            folder = self._folders[self._folder_of[watch.name]]
            path = folder.path / key[1]
            look = inspect(path, folder_real=folder.real, follow_symlinks=watch.follow_symlinks)
            yield from self._consider(watch, path, look, now, rescan=False)

    def _log_ignored(self, folder: _Folder, name: str) -> None:
        patterns = sorted({w.pattern for w in folder.watches})
        _log.info("input_ignored", folder=str(folder.path), name=name,
                  reason=f"matches no watch pattern ({', '.join(patterns)})")

    def _next_timer_s(self) -> float:
        return self._heap[0][0] if self._heap else float("inf")

    def _arm(self, key: _Key, due_s: float) -> None:
        if key in self._armed:
            return
        self._armed.add(key)
        self._seq += 1
        heapq.heappush(self._heap, (due_s, self._seq, key))

    def _look_and_consider(
        self, folder: _Folder, name: str, now: float
    ) -> list[Candidate | Rejected]:
        path = folder.path / name
        out: list[Candidate | Rejected] = []
        if unmatched(folder.watches, name):
            known = self._ignored.setdefault(str(folder.path), set())
            if name not in known and _is_file_like(path):
                known.add(name)
                self._log_ignored(folder, name)
            return out
        for watch, look in _inspect_name(folder, path):
            out.extend(self._consider(watch, path, look, now, rescan=False))
        return out

    def _consider(
        self,
        watch: config.WatchConfig,
        path: Path,
        look: Look | None,
        now: float,
        *,
        rescan: bool,
    ) -> list[Candidate | Rejected]:
        """Apply one look at `name` to what is known about it; return what to emit."""
        key = (watch.name, path.name)
        entry = self._entries.get(key)
        if look is None:
            self._entries.pop(key, None)
            return []
        if look.problem is not None:
            if (entry is not None and entry.state is _State.REJECTED
                    and entry.sighting.version == look.version and entry.reason == look.problem):
                return []
            self._entries[key] = _Entry(sighting=Sighting(version=look.version, since_s=now),
                                        state=_State.REJECTED, reason=look.problem)
            return [Rejected(watch=watch.name, path=path, reason=look.problem)]
        if (entry is None or entry.state is _State.REJECTED
                or entry.sighting.version != look.version):
            entry = _Entry(sighting=Sighting(version=look.version, since_s=now),
                           state=_State.PENDING)
            self._entries[key] = entry
        if entry.state is _State.PENDING:
            if settled(entry.sighting, look.version, now, watch.settle_s):
                self._entries[key] = _Entry(sighting=entry.sighting, state=_State.EMITTED,
                                            emitted_s=now)
                return [_candidate(watch, path, look.version)]
            self._arm(key, settle_due_s(entry.sighting, watch.settle_s))
            return []
        if entry.state is _State.EMITTED and rescan and now - entry.emitted_s >= self._rescan_s:
            # No word from the caller for a whole rescan period: offer it again.
            self._entries[key] = dataclasses.replace(entry, emitted_s=now)
            return [_candidate(watch, path, look.version)]
        return []

    async def _rescan(self) -> list[Candidate | Rejected]:
        out: list[Candidate | Rejected] = []
        for folder in list(self._folders.values()):
            scan = await asyncio.to_thread(_scan_folder, folder)
            if scan is None:
                # Folder missing or unreadable: keep what we know, try to re-create it.
                await self._prepare_folders()
                continue
            known = self._ignored.get(str(folder.path), set())
            for name in sorted(scan.ignored - known):
                self._log_ignored(folder, name)
            self._ignored[str(folder.path)] = scan.ignored  # names gone since are forgotten
            now = clock.monotonic()
            seen: set[_Key] = set()
            for watch, path, look in scan.looks:
                seen.add((watch.name, path.name))
                out.extend(self._consider(watch, path, look, now, rescan=True))
            names = {w.name for w in folder.watches}
            for key in [k for k in self._entries if k[0] in names and k not in seen]:
                del self._entries[key]  # gone since: claimed, moved away or deleted
        return out


def _candidate(watch: config.WatchConfig, path: Path, v: FileVersion) -> Candidate:
    return Candidate(watch=watch.name, path=path, size=v.size, mtime_ns=v.mtime_ns,
                     inode=v.inode, device=v.device)


def _inspect_name(
    folder: _Folder, path: Path
) -> list[tuple[config.WatchConfig, Look | None]]:
    """Inspect `path` for each watch on `folder` whose rules accept its name (blocking)."""
    out: list[tuple[config.WatchConfig, Look | None]] = []
    cache: dict[bool, Look | None] = {}
    for w in folder.watches:
        if _classify(path.name, w) is not None:
            continue
        if w.follow_symlinks not in cache:
            cache[w.follow_symlinks] = inspect(
                path, folder_real=folder.real, follow_symlinks=w.follow_symlinks
            )
        out.append((w, cache[w.follow_symlinks]))
    return out


def _classify(name: str, watch: config.WatchConfig) -> str | None:
    # getattr: the `case_sensitive` key is recent; a WatchConfig without it matches ignoring case
    return classify_name(name, watch.pattern,
                         case_sensitive=bool(getattr(watch, "case_sensitive", False)))


def _is_file_like(path: Path) -> bool:
    """Present and not a folder (blocking; never raises)."""
    try:
        return not stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def unmatched(folder_watches: Sequence[config.WatchConfig], name: str) -> bool:
    """True when every watch on the folder refuses `name` for its pattern alone (not for being
    hidden or temporary): a file nobody will take, which deserves a word in the log."""
    reasons = [_classify(name, w) for w in folder_watches]
    return bool(reasons) and all(r == "pattern" for r in reasons)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Scan:
    looks: list[tuple[config.WatchConfig, Path, Look | None]]
    ignored: set[str]  #: names no watch's pattern accepts (directories left out)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:  # gone or unreadable since the listing: `inspect` will say which
        return False


def _scan_folder(folder: _Folder) -> _Scan | None:
    """List and inspect every acceptable name in `folder` (blocking: run in a thread)."""
    try:
        with os.scandir(folder.path) as it:
            entries = [(e.name, _is_dir(e)) for e in it]
    except OSError as exc:
        _log.warning("watch_folder_unlistable", folder=str(folder.path), error=exc.strerror)
        return None
    looks = [
        (w, path, look)
        for path in (folder.path / name for name, _is_dir in entries)
        for w, look in _inspect_name(folder, path)
    ]
    ignored = {name for name, is_dir in entries
               if not is_dir and unmatched(folder.watches, name)}
    return _Scan(looks=looks, ignored=ignored)


def _prepared(folders: dict[str, _Folder]) -> dict[str, _Folder]:
    """Create missing folders; note where each really is (blocking: run in a thread)."""
    out: dict[str, _Folder] = {}
    for key, folder in folders.items():
        try:
            folder.path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            _log.warning("watch_folder_unusable", folder=str(folder.path), error=exc.strerror)
        out[key] = dataclasses.replace(folder, real=os.path.realpath(folder.path))
    return out
