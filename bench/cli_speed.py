"""Wall time of the database-only commands (`status`, `jobs list`) on a large SQLite database.

    .venv/bin/python bench/cli_speed.py [--jobs 100000] [--runs 5] [--keep DIR]

Builds the database through the repository (migrate, then `create_jobs` in batches of 1,000,
each with its 'claimed' event), then moves all but 1 % of the jobs to DONE with one UPDATE
(only the state and a finish time matter to the two commands: their counts, the oldest job in
flight and the newest jobs). Each command runs `--runs` times as the installed CLI would
(`python -m orchestrator ...` in a fresh process, bytecode cached as in an install unless
`--no-bytecode-cache`); the best and median wall times and the median CPU time are reported,
with `python -c pass` as the interpreter's own floor. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from orchestrator import clock, jobs, lifecycle  # noqa: E402
from orchestrator.db import engine as db_engine  # noqa: E402
from orchestrator.db import migrate, repository, tables  # noqa: E402

CONFIG = """
[daemon]
state_dir = "state"
[database]
url = "sqlite+aiosqlite:///{db}"
[http]
listen = ""
[storage]
connection_string_env = "BES_CLI_SPEED_UNSET_STORAGE"
[services.svc]
base_url = "http://127.0.0.1:9"
workspace = "ws"
service = "s"
api_key_env = "BES_CLI_SPEED_UNSET_KEY"
"""

BATCH = 1000


async def build(db: Path, n: int) -> float:
    start = time.perf_counter()
    url = f"sqlite+aiosqlite:///{db}"
    await migrate.upgrade(url)
    repo = await repository.Repository.open(url)
    try:
        first_at = clock.now() - dt.timedelta(seconds=n / BATCH)
        for first in range(0, n, BATCH):
            now = first_at + dt.timedelta(seconds=first / BATCH)  # one burst of files a second
            news = [jobs.NewJob(
                id=f"{i:032x}", service="svc", watch=None, claim_key=f"queue:{i}",
                source_path=f"/in/{i}.csv", input_name=f"{i}.csv", output_dir="/o",
                archive_dir="/a", failed_dir="/f") for i in range(first, min(first + BATCH, n))]
            await repo.create_jobs(news, worker_id="w1", now=now, lease_s=30)
    finally:
        await repo.close()
    # Bench shortcut: 99 % finished, the rest still in flight (CLAIMED).
    engine = db_engine.create_engine(url)
    j = tables.jobs
    try:
        async with engine.begin() as conn:
            await conn.execute(
                sa.update(j).where(sa.func.substr(j.c.id, 31, 2) != "00")
                .values(state=lifecycle.JobState.DONE.value, finished_at=now,
                        lease_owner=None, lease_expires_at=None))
    finally:
        await engine.dispose()
    return time.perf_counter() - start


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_cmd(cmd: list[str], cwd: Path, runs: int, env: dict[str, str]) -> dict[str, float]:
    """Best and median wall time, and the median CPU time (user + system: less moved by other
    load on the box than wall time), after one untimed run."""
    times, cpus = [], []
    subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, check=False)
    for _ in range(runs):
        start, cpu = time.perf_counter(), _cpu_s()
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
        times.append(time.perf_counter() - start)
        cpus.append(_cpu_s() - cpu)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")
    return {"best_s": round(min(times), 3), "median_s": round(statistics.median(times), 3),
            "cpu_s": round(statistics.median(cpus), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build (or reuse) the database in DIR")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="run as this environment does (PYTHONDONTWRITEBYTECODE kept)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="cli-speed-"))
    root.mkdir(parents=True, exist_ok=True)
    db = root / "state.db"
    cfg = root / "config.toml"
    cfg.write_text(CONFIG.format(db=db))
    build_s = 0.0
    if not db.exists():
        build_s = asyncio.run(build(db, args.jobs))
    cli = [sys.executable, "-m", "orchestrator"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not args.no_bytecode_cache:
        # As installed from a wheel (bytecode compiled at install): a checkout run with
        # PYTHONDONTWRITEBYTECODE=1 compiles every module of the program on every command.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    result = {
        "bench": "cli_speed", "jobs": args.jobs, "build_s": round(build_s, 1),
        "bytecode_cache": not args.no_bytecode_cache,
        "load_1m": round(os.getloadavg()[0], 2),
        "python_floor": time_cmd([sys.executable, "-c", "pass"], root, args.runs, env),
        "status": time_cmd([*cli, "status", "-c", str(cfg)], root, args.runs, env),
        "status_json": time_cmd([*cli, "status", "--json", "-c", str(cfg)], root, args.runs,
                                env),
        "jobs_list": time_cmd([*cli, "jobs", "list", "-c", str(cfg)], root, args.runs, env),
        "target_s": 0.3,
        "load_1m_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
