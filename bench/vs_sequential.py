"""The daemon against the seed's way: one file at a time, poll every second.

    .venv/bin/python bench/vs_sequential.py [--files 50] [--run-time 1,2] [--max-running 20]

Both clients push the same files through one emulator (`--run-time-s 1,2 --max-running 20`).
The sequential client follows the BES protocol as the seed script did: upload with the
blob SDK, submit, start, poll every 1 s, download from the SAS URL in `Results` with
aiohttp — one file after another. The daemon runs `run --once` with max_in_flight 20 and
a poll policy for short jobs.
Prints one JSON line with both wall times and the ratio (target: daemon ≥ 20× faster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp
import common
from azure.storage.blob import aio as azblob_aio

CONTAINER = "seq"


async def sequential(files: list[Path], *, base: str, conn: str, out: Path) -> float:
    jobs = f"{base}/workspaces/ws1/services/hashing/jobs"
    params = {"api-version": "2.0"}
    headers = {"Authorization": f"Bearer {common.API_KEY}"}
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before the clock starts
    async with aiohttp.ClientSession(headers=headers) as http, \
            azblob_aio.BlobServiceClient.from_connection_string(conn) as blobs:
        container = blobs.get_container_client(CONTAINER)
        try:
            await container.create_container()
        except Exception:  # exists
            pass
        began = time.perf_counter()
        for i, path in enumerate(files):
            name = f"in/{i}.csv"
            await container.get_blob_client(name).upload_blob(path.read_bytes(), overwrite=True)
            body = {"Inputs": {"input1": {"ConnectionString": conn,
                                          "RelativeLocation": f"/{CONTAINER}/{name}"}},
                    "Outputs": {"output1": {"ConnectionString": conn,
                                            "RelativeLocation": f"/{CONTAINER}/out/{i}.csv"}},
                    "GlobalParameters": {}}
            async with http.post(jobs, params=params, json=body) as r:
                r.raise_for_status()
                job_id = await r.json()
            async with http.post(f"{jobs}/{job_id}/start", params=params) as r:
                r.raise_for_status()
            while True:
                await asyncio.sleep(1.0)
                async with http.get(f"{jobs}/{job_id}", params=params) as r:
                    r.raise_for_status()
                    status = await r.json()
                if status["StatusCode"] in ("Finished", 4):
                    break
                if status["StatusCode"] in ("Failed", "Cancelled", 2, 3):
                    raise RuntimeError(f"job {job_id} ended {status['StatusCode']}")
            ref = status["Results"]["output1"]
            url = ref["BaseLocation"] + ref["RelativeLocation"] + ref["SasBlobToken"]
            async with http.get(url) as r:
                r.raise_for_status()
                (out / f"{path.stem}.output1.csv").write_bytes(await r.read())
        return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--run-time", default="1,2", help="emulator run time MIN,MAX seconds")
    ap.add_argument("--max-running", type=int, default=20, help="emulator running limit")
    ap.add_argument("--max-in-flight", type=int, default=20, help="daemon's limit")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy SVG of the daemon")
    args = ap.parse_args()
    content = b"Col1,Col2\n1,This is a good day\n2,\"Hello, world\"\n"
    with tempfile.TemporaryDirectory(prefix="bench-vs-seq-") as tmp, common.azurite() as az, \
            common.emulator("--run-time-s", args.run_time, "--max-running",
                            str(args.max_running), "--seed", "1") as emu:
        root = Path(tmp)
        src = common.stage_inputs(root / "seq-inputs", args.files, content)
        seq_s = asyncio.run(sequential(src, base=emu.url, conn=az.connection_string,
                                       out=root / "seq-results"))
        seq_polls = emu.stats()["polls"]
        setup = common.make_setup(
            root / "daemon", emu=emu, az=az,
            service={"max_in_flight": args.max_in_flight,
                     # A 1-2 s job: first look at once, then 0.3 s ×1.2 capped at 0.5 s.
                     "poll": {"initial_s": 0.3, "multiplier": 1.2, "max_s": 0.5,
                              "jitter": 0.1}},
        )
        common.stage_inputs(setup.inbox, args.files, content)
        res = common.run_once(setup, timeout_s=600, profile_svg=args.profile)
        stats = emu.stats()
        done = common.count_files(setup.results, "*.csv")
        tl = res.timeline(setup.root / "daemon.log")
    if res.rc != 0 or done != args.files:
        raise SystemExit(f"daemon run failed (rc {res.rc}, {done} results):\n{res.output}")
    print(json.dumps({
        "bench": "vs_sequential", "files": args.files, "run_time_s": args.run_time,
        "max_in_flight": args.max_in_flight,
        "sequential_s": round(seq_s, 2), "daemon_s": round(res.wall_s, 2),
        "ratio": round(seq_s / res.wall_s, 1), "target_ratio": 20,
        "daemon_cpu_s": round(res.cpu_s, 2), "daemon_max_rss_mb": round(res.max_rss_mb, 1),
        "sequential_polls": seq_polls, "daemon_polls": stats["polls"] - seq_polls,
        "max_running_seen": stats["max_running_seen"],
        "daemon_timeline_s": {k: tl.get(k) for k in (
            "first_input_claimed", "first_job_started", "last_job_started",
            "last_job_done", "last_worker_stopping")},
    }), flush=True)


if __name__ == "__main__":
    main()
