"""Folder watcher: real files in tmp_path, real watchfiles/inotify, no doubles."""

# The tests play the writer: blocking file calls in them are the point, not a slip.
# ruff: noqa: ASYNC240

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import structlog

from orchestrator import config, watcher

# --------------------------------------------------------------------------------------------
# Pure decisions


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("data.csv", None),
        ("Data 2024.csv", None),
        (".data.csv", "hidden"),
        (".hidden", "hidden"),
        ("data.csv.tmp", "temporary (*.tmp)"),
        ("data.TMP", "temporary (*.tmp)"),
        ("data.csv.part", "temporary (*.part)"),
        ("data.csv.partial", "temporary (*.partial)"),
        ("data.csv.crdownload", "temporary (*.crdownload)"),
        ("data.csv~", "temporary (*~)"),
        ("data.txt", "pattern"),
        ("data.CSV", None),  # extensions match whatever their case, by default
        ("Data.Csv", None),
        ("csv", "pattern"),
    ],
)
def test_classify_name(name: str, reason: str | None) -> None:
    assert watcher.classify_name(name, "*.csv") == reason


def test_classify_name_case_sensitive_on_request() -> None:
    assert watcher.classify_name("data.CSV", "*.csv", case_sensitive=True) == "pattern"
    assert watcher.classify_name("data.csv", "*.csv", case_sensitive=True) is None
    assert watcher.classify_name("DATA.CSV", "*.csv") is None
    assert watcher.classify_name("data.csv", "*.CSV") is None


def test_classify_name_other_patterns() -> None:
    assert watcher.classify_name("a.tsv", "*.[ct]sv") is None
    assert watcher.classify_name("a.tsv", "*") is None
    assert watcher.classify_name("a.part", "*") == "temporary (*.part)"
    assert watcher.classify_name("in_1.csv", "in_?.csv") is None
    assert watcher.classify_name("in_12.csv", "in_?.csv") == "pattern"


def _v(
    size: int = 10, mtime_ns: int = 1_000, inode: int = 7, device: int = 1
) -> watcher.FileVersion:
    return watcher.FileVersion(size=size, mtime_ns=mtime_ns, inode=inode, device=device)


def test_settled_needs_same_version_for_settle_time() -> None:
    first = watcher.Sighting(version=_v(), since_s=100.0)
    assert not watcher.settled(first, _v(), 100.4, 0.5)
    assert watcher.settled(first, _v(), 100.5, 0.5)
    assert not watcher.settled(first, _v(size=11), 200.0, 0.5)
    assert not watcher.settled(first, _v(mtime_ns=2_000), 200.0, 0.5)
    assert not watcher.settled(first, _v(inode=8), 200.0, 0.5)  # replaced by another file
    assert watcher.settled(first, _v(), 100.0, 0.0)  # settle 0: as soon as seen
    assert watcher.settle_due_s(first, 0.5) == 100.5


def test_readable_by_mode() -> None:
    assert not watcher.readable_by_mode(stat.S_IFREG | 0o000)
    assert not watcher.readable_by_mode(stat.S_IFREG | 0o222)
    assert watcher.readable_by_mode(stat.S_IFREG | 0o400)
    assert watcher.readable_by_mode(stat.S_IFREG | 0o004)


def test_claim_key_identifies_a_version_not_a_host() -> None:
    def cand(**kw: int) -> watcher.Candidate:
        base = {"size": 10, "mtime_ns": 5, "inode": 7, "device": 1}
        base.update(kw)
        return watcher.Candidate(watch="w", path=Path("/in/a.csv"), **base)

    assert cand().claim_key() == cand(device=99).claim_key()  # NFS: device differs per host
    assert cand().claim_key() != cand(mtime_ns=6).claim_key()
    assert cand().claim_key() != cand(size=11).claim_key()
    assert cand().claim_key() != cand(inode=8).claim_key()
    other = watcher.Candidate(watch="w", path=Path("/in/b.csv"), size=10, mtime_ns=5, inode=7,
                              device=1)
    assert other.claim_key() != cand().claim_key()
    assert cand().claim_key().startswith("w:a.csv:")


def test_inspect_missing_path_is_none(tmp_path: Path) -> None:
    assert watcher.inspect(tmp_path / "nope.csv", folder_real=str(tmp_path),
                           follow_symlinks=False) is None


