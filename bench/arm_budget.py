"""10,000 batch-endpoint jobs in flight: the ARM reads/s the daemon sends, the emulator's 429 count,
the daemon's CPU and RSS.

    .venv/bin/python bench/arm_budget.py [--jobs 10000] [--run-time-s 3600] [--arm-reads 250/25]
                                         [--settle 60] [--window 60] [--arm-reads-per-s 20]

The emulator serves the batch-endpoint planes (managed-identity tokens through azure-identity,
invoke, ARM) with Azurite as the datastore; every job runs `--run-time-s` (an hour by default),
so all of them stay in flight. The daemon (`run`, one `kind = "batch_endpoint"` service, default
poll policy 5 s ×1.1 capped at 30 s, default read budget 20 ARM reads/s per subscription) takes
every file from its inbox: uploads it, invokes the endpoint, then polls each job through ARM.
At a 30 s cap 10,000 jobs would want 333 reads/s; the budget holds the daemon to 20, which is
what `status` reports as a 500 s effective interval.

The ramp (inbox to the last invoke) is timed on its own. `--settle` seconds after the last
invoke, one `--window` is measured: ARM reads the emulator saw (its counters: total, per second
over the last 10 s sampled every 2 s, the busiest single second), the emulator's `arm_throttled`
(ARM answered 429: target 0, over the whole run), the daemon's CPU share (psutil: CPU s / wall
s) and RSS. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common

from orchestrator import azurite as azurite_mod
from orchestrator.emulator import process
from tests import harness

CONTENT = b"Col1,Col2\n1,This is a good day\n"
WORKSPACE = ("/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/rg1/providers/"
             "Microsoft.MachineLearningServices/workspaces/ws1")
CONTAINER = "bes-bench"


@contextlib.contextmanager
def batch_emulator(az: azurite_mod.Azurite, identity_header: str,
                   *args: str) -> Iterator[common.Emulator]:
    env = {process.BE_STORAGE_ENV: az.connection_string,
           process.IDENTITY_HEADER_ENV: identity_header, process.API_KEY_ENV: common.API_KEY}
    with process.spawn("--be-container", CONTAINER, *args, env=env) as (url, proc):
        yield common.Emulator(url=url, proc=proc, args=list(args))


def make_setup(root: Path, emu: common.Emulator, az: azurite_mod.Azurite, identity_header: str,
               *, jobs: int, arm_reads_per_s: float | None) -> common.Setup:
    root.mkdir(parents=True, exist_ok=True)
    svc: dict[str, Any] = {
        "kind": "batch_endpoint", "scoring_uri": f"{emu.url}/endpoints/hashing/jobs",
        "workspace_id": WORKSPACE, "arm_url": emu.url, "datastore": "workspaceblobstore",
        "input_name": "input_data", "output_name": "output1", "max_in_flight": jobs + 100,
        "credential": {"type": "managed_identity"},
    }
    if arm_reads_per_s is not None:
        svc["arm_reads_per_s"] = arm_reads_per_s
    db_url = f"sqlite+aiosqlite:///{root / 'state.db'}"
    text = (harness.table("daemon", {"state_dir": "state", "max_jobs_held": jobs + 1000,
                                     "lease_s": 60.0, "heartbeat_s": 10.0, "rescan_s": 30.0})
            + harness.table("database", {"url": db_url})
            + harness.table("storage", {"connection_string_env": harness.STORAGE_ENV,
                                        "container": CONTAINER})
            + harness.table("http", {"listen": ""}) + harness.table("services.be", svc)
            + harness.table("[watch]", {"folder": "inbox", "service": "be", "settle_s": 0.0,
                                        "create": True}))
    cfg = root / "config.toml"
    cfg.write_text(text)
    env = {**os.environ, harness.STORAGE_ENV: az.connection_string,
           "IDENTITY_ENDPOINT": f"{emu.url}/msi/token", "IDENTITY_HEADER": identity_header,
           "PYTHONPATH": str(harness.ROOT)}
    setup = common.Setup(root=root, config=cfg, env=env, db_url=db_url)
    setup.cli("migrate")
    return setup


def batch(emu: common.Emulator) -> dict[str, Any]:
    stats = emu.stats()["batch"]
    assert isinstance(stats, dict)
    return stats


class Trace:
    """ARM reads (and 429s) between consecutive ~2 s samples of the emulator's counters."""

    def __init__(self, emu: common.Emulator) -> None:
        self.emu = emu
        self.last: tuple[float, int, int] | None = None
        self.rates: list[tuple[float, float, int]] = []  # (t, reads/s, 429s)

    def sample(self, t: float) -> dict[str, Any]:
        b = batch(self.emu)
        reads, throttled = int(b["arm_reads"]), int(b["arm_throttled"])
        if self.last is not None and t > self.last[0]:
            self.rates.append((round(t, 1), round((reads - self.last[1]) / (t - self.last[0]), 1),
                               throttled - self.last[2]))
        self.last = (t, reads, throttled)
        return b

    def busiest(self, n: int) -> list[tuple[float, float, int]]:
        """[seconds since start, reads/s over that ~2 s, 429s in it] of the n busiest."""
        return sorted(self.rates, key=lambda r: -r[1])[:n]


