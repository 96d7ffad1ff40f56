"""Shared helpers for the daemon benchmarks: Azurite, the emulator, a generated config, and the
daemon CLI as a subprocess with its wall time, CPU time and peak RSS.

The daemon is measured as its own process (`python -m orchestrator run ...`), as users run it:
CPU and peak RSS come from `os.wait4` on that child (exact kernel accounting, not sampling);
for a daemon that keeps running, `Sampler` reads psutil over a window.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator import azurite as azurite_mod  # noqa: E402
from tests import harness  # noqa: E402

API_KEY = harness.API_KEY
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"

Setup = harness.Setup
Emulator = harness.Emulator
emulator = harness.emulator


@contextlib.contextmanager
def azurite() -> Iterator[azurite_mod.Azurite]:
    with azurite_mod.running() as az:
        yield az


def make_setup(
    root: Path,
    *,
    emu: Emulator,
    az: azurite_mod.Azurite,
    service: Mapping[str, Any] | None = None,
    watch: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
    storage: Mapping[str, Any] | None = None,
) -> Setup:
    """A config in `root` for one service "svc" on the emulator and one watched inbox."""
    setup = harness.make_setup(
        root, emulator_url=emu.url, storage_connection_string=az.connection_string,
        service=service, watch={"settle_s": 0.0, **(watch or {})},
        daemon={"rescan_s": 30.0, **(daemon or {})}, storage=storage,
    )
    as_installed(setup.env)
    setup.cli("migrate")
    return setup


#: Where the measured processes keep their bytecode (outside the checkout).
BYTECODE_CACHE = Path(tempfile.gettempdir()) / "bes-orchestrator-bench-pycache"


def as_installed(env: dict[str, str]) -> dict[str, str]:
    """Bytecode cached, as a wheel's install compiles it: this checkout's environment sets
    PYTHONDONTWRITEBYTECODE=1, which would make each daemon compile every module it imports
    (~0.3 s of CPU at every start, counted in every per-job figure)."""
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(BYTECODE_CACHE)
    return env


def stage_inputs(inbox: Path, count: int, content: bytes, *, prefix: str = "f") -> list[Path]:
    """Write `count` files into `inbox` (write then rename, as writers are told to)."""
    inbox.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        tmp = inbox / f".{prefix}-{i:06d}.tmp"
        tmp.write_bytes(content)
        final = inbox / f"{prefix}-{i:06d}.csv"
        tmp.rename(final)
        out.append(final)
    return out


def make_csv(size: int, *, seed_line: str = "This is a good day") -> bytes:
    """A valid one-column CSV (header Col2) of about `size` bytes."""
    header = b"Col2\n"
    line = f"{seed_line}\n".encode()
    n = max(1, (size - len(header)) // len(line))
    return header + line * n


@dataclass(frozen=True, kw_only=True)
class RunResult:
    rc: int
    wall_s: float
    cpu_s: float  #: user + system of the daemon process (its children are not counted)
    max_rss_mb: float
    output: str
    began_wall: float  #: time.time() when the process was launched

    def timeline(self, log: Path) -> dict[str, float]:
        """Seconds from launch to the first and last log line of each event."""
        import datetime as dt
        import json

        first: dict[str, float] = {}
        last: dict[str, float] = {}
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError):
                rec = json.loads(line)
                ts = dt.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
                t = round(ts.timestamp() - self.began_wall, 3)
                first.setdefault(rec["event"], t)
                last[rec["event"]] = t
        return {**{f"first_{k}": v for k, v in first.items()},
                **{f"last_{k}": v for k, v in last.items()}}


def daemon_cmd(setup: Setup, *args: str, log_level: str = "info") -> list[str]:
    return [*harness.cli_cmd(), "--log-json", "--log-level", log_level, "run",
            "-c", str(setup.config), *args]


def run_once(setup: Setup, *, timeout_s: float = 600.0, log_level: str = "info",
             profile_svg: Path | None = None, profile_gil: bool = False) -> RunResult:
    """`run --once` as a child; wall time, CPU and peak RSS from wait4 (the kernel's own count).

    With `profile_svg`, py-spy samples the daemon while it runs (adds a few % CPU to the box,
    none to the daemon's own count). `profile_gil`: only samples holding the GIL, i.e. the
    daemon's Python CPU time, not its threads waiting on fsync or sockets."""
    log_path = setup.root / "daemon.log"
    with open(log_path, "ab") as log:
        began_wall = time.time()
        began = time.perf_counter()
        proc = subprocess.Popen(daemon_cmd(setup, "--once", log_level=log_level),
                                env=setup.env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=setup.root, start_new_session=True)
    spy = None
    if profile_svg is not None:
        spy = start_py_spy(proc.pid, profile_svg, extra=["--gil"] if profile_gil else [])
    deadline = began + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.01)
    wall = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait() again
    if spy is not None:
        stop_py_spy(spy)
    return RunResult(rc=proc.returncode, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
                     max_rss_mb=usage.ru_maxrss / 1024, output=log_path.read_text()[-4000:],
                     began_wall=began_wall)


def start_daemon(setup: Setup, *, log_level: str = "info") -> subprocess.Popen[bytes]:
    with open(setup.root / "daemon.log", "ab") as log:
        return subprocess.Popen(daemon_cmd(setup, log_level=log_level), env=setup.env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=setup.root,
                                start_new_session=True)


def stop_daemon(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    return harness.stop(proc, timeout=timeout_s)


class Sampler:
    """CPU share and RSS of a running process over a window (psutil)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self._t0 = time.perf_counter()
        c = self.proc.cpu_times()
        self._c0 = c.user + c.system
        self.max_rss_mb = 0.0

    def sample_rss(self) -> float:
        rss = float(self.proc.memory_info().rss) / 2**20
        self.max_rss_mb = max(self.max_rss_mb, rss)
        return rss

    def cpu_share(self) -> float:
        """CPU seconds per wall second since construction (1.0 = one full core)."""
        c = self.proc.cpu_times()
        used: float = c.user + c.system - self._c0
        return used / (time.perf_counter() - self._t0)


def start_py_spy(pid: int, svg: Path, *, extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Sample `pid` with py-spy; a `.txt` output is collapsed stacks (`--format raw`, for
    `summarize_profile`), anything else a flame graph SVG."""
    svg.parent.mkdir(parents=True, exist_ok=True)
    fmt = ["--format", "raw"] if svg.suffix == ".txt" else []
    return subprocess.Popen(
        [str(PY_SPY), "record", "--pid", str(pid), "-o", str(svg), "--rate", "50",
         "--nonblocking", *fmt, *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_py_spy(spy: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """py-spy writes its output when its target exits or on SIGINT."""
    if spy.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(spy.pid, signal.SIGINT)
    try:
        spy.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def py_spy_available() -> bool:
    return PY_SPY.exists() or shutil.which("py-spy") is not None


def count_files(folder: Path, pattern: str = "*") -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.exists() else 0


def summarize_profile(collapsed: Path, top: int = 25) -> list[tuple[str, float]]:
    """Inclusive share of samples per function (file:function) from py-spy's raw output."""
    totals: dict[str, int] = {}
    all_samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        all_samples += count
        seen = set()
        for frame in stack.split(";"):
            func, _, where = frame.partition(" (")
            name = func + " " + where.split(":")[0].rsplit("/", 1)[-1]
            if name not in seen:
                seen.add(name)
                totals[name] = totals.get(name, 0) + count
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [(k, round(100 * v / max(all_samples, 1), 1)) for k, v in ranked]