# --------------------------------------------------------------------------------------------
# The running watcher


class Run:
    """A FolderWatcher running in a task, with everything it emitted."""

    def __init__(self, fw: watcher.FolderWatcher, *, auto_done: bool) -> None:
        self.fw = fw
        self.auto_done = auto_done
        self.items: list[tuple[float, watcher.Candidate | watcher.Rejected]] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def emit(self, item: watcher.Candidate | watcher.Rejected) -> None:
        self.items.append((time.monotonic(), item))
        if self.auto_done and isinstance(item, watcher.Candidate):
            self.fw.done(item)  # as the real caller does once the claim row is in

    @property
    def candidates(self) -> list[watcher.Candidate]:
        return [i for _t, i in self.items if isinstance(i, watcher.Candidate)]

    @property
    def rejected(self) -> list[watcher.Rejected]:
        return [i for _t, i in self.items if isinstance(i, watcher.Rejected)]

    def names(self) -> list[str]:
        return sorted(c.path.name for c in self.candidates)

    async def until(self, pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; emitted: {[i for _t, i in self.items]}")
            await asyncio.sleep(0.005)


def _watch(folder: Path, **kw: object) -> config.WatchConfig:
    base = folder.parent
    args: dict[str, object] = {
        "name": "inbox", "folder": folder, "service": "svc", "output_dir": base / "out",
        "archive_dir": base / "archive", "failed_dir": base / "failed", "settle_s": 0.0,
    }
    args.update(kw)
    return config.WatchConfig(**args)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    *watches: config.WatchConfig, rescan_s: float = 30.0, auto_done: bool = True
) -> AsyncIterator[Run]:
    run = Run(watcher.FolderWatcher(watches, rescan_s=rescan_s), auto_done=auto_done)
    run.task = asyncio.create_task(run.fw.run(run.emit, run.stop))
    await asyncio.wait_for(run.fw.started.wait(), 5.0)
    try:
        yield run
    finally:
        run.stop.set()
        await asyncio.wait_for(run.task, 2.0)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    return tmp_path / "inbox"


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    """Where files are written before being renamed into the inbox (same filesystem)."""
    d = tmp_path / "staging"
    d.mkdir()
    return d


def _drop(staging: Path, inbox: Path, name: str, text: str = "Col2\nhello\n") -> Path:
    src = staging / name
    src.write_text(text)
    dst = inbox / name
    os.rename(src, dst)
    return dst


async def test_missing_folder_is_created_0750(inbox: Path) -> None:
    old = os.umask(0o022)
    try:
        async with running(_watch(inbox)):
            assert stat.S_IMODE(inbox.stat().st_mode) == 0o750
    finally:
        os.umask(old)


async def test_files_present_before_start_are_emitted(inbox: Path) -> None:
    inbox.mkdir()
    for i in range(3):
        (inbox / f"pre{i}.csv").write_text("x" * i)
    (inbox / "pre.part").write_text("x")
    async with running(_watch(inbox, settle_s=0.2)) as run:
        await run.until(lambda: len(run.candidates) == 3)
        await asyncio.sleep(0.3)
        assert run.names() == ["pre0.csv", "pre1.csv", "pre2.csv"]
        c = next(c for c in run.candidates if c.path.name == "pre2.csv")
        st = (inbox / "pre2.csv").stat()
        assert c == watcher.Candidate(watch="inbox", path=inbox / "pre2.csv", size=2,
                                      mtime_ns=st.st_mtime_ns, inode=st.st_ino,
                                      device=st.st_dev)
        assert c.path.is_absolute()


async def test_renamed_in_file_is_emitted_fast(inbox: Path, staging: Path) -> None:
    async with running(_watch(inbox)) as run:
        t0 = time.monotonic()
        _drop(staging, inbox, "fast.csv")
        await run.until(lambda: len(run.candidates) == 1, timeout_s=2.0)
        latency_s = run.items[0][0] - t0
        assert latency_s < 1.0
        assert run.candidates[0].path == inbox / "fast.csv"


