"""Many jobs in flight: the daemon's CPU share, RSS and poll lateness at steady state.

    .venv/bin/python bench/inflight.py [--jobs 10000] [--ramp 60] [--window 60]
                                       [--profile /tmp/inflight.txt]

The emulator keeps every started job NotStarted (`--queue-delay-s 1e6`, no running limit). The
daemon (`run`, max_in_flight = jobs, default poll policy 2 s ×1.6 capped at 30 s) takes every
file from its inbox, uploads, submits and starts it. Intake is timed on its own; then, after
`--ramp` seconds (every job's delay has reached the 30 s cap by then), one `--window` is
measured: CPU share (psutil, CPU s / wall s), peak RSS (sampled each second), status calls.

Poll lateness, from the daemon itself: every 10 s it logs `schedule_lag`, how late executors
picked up jobs that were due (timer delay + queueing for a free executor), as p99 and max.
(A "still waiting" poll writes nothing to the database any more, so the rows can't tell.)
Targets: ≤ 10 % of one core, ≤ 250 MB RSS, largest lateness ≤ 2 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common

CONTENT = b"Col1,Col2\n1,This is a good day\n"


class Lateness:
    """Reads the daemon's `schedule_lag` log lines (every 10 s: how late executors picked up
    due polls, as p99 and max over those 10 s) from its JSON log as they are written."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.offset = 0
        self.p99: list[float] = []
        self.max: list[float] = []
        self.polls = 0

    def sample(self) -> None:
        if not self.log.exists():
            return
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            if b'"schedule_lag"' not in line:
                continue
            rec = json.loads(line)
            self.p99.append(float(rec["p99_s"]))
            self.max.append(float(rec["max_s"]))
            self.polls += int(rec["n"])

    def take(self) -> tuple[list[float], list[float], int]:
        out = (self.p99, self.max, self.polls)
        self.p99, self.max, self.polls = [], [], 0
        return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q / 100 * len(s)))], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--ramp", type=float, default=60.0)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--profile", type=Path, default=None, help="py-spy output of the window")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-inflight-") as tmp, common.azurite() as az, \
            common.emulator("--queue-delay-s", "1000000", "--seed", "1") as emu:
        root = Path(tmp)
        setup = common.make_setup(
            root / "daemon", emu=emu, az=az,
            service={"max_in_flight": args.jobs + 100,
                     "poll": {"initial_s": 2.0, "multiplier": 1.6, "max_s": 30.0,
                              "jitter": 0.1}},
            daemon={"max_jobs_held": args.jobs + 1000, "lease_s": 60.0, "heartbeat_s": 10.0},
        )
        common.stage_inputs(setup.inbox, args.jobs, CONTENT)
        proc = common.start_daemon(setup)
        try:
            began = time.perf_counter()
            sampler = common.Sampler(proc.pid)
            late: Lateness | None = None
            while emu.stats()["starts"] < args.jobs:
                if proc.poll() is not None:
                    raise SystemExit(f"daemon exited {proc.returncode}")
                if late is None:
                    late = Lateness(setup.root / "daemon.log")
                if late is not None:
                    late.sample()
                sampler.sample_rss()
                time.sleep(2.0)
                if time.perf_counter() - began > 900:
                    raise SystemExit(f"intake too slow: {emu.stats()['starts']} started")
            intake_s = time.perf_counter() - began
            intake_cpu = sampler.cpu_share()
            assert late is not None
            ramp_end = time.perf_counter() + args.ramp
            while time.perf_counter() < ramp_end:
                late.sample()
                sampler.sample_rss()
                time.sleep(2.0)
            ramp_late = late.take()
            window = common.Sampler(proc.pid)
            polls0 = emu.stats()["polls"]
            spy = (common.start_py_spy(proc.pid, args.profile)
                   if args.profile is not None else None)
            end = time.perf_counter() + args.window
            while time.perf_counter() < end:
                late.sample()
                window.sample_rss()
                time.sleep(2.0)
            cpu = window.cpu_share()
            polls = emu.stats()["polls"] - polls0
            if spy is not None:
                common.stop_py_spy(spy)
            steady_late = late.take()
            stats = emu.stats()
        finally:
            common.stop_daemon(proc)
    print(json.dumps({
        "bench": "inflight", "jobs": args.jobs, "intake_s": round(intake_s, 1),
        "intake_jobs_per_s": round(args.jobs / intake_s, 1),
        "intake_cpu_share": round(intake_cpu, 3),
        "cpu_share": round(cpu, 4), "target_cpu_share": 0.10,
        "max_rss_mb": round(max(window.max_rss_mb, sampler.max_rss_mb), 1),
        "steady_rss_mb": round(window.max_rss_mb, 1), "target_rss_mb": 250,
        "polls_per_s": round(polls / args.window, 1),
        "cpu_ms_per_poll": round(cpu * 1000 / max(polls / args.window, 1e-9), 3),
        "lateness_max_s": _pct(steady_late[1], 100), "lateness_p99_s": _pct(steady_late[0], 100),
        "lateness_samples": steady_late[2], "target_lateness_s": 2.0,
        "ramp_lateness_max_s": _pct(ramp_late[1], 100),
        "emulator_jobs_by_state": stats["jobs_by_state"],
    }), flush=True)


if __name__ == "__main__":
    main()
