"""What one `GET /metrics` costs the daemon with 10,000 jobs held.

A child process plays the daemon: it opens a real SQLite database (or PostgreSQL with
`--database-url`) holding `--held` unfinished jobs leased to it and `--history` finished ones,
and serves `orchestrator.web` on its loop. This process scrapes it `--scrapes` times and reads
the child's CPU time (user + system, all threads: the aiosqlite thread included) before and
after. Three figures: `typical`, a scrape that queries the unfinished jobs (Prometheus scrapes
every 15 s, longer than the 1 s cache); `recount`, one that also recounts the finished history
(at most once a minute); `cached`, one answered from memory. Also the status page.

    .venv/bin/python bench/scrape.py [--held 10000] [--history 10000] [--scrapes 200]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator import clock, config, lifecycle, logs, metrics  # noqa: E402
from orchestrator.db import engine as db_engine  # noqa: E402
from orchestrator.db import migrate, repository, tables  # noqa: E402
from orchestrator.web import server as web_server  # noqa: E402

S = lifecycle.JobState
ACTIVE = [S.CLAIMED, S.ACCEPTED, S.UPLOADED, S.SUBMITTED, S.STARTED, S.STARTED, S.STARTED]
SERVICES = ("svc", "svc2", "svc3")
WORKER = "bench-host-1"


def _job(i: int, state: S, now: dt.datetime, rng: random.Random) -> dict[str, Any]:
    job_id = uuid.uuid4().hex
    created = now - dt.timedelta(seconds=rng.uniform(0, 7200))
    done = state in lifecycle.TERMINAL_STATES
    return {
        "id": job_id, "state": state.value, "service": SERVICES[i % len(SERVICES)],
        "watch": "inbox", "claim_key": f"inbox/{job_id}", "source_path": f"/in/f{i}.csv",
        "input_name": f"f{i}.csv", "input_path": f"/spool/{job_id}.csv", "output_dir": "/o",
        "archive_dir": "/a", "failed_dir": "/f",
        "bes_status": (rng.choice(["NotStarted", "Running"]) if state is S.STARTED
                       else "Finished" if done else None),
        "attempts": 1, "lease_owner": None if done else WORKER,
        "lease_expires_at": None if done else now + dt.timedelta(hours=1),
        "next_run_at": now, "created_at": created, "updated_at": created,
        "submitted_at": created if state in (S.SUBMITTED, S.STARTED) or done else None,
        "finished_at": now - dt.timedelta(seconds=rng.uniform(0, 3600)) if done else None,
    }


async def seed(url: str, held: int, history: int) -> None:
    """Jobs straight into a migrated database (with migration 0003's `ix_jobs_gauges`, the
    index every scrape query reads instead of the table)."""
    await migrate.upgrade(url)
    rng = random.Random(1)
    now = clock.now()
    rows = [_job(i, ACTIVE[i % len(ACTIVE)], now, rng) for i in range(held)]
    rows += [_job(held + i, S.DONE if i % 10 else S.FAILED, now, rng) for i in range(history)]
    eng = db_engine.create_engine(url)
    try:
        async with eng.begin() as conn:
            for start in range(0, len(rows), 2000):
                await conn.execute(sa_insert(), rows[start:start + 2000])
    finally:
        await eng.dispose()


def sa_insert() -> Any:
    import sqlalchemy as sa

    return sa.insert(tables.jobs)


def write_config(root: Path, url: str, port: int) -> Path:
    (root / "inbox").mkdir(exist_ok=True)
    services = "".join(
        f'[services.{s}]\nbase_url = "http://127.0.0.1:9"\nworkspace = "ws"\nservice = "{s}"\n'
        'api_key_env = "BENCH_API_KEY"\n' for s in SERVICES)
    cfg = root / "bench.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{root}/state"\nworker_id = "{WORKER}"\n'
        f'[database]\nurl = "{url}"\n'
        '[storage]\nconnection_string_env = "BENCH_STORAGE"\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        f'{services}'
        '[[watch]]\nfolder = "inbox"\nservice = "svc"\n')
    return cfg


async def serve(cfg: Path, max_age_s: float, finished_max_age_s: float) -> None:
    """The child: the endpoint on its loop, with the instruments a busy daemon has set."""
    logs.configure(json=True, level="warning")
    settings = config.load(cfg)
    web_server.SNAPSHOT_MAX_AGE_S = max_age_s
    web_server.FINISHED_MAX_AGE_S = finished_max_age_s
    for s in SERVICES:  # label sets a running daemon would have: a realistic exposition size
        for op in ("submit", "start", "status", "cancel"):
            metrics.backend_calls.labels(s, op, "2xx").inc()
            metrics.backend_call_seconds.labels(s, op).observe(0.05)
        for outcome in ("done", "failed"):
            metrics.job_duration.labels(s, outcome).observe(60)
            metrics.jobs_finished.labels(s, outcome).inc()
        metrics.polls.labels(s).inc()
        metrics.files_claimed.labels(s).inc()
    metrics.schedule_lateness.observe(0.01)
    repo = await repository.Repository.open(settings.database.url)

    async def ready() -> tuple[bool, str]:
        await repo.check_schema()  # what the daemon's readiness asks the database each scrape
        return True, "ready"

    server = await web_server.start(settings, repo, live=lambda: (True, "ok"), ready=ready)
    print("listening", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
        await repo.close()


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def measure(url: str, n: int, *, pause_s: float, proc: psutil.Process) -> dict[str, float]:
    size = 0
    for _ in range(3):  # warm-up: first-time imports and statement compilation
        with urllib.request.urlopen(url, timeout=30) as r:
            size = len(r.read())
    before = cpu_s(proc)
    wall = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as r:
            r.read()
        wall += time.perf_counter() - t0
        if pause_s:
            time.sleep(pause_s)
    cpu = cpu_s(proc) - before
    return {"cpu_ms_per_scrape": round(cpu / n * 1000, 2),
            "wall_ms_per_scrape": round(wall / n * 1000, 2), "bytes": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--held", type=int, default=10_000)
    ap.add_argument("--history", type=int, default=10_000)
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--max-age-s", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--finished-max-age-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.max_age_s, args.finished_max_age_s))
        return
    with tempfile.TemporaryDirectory(prefix="bench-scrape-") as tmp:
        root = Path(tmp)
        url = args.database_url or f"sqlite+aiosqlite:///{root / 'state.db'}"
        asyncio.run(seed(url, args.held, args.history))
        env = {**os.environ, "BENCH_API_KEY": "k", "BENCH_STORAGE": "UseDevelopmentStorage=true"}
        out: dict[str, Any] = {"bench": "scrape", "held": args.held, "history": args.history,
                               "database": url.split(":", 1)[0], "scrapes": args.scrapes,
                               "loadavg_1m": os.getloadavg()[0]}
        # typical: a scrape every 15 s queries the unfinished jobs; finished ones are recounted
        # at most once a minute. recount: a scrape that also recounts them (1 in 4 at 15 s).
        # cached: two scrapes within a second (the second is answered from memory).
        modes = (("typical", 0.0, 3600.0), ("recount", 0.0, 0.0), ("cached", 3600.0, 3600.0))
        for label, max_age_s, finished_max_age_s in modes:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            cfg = write_config(root, url, port)
            child = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(cfg), "--max-age-s", str(max_age_s),
                 "--finished-max-age-s", str(finished_max_age_s)],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert child.stdout is not None
                if child.stdout.readline().strip() != "listening":
                    child.kill()
                    _, err = child.communicate(timeout=10)
                    raise SystemExit(f"the endpoint did not start:\n{err[-3000:]}")
                out[label] = measure(f"http://127.0.0.1:{port}/metrics", args.scrapes,
                                     pause_s=0.0, proc=psutil.Process(child.pid))
                if label == "typical":
                    out["status_page"] = measure(f"http://127.0.0.1:{port}/", 20, pause_s=0.0,
                                                 proc=psutil.Process(child.pid))
            finally:
                child.terminate()
                child.wait(timeout=10)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