async def test_names_of_unfinished_or_unwanted_files_are_ignored(
    inbox: Path, staging: Path
) -> None:
    ignored = [".hidden.csv", "a.csv.tmp", "b.csv.part", "c.partial", "d.csv.crdownload",
               "e.csv~", "f.txt", "g.CSV.part"]
    async with running(_watch(inbox), rescan_s=0.2) as run:
        for name in ignored:
            _drop(staging, inbox, name)
        (inbox / "written-in-place.tmp").write_text("x")
        await asyncio.sleep(0.5)  # events handled and at least one rescan done
        _drop(staging, inbox, "ok.csv")
        await run.until(lambda: len(run.candidates) == 1)
        await asyncio.sleep(0.3)
        assert run.names() == ["ok.csv"]
        assert run.rejected == []


async def test_write_then_rename_from_part_name_is_taken_once(inbox: Path) -> None:
    async with running(_watch(inbox)) as run:
        part = inbox / "report.csv.part"
        with part.open("w") as f:
            for _ in range(5):
                f.write("row\n")
                f.flush()
                await asyncio.sleep(0.02)
        os.rename(part, inbox / "report.csv")
        await run.until(lambda: len(run.candidates) == 1)
        await asyncio.sleep(0.2)
        assert run.names() == ["report.csv"]
        assert run.candidates[0].size == 20


async def test_growing_file_is_not_taken_until_it_stops(inbox: Path) -> None:
    async with running(_watch(inbox, settle_s=0.5), rescan_s=0.3) as run:
        path = inbox / "growing.csv"
        with path.open("w") as f:
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                f.write("more,data\n")
                f.flush()
                last_write = time.monotonic()
                await asyncio.sleep(0.1)
                assert run.candidates == [], "taken while still being written"
        await run.until(lambda: len(run.candidates) == 1, timeout_s=3.0)
        emitted_at = run.items[0][0]
        assert emitted_at - last_write >= 0.5  # waited for the settle time after the last write
        assert emitted_at - last_write < 1.5
        assert run.candidates[0].size == path.stat().st_size
        assert run.fw.pending_count() == 0


async def test_settle_zero_takes_file_as_soon_as_seen(inbox: Path, staging: Path) -> None:
    async with running(_watch(inbox, settle_s=0.0)) as run:
        t0 = time.monotonic()
        _drop(staging, inbox, "now.csv")
        await run.until(lambda: len(run.candidates) == 1)
        assert run.items[0][0] - t0 < 0.5


