"""Poll economy: status calls for one long job, and how late its end is seen.

    .venv/bin/python bench/polls.py [--run-time 120] [--compare initial,multiplier,cap]

Three runs at once, each against its own emulator (`--run-time-s T`), so each emulator's
`polls` counter belongs to one client:
- the seed's way: start, then poll every 1 s (the baseline);
- the daemon (`run --once`) with the default PollPolicy (5 s, ×1.1, cap 30 s, jitter 0.1);
- the daemon with another policy to compare (default: the old default 2 s, ×1.6, cap 30 s).
"Seen late" = time of the daemon's `job_remote_finished` log line − (its `job_started` line +
T). The started line is written after the start call returns, so lateness is overstated by a
few ms, never understated. Also prints each policy's jitter-free schedule for T.
Targets: ≤ 15 status calls and seen within 10 % of T (for T = 120 s).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import common

from orchestrator import config

CONTENT = b"Col1,Col2\n1,This is a good day\n"


def schedule(initial: float, mult: float, cap: float, run_time: float) -> dict[str, float]:
    """Jitter-free: polls until the first one at or after `run_time`, and how late that is."""
    t, n = 0.0, 0
    while t < run_time:
        t += min(cap, initial * mult ** n)
        n += 1
    return {"polls": n, "seen_late_s": round(t - run_time, 2),
            "late_pct": round(100 * (t - run_time) / run_time, 1)}


def _events(log: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("event") in ("job_started", "job_remote_finished"):
                ts = dt.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
                out[rec["event"]] = ts.timestamp()
    return out


def daemon_run(root: Path, az: Any, emu: common.Emulator, policy: dict[str, float],
               run_time: float) -> dict[str, Any]:
    setup = common.make_setup(root, emu=emu, az=az, service={"poll": policy})
    common.stage_inputs(setup.inbox, 1, CONTENT)
    res = common.run_once(setup, timeout_s=run_time * 3 + 120, log_level="debug")
    if res.rc != 0:
        raise SystemExit(f"daemon run failed (rc {res.rc}):\n{res.output}")
    ev = _events(setup.root / "daemon.log")
    late = ev["job_remote_finished"] - (ev["job_started"] + run_time)
    return {"polls": emu.stats()["polls"], "seen_late_s": round(late, 2),
            "late_pct": round(100 * late / run_time, 1),
            "expected": schedule(policy["initial_s"], policy["multiplier"], policy["max_s"],
                                 run_time)}


async def seed_client(emu: common.Emulator, conn: str) -> dict[str, Any]:
    """Submit + start one job (input uploaded by the daemon-less path), poll every second."""
    from azure.storage.blob import aio as azblob_aio

    jobs = f"{emu.url}/workspaces/ws1/services/hashing/jobs"
    params = {"api-version": "2.0"}
    async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {common.API_KEY}"}) as http, \
            azblob_aio.BlobServiceClient.from_connection_string(conn) as blobs:
        c = blobs.get_container_client("seed")
        await c.create_container()
        await c.upload_blob("in.csv", CONTENT)
        body = {"Inputs": {"input1": {"ConnectionString": conn,
                                      "RelativeLocation": "/seed/in.csv"}},
                "Outputs": {"output1": {"ConnectionString": conn,
                                        "RelativeLocation": "/seed/out.csv"}},
                "GlobalParameters": {}}
        async with http.post(jobs, params=params, json=body) as r:
            job_id = await r.json()
        async with http.post(f"{jobs}/{job_id}/start", params=params) as r:
            r.raise_for_status()
        started = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            async with http.get(f"{jobs}/{job_id}", params=params) as r:
                status = await r.json()
            if status["StatusCode"] == "Finished":
                return {"polls": emu.stats()["polls"], "seen_after_s": time.monotonic() - started}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-time", type=float, default=120.0)
    ap.add_argument("--compare", default="2,1.6,30",
                    help="another policy, initial_s,multiplier,max_s (default: the old default)")
    args = ap.parse_args()
    t = args.run_time
    i, m, c = (float(x) for x in args.compare.split(","))
    p = config.PollPolicy()  # the product's default
    default = {"initial_s": p.initial_s, "multiplier": p.multiplier, "max_s": p.max_s,
               "jitter": p.jitter}
    recommended = {"initial_s": i, "multiplier": m, "max_s": c, "jitter": 0.1}
    emu_args = ("--run-time-s", f"{t:g}", "--seed", "1")
    with tempfile.TemporaryDirectory(prefix="bench-polls-") as tmp, common.azurite() as az, \
            common.emulator(*emu_args) as e1, common.emulator(*emu_args) as e2, \
            common.emulator(*emu_args) as e3, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        root = Path(tmp)
        f_def = pool.submit(daemon_run, root / "default", az, e1, default, t)
        f_rec = pool.submit(daemon_run, root / "recommended", az, e2, recommended, t)
        seed = asyncio.run(seed_client(e3, az.connection_string))
        d, r = f_def.result(), f_rec.result()
    print(json.dumps({
        "bench": "polls", "run_time_s": t, "seed_polls": seed["polls"],
        "default_policy": {**default, **d}, "compared_policy": {**recommended, **r},
        "target_polls": 15, "target_late_pct": 10,
        "expected_120s": {"default": schedule(p.initial_s, p.multiplier, p.max_s, 120),
                          "compared": schedule(i, m, c, 120)},
    }), flush=True)


if __name__ == "__main__":
    main()