def status_rows(setup: common.Setup) -> list[dict[str, Any]]:
    """What `status --json` says about the service's effective poll interval."""
    proc = subprocess.run([*harness.cli_cmd(), "status", "--json", "-c", str(setup.config)],
                          env=setup.env, capture_output=True, text=True, timeout=120,
                          cwd=setup.root, check=False)
    if proc.returncode != 0:
        return [{"error": proc.stderr.strip()[-300:]}]
    rows = json.loads(proc.stdout).get("batch_endpoint_polling", [])
    assert isinstance(rows, list)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--run-time-s", default="3600", help="the emulator's job run time")
    ap.add_argument("--arm-reads", default="250/25", help="the emulator's ARM read bucket")
    ap.add_argument("--arm-reads-per-s", type=float, default=None,
                    help="the service's arm_reads_per_s (default: the config default, 20)")
    ap.add_argument("--settle", type=float, default=60.0,
                    help="seconds after the last invoke before the window")
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--ramp-limit-s", type=float, default=1800.0)
    ap.add_argument("--profile", type=Path, default=None,
                    help="py-spy output of the window (.txt: collapsed stacks)")
    args = ap.parse_args()
    identity_header = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="bench-arm-") as tmp, common.azurite() as az, \
            batch_emulator(az, identity_header, "--run-time-s", args.run_time_s,
                           "--arm-reads", args.arm_reads, "--seed", "1") as emu:
        root = Path(tmp)
        setup = make_setup(root / "daemon", emu, az, identity_header, jobs=args.jobs,
                           arm_reads_per_s=args.arm_reads_per_s)
        common.stage_inputs(setup.inbox, args.jobs, CONTENT)
        load0 = os.getloadavg()
        proc = common.start_daemon(setup)
        try:
            began = time.perf_counter()
            sampler = common.Sampler(proc.pid)
            ramp_reads_peak = 0.0
            #: [seconds since start, invokes, ARM reads, ARM 429s] every ~30 s of the ramp
            timeline: list[list[float]] = []
            next_mark = began
            trace = Trace(emu)
            while (invokes := int(batch(emu)["invokes"])) < args.jobs:
                if proc.poll() is not None:
                    raise SystemExit(f"daemon exited {proc.returncode} after {invokes} invokes:"
                                     f" {(setup.root / 'daemon.log').read_text()[-2000:]}")
                if time.perf_counter() - began > args.ramp_limit_s:
                    raise SystemExit(f"ramp too slow: {invokes} invoked")
                sampler.sample_rss()
                now_b = trace.sample(time.perf_counter() - began)
                ramp_reads_peak = max(ramp_reads_peak, float(now_b["arm_reads_per_s_last_10s"]))
                if time.perf_counter() >= next_mark:
                    timeline.append([round(time.perf_counter() - began, 1), now_b["invokes"],
                                     now_b["arm_reads"], now_b["arm_throttled"]])
                    next_mark += 30.0
                time.sleep(2.0)
            ramp_s = time.perf_counter() - began
            ramp_cpu = sampler.cpu_share()
            settle_end = time.perf_counter() + args.settle
            while time.perf_counter() < settle_end:
                sampler.sample_rss()
                trace.sample(time.perf_counter() - began)
                time.sleep(2.0)
            window = common.Sampler(proc.pid)
            b0 = batch(emu)
            t0 = time.perf_counter()
            last10: list[float] = []
            polling: list[dict[str, Any]] = []
            spy = (common.start_py_spy(proc.pid, args.profile)
                   if args.profile is not None else None)
            end = t0 + args.window
            while time.perf_counter() < end:
                window.sample_rss()
                last10.append(float(trace.sample(time.perf_counter() - began)
                                    ["arm_reads_per_s_last_10s"]))
                if not polling and time.perf_counter() > t0 + args.window / 2:
                    polling = status_rows(setup)
                time.sleep(2.0)
            cpu = window.cpu_share()
            if spy is not None:
                common.stop_py_spy(spy)
            b1 = batch(emu)
            window_s = time.perf_counter() - t0
            load1 = os.getloadavg()
        finally:
            common.stop_daemon(proc)
    reads = int(b1["arm_reads"]) - int(b0["arm_reads"])
    print(json.dumps({
        "bench": "arm_budget", "jobs": args.jobs, "emulator_run_time_s": args.run_time_s,
        "emulator_arm_read_bucket": args.arm_reads,
        "ramp_s": round(ramp_s, 1), "ramp_jobs_per_s": round(args.jobs / ramp_s, 1),
        "ramp_cpu_share": round(ramp_cpu, 3),
        "ramp_arm_reads_per_s_last_10s_max": ramp_reads_peak,
        "ramp_timeline_s_invokes_reads_429s": timeline,
        "window_s": round(window_s, 1),
        "arm_reads_per_s": round(reads / window_s, 2),
        "arm_reads_per_s_last_10s_max": max(last10, default=0.0),
        "arm_reads_per_s_last_10s_min": min(last10, default=0.0),
        "arm_reads_peak_one_second": b1["arm_reads_peak_per_s"],
        "arm_throttled_window": int(b1["arm_throttled"]) - int(b0["arm_throttled"]),
        "arm_throttled_total": b1["arm_throttled"], "target_arm_throttled": 0,
        "arm_reads_total": b1["arm_reads"], "invokes": b1["invokes"],
        "busiest_2s_reads_per_s_at": trace.busiest(3),
        "list_pages": b1["list_pages"], "dropped": b1["dropped"], "http_503": b1["http_503"],
        "submissions_invoked_twice": b1["submissions_invoked_twice"],
        "emulator_jobs_by_state": {k: v for k, v in b1["jobs_by_state"].items() if v},
        "status_batch_endpoint_polling": polling,
        "cpu_share": round(cpu, 4),
        "max_rss_mb": round(max(window.max_rss_mb, sampler.max_rss_mb), 1),
        "steady_rss_mb": round(window.max_rss_mb, 1),
        "box_loadavg_1m_before_after": [round(load0[0], 2), round(load1[0], 2)],
        "box_cpus": os.cpu_count(),
    }), flush=True)


if __name__ == "__main__":
    main()
