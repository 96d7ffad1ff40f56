"""Intake latency: time from a file's rename into the inbox to its claim.

    .venv/bin/python bench/intake.py [--burst 1000] [--trickle 200] [--rate 50] [--dir DIR]
    .venv/bin/python bench/intake.py --daemon   # the whole daemon: Azurite, emulator, `run`

Prints one JSON line: {"bench": "intake", "burst_p50_ms": …, "burst_p99_ms": …,
"trickle_p50_ms": …, "trickle_p99_ms": …, "missed": 0, "duplicates": 0}.
Targets: p50 ≤ 50 ms, p99 ≤ 200 ms, none missed.

Here "claim" is the folder watcher's emit (settle_s = 0); with `--daemon` it is the daemon's
`input_claimed` log line (written once the job row is committed), from a real `run` process
with settle_s = 0 that also pushes every claimed file through the emulator meanwhile.
The measuring loop (`measure_burst`,
`measure_trickle`) only needs an async `wait_for_claim(path) -> monotonic time of the claim`, so
the same loop can measure the whole daemon (DB row in, file moved to the spool).

The writer is its own process, as in real use: renames from the claiming process would block
its event loop (or, from a thread, contend for its GIL) and add the burst's own duration to
every file. Each rename is timed just before the call; `time.monotonic` is one system-wide
clock, so a claimer in another process (the daemon) may report its own `time.monotonic()`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from orchestrator import config, watcher

#: Awaits the claim of `path` (in the inbox) and returns `time.monotonic()` at the claim.
WaitForClaim = Callable[[Path], Awaitable[float]]

DEFAULT_TIMEOUT_S = 30.0
_CONTENT = "Col2\nThis is a good day\n"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Latencies:
    samples_ms: tuple[float, ...]  #: rename → claim, one per claimed file
    missed: int  #: files not claimed within the timeout


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _stage(staging: Path, names: Sequence[str]) -> None:
    staging.mkdir(parents=True, exist_ok=True)
    for name in names:
        (staging / name).write_text(_CONTENT)


#: The writer, run as its own process: renames each staged file into the inbox, `gap_s` apart
#: (paced against its start, so the rate holds when a sleep overshoots), and prints the time
#: taken just before each rename.
_WRITER = """
import json, os, sys, time
job = json.load(sys.stdin)
times = []
start = time.monotonic()
for i, name in enumerate(job["names"]):
    delay = start + i * job["gap_s"] - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    times.append(time.monotonic())
    os.rename(os.path.join(job["staging"], name), os.path.join(job["inbox"], name))