async def test_symlink_not_followed_by_default(inbox: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("secret")
    async with running(_watch(inbox), rescan_s=0.2) as run:
        (inbox / "inner.csv").write_text("x")
        (inbox / "link-out.csv").symlink_to(outside)
        (inbox / "link-in.csv").symlink_to(inbox / "inner.csv")
        await run.until(lambda: len(run.rejected) == 2 and len(run.candidates) == 1)
        await asyncio.sleep(0.5)  # rescans do not repeat the report
        assert run.names() == ["inner.csv"]
        assert sorted((r.path.name, r.reason) for r in run.rejected) == [
            ("link-in.csv", "symbolic link (follow_symlinks is off)"),
            ("link-out.csv", "symbolic link (follow_symlinks is off)"),
        ]


async def test_followed_symlink_outside_is_still_rejected(inbox: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.csv"
    outside.write_text("secret")
    store = inbox / ".store"
    store.mkdir(parents=True)
    (store / "real.csv").write_text("abc")
    async with running(_watch(inbox, follow_symlinks=True), rescan_s=0.2) as run:
        (inbox / "link-out.csv").symlink_to(outside)
        (inbox / "sneaky.csv").symlink_to(Path("..") / "elsewhere.csv")  # relative, via ..
        (inbox / "link-in.csv").symlink_to(store / "real.csv")
        await run.until(lambda: len(run.rejected) == 2 and len(run.candidates) == 1)
        await asyncio.sleep(0.5)
        assert sorted((r.path.name, r.reason) for r in run.rejected) == [
            ("link-out.csv", "symlink outside the inbox"),
            ("sneaky.csv", "symlink outside the inbox"),
        ]
        c = run.candidates[0]
        assert c.path == inbox / "link-in.csv"
        assert c.size == 3
        assert c.inode == (store / "real.csv").stat().st_ino  # the target's version


async def test_directory_is_ignored(inbox: Path) -> None:
    async with running(_watch(inbox), rescan_s=0.2) as run:
        (inbox / "folder.csv").mkdir()
        (inbox / "folder.csv" / "inner.csv").write_text("x")
        await asyncio.sleep(0.5)
        (inbox / "after.csv").write_text("x")
        await run.until(lambda: len(run.candidates) == 1)
        await asyncio.sleep(0.2)
        assert run.names() == ["after.csv"]
        assert run.rejected == []


async def test_unreadable_file_is_rejected_once_then_taken_when_readable(inbox: Path) -> None:
    # Mode 000 is "not readable" even for root (mode-bit rule, see the module docstring), so
    # this test means the same whichever user runs it.
    inbox.mkdir()
    locked = inbox / "locked.csv"
    locked.write_text("x")
    locked.chmod(0o000)
    try:
        async with running(_watch(inbox), rescan_s=0.2) as run:
            await run.until(lambda: len(run.rejected) == 1)
            await asyncio.sleep(0.6)  # several rescans: no repeated report
            assert [(r.path.name, r.reason) for r in run.rejected] == [
                ("locked.csv", "not readable (permission denied)")
            ]
            assert run.candidates == []
            locked.chmod(0o640)
            await run.until(lambda: len(run.candidates) == 1)
            assert run.names() == ["locked.csv"]
            assert len(run.rejected) == 1
    finally:
        locked.chmod(0o640)


@pytest.mark.skipif(os.geteuid() == 0, reason="root passes os.access; mode 000 case covers it")
async def test_file_readable_only_by_others_is_rejected(inbox: Path) -> None:
    inbox.mkdir()
    f = inbox / "theirs.csv"
    f.write_text("x")
    f.chmod(0o044)  # group/other may read, the owner (us) may not
    try:
        async with running(_watch(inbox)) as run:
            await run.until(lambda: len(run.rejected) == 1)
            assert run.rejected[0].reason == "not readable (permission denied)"
    finally:
        f.chmod(0o640)


async def test_fifo_is_rejected_without_blocking(inbox: Path) -> None:
    inbox.mkdir()
    os.mkfifo(inbox / "pipe.csv")
    async with running(_watch(inbox)) as run:
        await run.until(lambda: len(run.rejected) == 1)
        assert run.rejected[0].reason == "not a regular file"


async def test_burst_of_1000_files_each_emitted_exactly_once(inbox: Path, staging: Path) -> None:
    names = [f"burst-{i:04d}.csv" for i in range(1000)]
    for n in names:
        (staging / n).write_text(n)
    async with running(_watch(inbox)) as run:
        for n in names:
            os.rename(staging / n, inbox / n)
        await run.until(lambda: len(run.candidates) >= 1000, timeout_s=10.0)
        await asyncio.sleep(0.3)
        assert run.names() == names  # all, and no duplicates
        assert run.rejected == []


async def test_vanishing_files_are_not_emitted_and_do_not_crash(
    inbox: Path, staging: Path
) -> None:
    async with running(_watch(inbox)) as run:
        # Created and deleted within one debounce window: the event names a file that is gone.
        for i in range(200):
            p = inbox / f"gone-{i}.csv"
            p.write_text("x")
            p.unlink()
        _drop(staging, inbox, "stays.csv")
        await run.until(lambda: len(run.candidates) >= 1)
        await asyncio.sleep(0.3)
        assert run.names() == ["stays.csv"]
        assert run.task is not None and not run.task.done()


async def test_file_deleted_while_settling_is_not_emitted(inbox: Path, staging: Path) -> None:
    async with running(_watch(inbox, settle_s=0.3)) as run:
        p = _drop(staging, inbox, "brief.csv")
        await run.until(lambda: run.fw.pending_count() == 1)
        p.unlink()
        await asyncio.sleep(0.6)  # past the settle timer
        assert run.items == []
        assert run.fw.pending_count() == 0


async def test_rescan_offers_unclaimed_again_but_not_done(inbox: Path, staging: Path) -> None:
    async with running(_watch(inbox), rescan_s=0.2, auto_done=False) as run:
        _drop(staging, inbox, "a.csv")
        _drop(staging, inbox, "b.csv")
        await run.until(lambda: len(run.candidates) == 2)
        done = next(c for c in run.candidates if c.path.name == "a.csv")
        run.fw.done(done)
        await asyncio.sleep(0.7)  # several rescans
        a_count = sum(1 for c in run.candidates if c.path.name == "a.csv")
        b_count = sum(1 for c in run.candidates if c.path.name == "b.csv")
        assert a_count == 1  # claimed: never again while it sits there
        assert b_count >= 2  # not acknowledged: offered again by the safety-net rescan


async def test_forget_offers_file_again(inbox: Path, staging: Path) -> None:
    async with running(_watch(inbox, settle_s=0.1), rescan_s=0.3) as run:
        _drop(staging, inbox, "retry.csv")
        await run.until(lambda: len(run.candidates) == 1)
        await asyncio.sleep(0.4)
        assert len(run.candidates) == 1
        run.fw.forget(inbox / "retry.csv")  # the claim failed after all
        await run.until(lambda: len(run.candidates) == 2, timeout_s=2.0)
        assert run.candidates[0].claim_key() == run.candidates[1].claim_key()


async def test_same_name_dropped_again_is_a_new_version(inbox: Path, staging: Path) -> None:
    async with running(_watch(inbox)) as run:
        p = _drop(staging, inbox, "again.csv", "first\n")
        await run.until(lambda: len(run.candidates) == 1)
        first = run.candidates[0]
        os.rename(p, staging / "claimed.csv")  # the caller moves it to its spool
        await asyncio.sleep(0.1)
        _drop(staging, inbox, "again.csv", "second version\n")
        await run.until(lambda: len(run.candidates) == 2)
        second = run.candidates[1]
        assert second.path == first.path
        assert second.claim_key() != first.claim_key()


async def test_two_watches_on_one_folder_with_patterns(tmp_path: Path, staging: Path) -> None:
    inbox = tmp_path / "inbox"
    csv = _watch(inbox, name="csv", pattern="*.csv")
    tsv = _watch(inbox, name="tsv", pattern="*.tsv", service="other")
    async with running(csv, tsv) as run:
        _drop(staging, inbox, "x.csv")
        _drop(staging, inbox, "y.tsv")
        _drop(staging, inbox, "z.txt")
        await run.until(lambda: len(run.candidates) == 2)
        await asyncio.sleep(0.2)
        assert sorted((c.watch, c.path.name) for c in run.candidates) == [
            ("csv", "x.csv"), ("tsv", "y.tsv")
        ]


async def test_upper_and_mixed_case_extensions_are_taken(inbox: Path, staging: Path) -> None:
    async with running(_watch(inbox)) as run:
        for name in ("A.CSV", "b.Csv", "c.csv"):
            _drop(staging, inbox, name)
        await run.until(lambda: len(run.candidates) == 3)
        assert run.names() == ["A.CSV", "b.Csv", "c.csv"]


async def test_case_sensitive_watch_takes_only_the_exact_case(
    tmp_path: Path, inbox: Path, staging: Path
) -> None:
    strict = _watch(inbox, case_sensitive=True)
    async with running(strict) as run:
        _drop(staging, inbox, "A.CSV")
        _drop(staging, inbox, "b.csv")
        await run.until(lambda: len(run.candidates) == 1)
        await asyncio.sleep(0.2)
        assert run.names() == ["b.csv"]


async def test_a_file_no_pattern_takes_is_logged_once(inbox: Path, staging: Path) -> None:
    inbox.mkdir()
    (inbox / "before.txt").write_text("here at start\n")
    (inbox / "sub.txt").mkdir()  # a directory: ignored without a word
    with structlog.testing.capture_logs() as logs:
        async with running(_watch(inbox), rescan_s=0.5) as run:
            _drop(staging, inbox, "notes.txt")
            _drop(staging, inbox, ".hidden.txt")  # still being written by convention: silent
            _drop(staging, inbox, "x.csv")
            await run.until(lambda: len(run.candidates) == 1)
            (inbox / "notes.txt").write_text("changed\n")  # a new version: still once
            await asyncio.sleep(1.2)  # two rescans
    ignored = [e for e in logs if e["event"] == "input_ignored"]
    assert sorted(e["name"] for e in ignored) == ["before.txt", "notes.txt"], ignored
    assert all(e["log_level"] == "info" and "*.csv" in e["reason"] for e in ignored)


async def test_a_name_one_watch_takes_is_not_logged_as_ignored(
    tmp_path: Path, staging: Path
) -> None:
    inbox = tmp_path / "inbox"
    csv = _watch(inbox, name="csv", pattern="*.csv")
    tsv = _watch(inbox, name="tsv", pattern="*.tsv", service="other")
    with structlog.testing.capture_logs() as logs:
        async with running(csv, tsv) as run:
            _drop(staging, inbox, "y.tsv")
            _drop(staging, inbox, "z.txt")
            await run.until(lambda: len(run.candidates) == 1)
            await asyncio.sleep(0.2)
    assert [e["name"] for e in logs if e["event"] == "input_ignored"] == ["z.txt"]


async def test_stop_ends_run_promptly(inbox: Path) -> None:
    fw = watcher.FolderWatcher([_watch(inbox, settle_s=5.0)], rescan_s=30.0)
    stop = asyncio.Event()

    async def emit(_item: watcher.Candidate | watcher.Rejected) -> None:
        return None

    task = asyncio.create_task(fw.run(emit, stop))
    await asyncio.sleep(0.2)
    (inbox / "waiting.csv").write_text("x")  # a settle timer 5 s away must not hold the stop
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 2.0)
    assert time.monotonic() - t0 < 0.5


async def test_cancelling_run_stops_promptly(inbox: Path) -> None:
    fw = watcher.FolderWatcher([_watch(inbox)], rescan_s=30.0)

    async def emit(_item: watcher.Candidate | watcher.Rejected) -> None:
        return None

    task = asyncio.create_task(fw.run(emit, asyncio.Event()))
    await asyncio.wait_for(fw.started.wait(), 5.0)
    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)
    assert time.monotonic() - t0 < 0.5


