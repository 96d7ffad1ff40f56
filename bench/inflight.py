"""Many jobs in flight: the daemon's CPU share, RSS and poll lateness at steady state.

    .venv/bin/python bench/inflight.py [--jobs 10000] [--ramp 60] [--window 60]
                                       [--profile /tmp/inflight.txt]

The emulator keeps every started job NotStarted (`--queue-delay-s 1e6`, no running limit). The
daemon (`run`, max_in_flight = jobs, default poll policy 2 s ×1.6 capped at 30 s) takes every
file from its inbox, uploads, submits and starts it. Intake is timed on its own; then, after
`--ramp` seconds (every job's delay has reached the 30 s cap by then), one `--window` is
measured: CPU share (psutil, CPU s / wall s), peak RSS (sampled each second), status calls.

Poll lateness, from the database: every "still waiting" poll writes `next_run_at` (its
schedule) and `updated_at` (when its answer was committed). The bench reads all STARTED rows
every 2 s; when a job's `poll_count` went up by one, lateness = new `updated_at` − previous
`next_run_at`: timer delay + queueing for an executor + the status call + the batch commit.
Targets: ≤ 10 % of one core, ≤ 250 MB RSS, largest lateness ≤ 2 s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3
import tempfile
import time
from pathlib import Path

import common

CONTENT = b"Col1,Col2\n1,This is a good day\n"


def _ts(value: str) -> float:
    t = dt.datetime.fromisoformat(value)
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


class Lateness:
    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
        self.prev: dict[str, tuple[int, float]] = {}
        self.samples: list[float] = []

    def sample(self) -> None:
        rows = self.conn.execute(
            "SELECT id, poll_count, next_run_at, updated_at FROM jobs WHERE state = 'started'"
        ).fetchall()
        for job_id, polls, next_run, updated in rows:
            before = self.prev.get(job_id)
            if before is not None and polls == before[0] + 1:
                self.samples.append(_ts(updated) - before[1])
            self.prev[job_id] = (polls, _ts(next_run))

    def take(self) -> list[float]:
        out, self.samples = self.samples, []
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
                if late is None and (setup.root / "state.db").exists():
                    late = Lateness(setup.root / "state.db")
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
        "lateness_max_s": _pct(steady_late, 100), "lateness_p99_s": _pct(steady_late, 99),
        "lateness_p50_s": _pct(steady_late, 50), "lateness_samples": len(steady_late),
        "target_lateness_s": 2.0,
        "ramp_lateness_max_s": _pct(ramp_late, 100), "ramp_lateness_p99_s": _pct(ramp_late, 99),
        "emulator_jobs_by_state": stats["jobs_by_state"],
    }), flush=True)


if __name__ == "__main__":
    main()
