"""CPU per BES status call in the client alone, against a bare aiohttp GET loop.

    .venv/bin/python bench/poll_client.py [--calls 20000] [--concurrency 64] [--jobs 10000]
    .venv/bin/python bench/poll_client.py --rate 333 --calls 6000

A child process serves `GET …/jobs/{id}` with a fixed NotStarted status object (aiohttp, keep-
alive). In this process, one event loop makes `--calls` calls at `--concurrency`, cycling over
`--jobs` distinct job ids, three ways: `bare` (session.get + read + json.loads: the floor),
`client` (`BesClient.status`: gate, URL, headers, timeout, metrics, parse) and `backend`
(`BesBackend.status`: + the neutral report). CPU is this process's `time.process_time()`;
the server's CPU is not counted. Prints one JSON line with µs of CPU per call for each.

`--rate R` issues the calls at R per second instead, each on its own timer, as a daemon holding
10,000 jobs polls them (333/s at a 30 s cap): the event loop then wakes for nearly every call
instead of finding 64 answers ready at each wake-up, and the floor it measures is the one the
daemon's CPU per poll can be held to (`inflight.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from orchestrator import config, jobs, lifecycle  # noqa: E402
from orchestrator.backends.bes import backend as bes_backend  # noqa: E402

SERVER = textwrap.dedent("""
    import json, sys
    from aiohttp import web
    BODY = json.dumps({"StatusCode": "NotStarted", "Results": None, "Details": None,
                       "CreatedAt": "2026-01-01T00:00:00Z", "StartTime": None,
                       "EndTime": None}).encode()
    async def status(request):
        return web.Response(body=BODY, content_type="application/json")
    app = web.Application()
    app.router.add_get("/workspaces/ws/services/svc/jobs/{id}", status)
    async def main():
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        print(port, flush=True)
        import asyncio
        await asyncio.Event().wait()
    import asyncio
    asyncio.run(main())
""")


NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def job(i: int) -> jobs.Job:
    return jobs.Job(
        id=f"{i:032x}", state=lifecycle.JobState.STARTED, service="svc", watch=None,
        claim_key="k", source_path="/in/x.csv", input_name="x.csv", input_path="/spool/x.csv",
        input_sha256=None, input_size=None, output_dir="/o", archive_dir="/a", failed_dir="/f",
        bes_job_id=f"{i:032x}", bes_status="NotStarted", result_refs={}, outputs={},
        error=None, error_code=None, attempts=1, runs=1, poll_count=3, resubmits=0,
        cancel_requested=False, lease_owner="me", lease_expires_at=None, next_run_at=NOW,
        deadline_at=None, created_at=NOW, updated_at=NOW, submitted_at=NOW, started_at=NOW,
        finished_at=None)


async def measure(n: int, concurrency: int, call: Any, ids: list[Any]) -> float:
    sem = asyncio.Semaphore(concurrency)
    count = 0

    async def one(i: int) -> None:
        nonlocal count
        async with sem:
            await call(ids[i % len(ids)])
            count += 1

    await asyncio.gather(*(one(i) for i in range(min(n, 2000))))  # warm-up
    cpu = time.process_time()
    await asyncio.gather(*(one(i) for i in range(n)))
    return (time.process_time() - cpu) / n * 1e6


async def measure_paced(n: int, rate: float, call: Any, ids: list[Any],
                        window_s: float = 0.0) -> float:
    """`window_s`: calls falling due within one window go out together at its start."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[Any]] = []
    cpu = time.process_time()
    began = loop.time()
    for i in range(n):
        due = i / rate
        if window_s:
            due -= due % window_s
        delay = began + due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(call(ids[i % len(ids)])))
    await asyncio.gather(*tasks)
    return (time.process_time() - cpu) / n * 1e6


async def run(args: argparse.Namespace, port: int) -> dict[str, float]:
    base = f"http://127.0.0.1:{port}"
    os.environ["BES_POLL_CLIENT_KEY"] = "k" * 40
    service = config.BesService.model_validate(
        {"name": "svc", "base_url": base, "workspace": "ws", "service": "svc",
         "api_key_env": "BES_POLL_CLIENT_KEY", "output_dir": "/o", "archive_dir": "/a",
         "failed_dir": "/f"}, context={"secrets": True, "base": ROOT})
    out: dict[str, float] = {}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        url = f"{base}/workspaces/ws/services/svc/jobs/"

        async def bare(job_id: str) -> Any:
            async with session.get(url + job_id, params={"api-version": "2.0"}) as r:
                return json.loads(await r.read())

        backend = bes_backend.BesBackend(service, session, blobs=None)  # type: ignore[arg-type]
        ids = [f"{i:032x}" for i in range(args.jobs)]
        held = [job(i) for i in range(args.jobs)]
        if args.rate:
            await measure(min(args.calls, 2000), args.concurrency, bare, ids)  # warm-up
            window = args.window_ms / 1000
            out["paced_bare_us"] = await measure_paced(args.calls, args.rate, bare, ids, window)
            out["paced_backend_us"] = await measure_paced(args.calls, args.rate, backend.status,
                                                          held, window)
            return {k: round(v, 1) for k, v in out.items()}
        for _ in range(args.rounds):
            out["bare_us"] = min(out.get("bare_us", 1e9),
                                 await measure(args.calls, args.concurrency, bare, ids))
            out["client_us"] = min(out.get("client_us", 1e9), await measure(
                args.calls, args.concurrency, backend.client.status, ids))
            out["backend_us"] = min(out.get("backend_us", 1e9), await measure(
                args.calls, args.concurrency, backend.status, held))
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3, help="best of this many")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="calls per second, each on its own timer (default: as fast as it goes)")
    ap.add_argument("--window-ms", type=float, default=0.0,
                    help="with --rate: the calls due within each window go out together")
    args = ap.parse_args()
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        result = asyncio.run(run(args, port))
    finally:
        server.terminate()
        server.wait()
    print(json.dumps({"bench": "poll_client", "calls": args.calls, "rate": args.rate,
                      "window_ms": args.window_ms,
                      "load_1m": round(os.getloadavg()[0], 2), **result}))


if __name__ == "__main__":
    main()
