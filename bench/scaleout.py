"""Files/s with 1, 2 and 3 daemons sharing one PostgreSQL database, and 1 daemon on SQLite.

    .venv/bin/python bench/scaleout.py [--files 600] [--size 200] [--cases pg1,pg2,pg3,sqlite1]

Each case: a fresh database (a new PostgreSQL database on 127.0.0.1:5432, or a SQLite file),
k daemon processes (`python -m orchestrator run`, distinct worker ids) started and registered
first, then every file put on the queue table in one transaction (the shared intake), timed
from that commit to the last job's `finished_at`. Zero-time emulator jobs on small files, one
Azurite and one emulator for all cases. Per case it also reports the CPU the daemons used and
how busy the whole box was (psutil over the timed window), because everything - daemons,
PostgreSQL, Azurite, the emulator - shares the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import common
import psutil

from orchestrator import lifecycle
from orchestrator.db import repository
from tests import harness

PG_ADMIN_DSN = os.environ.get("BES_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _pg(statement: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def _pg_url(name: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{name}"


async def _enqueue(db_url: str, paths: list[str]) -> dt.datetime:
    repo = await repository.Repository.open(db_url)
    try:
        now = dt.datetime.now(dt.UTC)
        await repo.enqueue(paths, service="svc", now=now)
        return now
    finally:
        await repo.close()


async def _progress(db_url: str, files: int) -> tuple[int, int, dt.datetime | None]:
    """(done, failed, latest finished_at once all have ended) from the database."""
    repo = await repository.Repository.open(db_url)
    try:
        counts = await repo.count_by_state()
        done = counts[lifecycle.JobState.DONE]
        failed = counts[lifecycle.JobState.FAILED] + counts[lifecycle.JobState.CANCELLED]
        latest = None
        if done + failed >= files:
            rows = await repo.history(limit=1_000_000)
            latest = max(dt.datetime.fromisoformat(r["finished_at"]) for r in rows
                         if r["finished_at"])
        return done, failed, latest
    finally:
        await repo.close()


def _with_worker_id(s: harness.Setup, worker_id: str) -> harness.Setup:
    cfg = s.root / f"config-{worker_id}.toml"
    cfg.write_text(s.config.read_text().replace(
        "[daemon]\n", f"[daemon]\nworker_id = {json.dumps(worker_id)}\n", 1))
    return dataclasses.replace(s, config=cfg)


def run_case(kind: str, daemons: int, *, files: int, size: int, root: Path,
             emu: harness.Emulator, conn: str) -> dict[str, Any]:
    pg_name = None
    if kind == "pg":
        pg_name = f"bes_bench_{uuid.uuid4().hex[:10]}"
        asyncio.run(_pg(f'CREATE DATABASE "{pg_name}"'))
        db_url = _pg_url(pg_name)
    else:
        db_url = f"sqlite+aiosqlite:///{root / 'state.db'}"
    try:
        s = harness.make_setup(
            root, emulator_url=emu.url, storage_connection_string=conn, db_url=db_url,
            service={"max_in_flight": 1000, "output_dir": "results", "archive_dir": "archive",
                     "failed_dir": "failed",
                     "poll": {"initial_s": 0.05, "multiplier": 1.5, "max_s": 1.0,
                              "jitter": 0.1}},
            daemon={"rescan_s": 30.0, "lease_s": 30.0, "heartbeat_s": 5.0})
        s.cli("migrate")
        src = root / "src"
        paths = [str(p) for p in common.stage_inputs(src, files, common.make_csv(size))]
        procs = [_with_worker_id(s, f"bench-{i}").start_daemon(log_name=f"daemon-{i}.log")
                 for i in range(daemons)]
        try:
            time.sleep(3.0)  # start-up (imports, container check) is not what is measured
            assert all(p.poll() is None for p in procs), "a daemon exited at start"
            cpu0 = [psutil.Process(p.pid).cpu_times() for p in procs]
            box0 = psutil.cpu_times()
            began = asyncio.run(_enqueue(db_url, paths))
            deadline = time.monotonic() + 600
            while True:
                done, failed, latest = asyncio.run(_progress(db_url, files))
                if done + failed >= files or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            cpu1 = [psutil.Process(p.pid).cpu_times() for p in procs]
            box1 = psutil.cpu_times()
        finally:
            for p in procs:
                harness.stop(p, signal.SIGTERM, timeout=30)
        assert latest is not None and done == files, (done, failed)
        seconds = (latest - began).total_seconds()
        busy = sum(getattr(box1, f) - getattr(box0, f)
                   for f in ("user", "system", "nice", "irq", "softirq"))
        total = busy + (box1.idle - box0.idle) + (getattr(box1, "iowait", 0)
                                                  - getattr(box0, "iowait", 0))
        daemon_cpu = sum((b.user + b.system) - (a.user + a.system)
                         for a, b in zip(cpu0, cpu1, strict=True))
        return {"case": f"{kind}{daemons}", "files": files, "seconds": round(seconds, 2),
                "files_per_s": round(files / seconds, 1),
                "daemon_cpu_ms_per_file": round(1000 * daemon_cpu / files, 2),
                "box_busy_pct": round(100 * busy / total, 0) if total else None}
    finally:
        if pg_name is not None:
            asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=600)
    ap.add_argument("--size", type=int, default=200)
    ap.add_argument("--cases", default="pg1,pg2,pg3,sqlite1")
    args = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with common.azurite() as az, common.emulator() as emu, \
            tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        for case in args.cases.split(","):
            kind, n = case.rstrip("0123456789"), int(case[len(case.rstrip("0123456789")):])
            results[case] = run_case(kind, n, files=args.files, size=args.size,
                                     root=Path(tmp) / case, emu=emu,
                                     conn=az.connection_string)
            print(json.dumps(results[case]), file=sys.stderr)
    base = results.get("pg1", {}).get("files_per_s")
    ratios = {f"{c}_vs_pg1": round(r["files_per_s"] / base, 2)
              for c, r in results.items() if base and c != "pg1"}
    print(json.dumps({"bench": "scaleout", "files": args.files, "size": args.size,
                      "files_per_s": {c: r["files_per_s"] for c, r in results.items()},
                      "ratios": ratios, "cases": list(results.values())}))


if __name__ == "__main__":
    main()