async def test_watched_folder_reached_through_a_symlink(tmp_path: Path, staging: Path) -> None:
    real = tmp_path / "real-inbox"
    real.mkdir()
    link = tmp_path / "inbox-link"
    link.symlink_to(real)
    async with running(_watch(link, follow_symlinks=True)) as run:
        _drop(staging, link, "via-link.csv")
        (real / "target.csv").write_text("t")
        (link / "inner-link.csv").symlink_to(real / "target.csv")  # inside, by its real path
        await run.until(lambda: len(run.candidates) == 3, timeout_s=2.0)
        assert run.names() == ["inner-link.csv", "target.csv", "via-link.csv"]
        assert all(c.path.parent == link for c in run.candidates)
        assert run.rejected == []


async def test_rescan_finds_changes_that_raise_no_event(inbox: Path) -> None:
    # A followed symlink's target lives in a subfolder, which is not watched: replacing the
    # target raises no event in the inbox. Only the periodic rescan can see the new version.
    store = inbox / ".store"
    store.mkdir(parents=True)
    (store / "data.csv").write_text("v1\n")
    async with running(_watch(inbox, follow_symlinks=True), rescan_s=0.3) as run:
        (inbox / "link.csv").symlink_to(store / "data.csv")
        await run.until(lambda: len(run.candidates) == 1)
        (store / "tmp").write_text("version two\n")
        os.rename(store / "tmp", store / "data.csv")
        await run.until(lambda: len(run.candidates) == 2, timeout_s=2.0)
        first, second = run.candidates
        assert second.path == first.path == inbox / "link.csv"
        assert second.size == len("version two\n")
        assert second.claim_key() != first.claim_key()


@pytest.mark.parametrize("how", ["removed", "renamed"])
async def test_watch_survives_the_folder_being_removed_or_renamed(
    inbox: Path, staging: Path, tmp_path: Path, how: str
) -> None:
    async with running(_watch(inbox), rescan_s=30.0) as run:
        if how == "removed":
            inbox.rmdir()
        else:
            inbox.rename(tmp_path / "inbox.old")
        deadline = time.monotonic() + 2.0
        while not inbox.is_dir():  # the watcher puts its folder back
            assert time.monotonic() < deadline, "inbox not re-created"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        if how == "renamed":
            (tmp_path / "inbox.old" / "stray.csv").write_text("not in the inbox any more")
        t0 = time.monotonic()
        _drop(staging, inbox, "after.csv")
        await run.until(lambda: len(run.candidates) == 1, timeout_s=2.0)
        assert run.items[-1][0] - t0 < 1.0  # seen by a live watch, not a 30 s rescan
        await asyncio.sleep(0.2)
        assert run.names() == ["after.csv"]