json.dump(times, sys.stdout)
"""


async def _rename_all(
    staging: Path, inbox: Path, names: Sequence[str], gap_s: float
) -> list[float]:
    """Run the writer process; the monotonic time of each rename (one clock for all processes)."""
    job = json.dumps(
        {"staging": str(staging), "inbox": str(inbox), "names": list(names), "gap_s": gap_s}
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate(job.encode())
    if proc.returncode != 0:
        raise RuntimeError(f"writer process exited with {proc.returncode}")
    times = json.loads(out)
    assert isinstance(times, list) and len(times) == len(names)
    return [float(t) for t in times]


async def _measure(
    staging: Path,
    inbox: Path,
    wait_for_claim: WaitForClaim,
    names: Sequence[str],
    *,
    gap_s: float,
    timeout_s: float,
) -> Latencies:
    if not names:
        return Latencies(samples_ms=(), missed=0)
    await asyncio.to_thread(_stage, staging, names)
    waits = [asyncio.ensure_future(wait_for_claim(inbox / n)) for n in names]
    renamed_at = await _rename_all(staging, inbox, names, gap_s)
    await asyncio.wait(waits, timeout=timeout_s)
    samples: list[float] = []
    missed = 0
    for task, t_rename in zip(waits, renamed_at, strict=True):
        if task.done() and not task.cancelled() and task.exception() is None:
            samples.append((task.result() - t_rename) * 1000)
        else:
            task.cancel()
            missed += 1
    return Latencies(samples_ms=tuple(samples), missed=missed)


async def measure_burst(
    staging: Path,
    inbox: Path,
    wait_for_claim: WaitForClaim,
    *,
    count: int = 1000,
    prefix: str = "burst",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Latencies:
    """`count` files renamed into `inbox` back to back."""
    names = [f"{prefix}-{i:05d}.csv" for i in range(count)]
    return await _measure(staging, inbox, wait_for_claim, names, gap_s=0.0, timeout_s=timeout_s)


async def measure_trickle(
    staging: Path,
    inbox: Path,
    wait_for_claim: WaitForClaim,
    *,
    count: int = 200,
    rate_per_s: float = 50.0,
    prefix: str = "trickle",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> Latencies:
    """`count` files renamed into `inbox` at a steady `rate_per_s`."""
    names = [f"{prefix}-{i:05d}.csv" for i in range(count)]
    return await _measure(
        staging, inbox, wait_for_claim, names, gap_s=1.0 / rate_per_s, timeout_s=timeout_s
    )


def report(burst: Latencies, trickle: Latencies, **extra: object) -> dict[str, object]:
    def ms(v: float) -> float | None:
        return None if math.isnan(v) else round(v, 2)

    return {
        "bench": "intake",
        "burst_p50_ms": ms(percentile(burst.samples_ms, 50)),
        "burst_p99_ms": ms(percentile(burst.samples_ms, 99)),
        "trickle_p50_ms": ms(percentile(trickle.samples_ms, 50)),
        "trickle_p99_ms": ms(percentile(trickle.samples_ms, 99)),
        "missed": burst.missed + trickle.missed,
        **extra,
    }


class WatcherClaims:
    """The watcher alone as the claimer: a path counts as claimed when it is emitted."""

    def __init__(self, fw: watcher.FolderWatcher) -> None:
        self.fw = fw
        self.claimed_at: dict[Path, float] = {}
        self.duplicates = 0
        self.rejected = 0
        self._waiters: dict[Path, asyncio.Future[float]] = {}

    async def emit(self, item: watcher.Candidate | watcher.Rejected) -> None:
        if isinstance(item, watcher.Rejected):
            self.rejected += 1
            return
        now = time.monotonic()
        if item.path in self.claimed_at:
            self.duplicates += 1
            return
        self.claimed_at[item.path] = now
        self.fw.done(item)  # as the daemon does once the claim row is in
        waiter = self._waiters.pop(item.path, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)

    async def wait_for_claim(self, path: Path) -> float:
        if path in self.claimed_at:
            return self.claimed_at[path]
        waiter = self._waiters.setdefault(path, asyncio.get_running_loop().create_future())
        return await waiter


async def bench_watcher(
    root: Path, *, burst: int, trickle: int, rate_per_s: float, timeout_s: float
) -> dict[str, object]:
    inbox, staging = root / "inbox", root / "staging"
    watch = config.WatchConfig(
        name="bench", folder=inbox, service="bench", output_dir=root / "out",
        archive_dir=root / "archive", failed_dir=root / "failed", settle_s=0.0,
    )
    fw = watcher.FolderWatcher([watch])
    claims = WatcherClaims(fw)
    stop = asyncio.Event()
    task = asyncio.create_task(fw.run(claims.emit, stop))
    try:
        await asyncio.wait_for(fw.started.wait(), timeout_s)
        b = await measure_burst(staging, inbox, claims.wait_for_claim, count=burst,
                                timeout_s=timeout_s)
        t = await measure_trickle(staging, inbox, claims.wait_for_claim, count=trickle,
                                  rate_per_s=rate_per_s, timeout_s=timeout_s)
        await asyncio.sleep(0.2)  # late duplicates would show up here
    finally:
        stop.set()
        await task
    return report(b, t, duplicates=claims.duplicates)


class DaemonClaims:
    """Claims of a daemon process, read from its JSON log: `input_claimed` lines carry the path
    and a UTC wall-clock timestamp, turned into this process's monotonic clock."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.claimed_at: dict[Path, float] = {}
        self.duplicates = 0
        self._waiters: dict[Path, asyncio.Future[float]] = {}
        self._offset = time.time() - time.monotonic()

    async def tail(self, stop: asyncio.Event) -> None:
        import datetime as dt

        pos = 0
        buf = b""
        while not stop.is_set():
            with open(self.log, "rb") as f:  # noqa: ASYNC230 - a small tail read
                f.seek(pos)
                data = f.read()
            pos += len(data)
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if b"input_claimed" not in line:
                    continue
                rec = json.loads(line)
                if rec.get("event") != "input_claimed":
                    continue
                wall = dt.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
                t = wall.timestamp() - self._offset
                path = Path(rec["path"])
                if path in self.claimed_at:
                    self.duplicates += 1
                    continue
                self.claimed_at[path] = t
                waiter = self._waiters.pop(path, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(t)
            await asyncio.sleep(0.005)

    async def wait_for_claim(self, path: Path) -> float:
        if path in self.claimed_at:
            return self.claimed_at[path]
        waiter = self._waiters.setdefault(path, asyncio.get_running_loop().create_future())
        return await waiter


async def _daemon_phases(
    root: Path, log: Path, *, burst: int, trickle: int, rate_per_s: float, timeout_s: float
) -> dict[str, object]:
    claims = DaemonClaims(log)
    stop = asyncio.Event()
    task = asyncio.create_task(claims.tail(stop))
    try:
        inbox, staging = root / "inbox", root / "staging"
        b = await measure_burst(staging, inbox, claims.wait_for_claim, count=burst,
                                timeout_s=timeout_s)
        t = await measure_trickle(staging, inbox, claims.wait_for_claim, count=trickle,
                                  rate_per_s=rate_per_s, timeout_s=timeout_s)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await task
    return report(b, t, duplicates=claims.duplicates, mode="daemon")


def bench_daemon(
    root: Path, *, burst: int, trickle: int, rate_per_s: float, timeout_s: float,
    profile: Path | None = None,
) -> dict[str, object]:
    """The whole daemon (`run`) with settle_s 0, against Azurite and a zero-time emulator.
    `profile`: py-spy samples the daemon over both phases (GIL holders only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

    with common.azurite() as az, common.emulator("--seed", "1") as emu:
        setup = common.make_setup(
            root / "daemon", emu=emu, az=az,
            service={"max_in_flight": 2000,
                     "poll": {"initial_s": 0.25, "multiplier": 1.5, "max_s": 2.0,
                              "jitter": 0.1}},
        )
        setup.inbox.mkdir(parents=True, exist_ok=True)
        proc = common.start_daemon(setup)
        log = setup.root / "daemon.log"
        try:
            setup.drop("warmup.csv", _CONTENT)  # intake is up once this one is claimed
            deadline = time.monotonic() + 60
            while b"input_claimed" not in log.read_bytes():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the daemon did not claim a file: {log.read_text()}")
                time.sleep(0.05)
            time.sleep(1.0)
            spy = (common.start_py_spy(proc.pid, profile, extra=["--gil"])
                   if profile is not None else None)
            try:
                return asyncio.run(_daemon_phases(setup.root, log, burst=burst,
                                                  trickle=trickle, rate_per_s=rate_per_s,
                                                  timeout_s=timeout_s))
            finally:
                if spy is not None:
                    common.stop_py_spy(spy)
        finally:
            common.stop_daemon(proc)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=1000, help="files renamed in at once")
    ap.add_argument("--trickle", type=int, default=200, help="files renamed in one by one")
    ap.add_argument("--rate", type=float, default=50.0, help="trickle rate, files per second")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="per phase, s")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--daemon", action="store_true",
                    help="measure the whole daemon process, not the watcher alone")
    ap.add_argument("--profile", type=Path, default=None,
                    help="with --daemon: py-spy output (.txt: collapsed) of the phases")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-intake-", dir=args.dir) as root:
        if args.daemon:
            print(json.dumps(bench_daemon(Path(root), burst=args.burst, trickle=args.trickle,
                                          rate_per_s=args.rate, timeout_s=args.timeout,
                                          profile=args.profile)))
            return
        result = asyncio.run(bench_watcher(Path(root), burst=args.burst, trickle=args.trickle,
                                           rate_per_s=args.rate, timeout_s=args.timeout))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
