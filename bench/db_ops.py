"""Repository throughput on SQLite and PostgreSQL: the operations the worker repeats most.

    .venv/bin/python bench/db_ops.py                 # SQLite in a temp dir + PostgreSQL
    .venv/bin/python bench/db_ops.py --jobs 5000 --no-postgres

PostgreSQL: a throwaway database on BES_TEST_PG (default postgresql://postgres@127.0.0.1:5432/test).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import sqlalchemy as sa

from orchestrator import jobs, lifecycle
from orchestrator.db import engine as db_engine
from orchestrator.db import migrate, repository

S = lifecycle.JobState
PG_ADMIN_DSN = os.environ.get("BES_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def new_job(i: int) -> jobs.NewJob:
    return jobs.NewJob(id=uuid.uuid4().hex, service="svc", watch="w", claim_key=f"k{i}",
                       source_path=f"/in/{i}.csv", input_name=f"{i}.csv", output_dir="/o",
                       archive_dir="/a", failed_dir="/f")


async def timed(label: str, n: int, fn: Callable[[], Awaitable[object]]) -> None:
    start = time.perf_counter()
    await fn()
    elapsed = time.perf_counter() - start
    print(f"  {label:<42} {elapsed * 1000:8.1f} ms  {n / elapsed:10,.0f} /s")


async def run(url: str, n: int) -> None:
    await migrate.upgrade(url)
    repo = await repository.Repository.open(url)
    try:
        made: list[jobs.Job] = []

        async def create() -> None:
            for i in range(n):
                job = await repo.create_job(new_job(i), worker_id="w1", now=T0, lease_s=60)
                assert job is not None
                made.append(job)

        await timed(f"create_job x{n} (one by one)", n, create)
        await repo.release("w1", now=T0)
        claimed: list[jobs.Job] = []

        async def claim() -> None:
            claimed.extend(await repo.claim_due(worker_id="w1", now=T0, lease_s=60, limit=n))

        await timed(f"claim_due limit={n}", n, claim)
        assert len(claimed) == n
        await timed(f"heartbeat ({n} leases)", n,
                    lambda: repo.heartbeat("w1", now=T0, lease_s=60))
        reschedules = [
            jobs.Reschedule(job_id=j.id, expected=S.CLAIMED, next_run_at=T0, bes_status="Running",
                            poll_count=1) for j in claimed
        ]

        async def reschedule() -> None:
            outcomes = await repo.apply(reschedules, worker_id="w1", now=T0)
            assert all(isinstance(o, repository.Applied) for o in outcomes)

        await timed(f"apply {n} reschedules (status changed)", n, reschedule)
        transitions = [
            jobs.Transition(job_id=j.id, expected=S.CLAIMED, to=S.ACCEPTED, message="spooled",
                            fields={"input_path": f"/spool/{j.id}", "input_size": 10})
            for j in claimed
        ]

        async def apply_transitions() -> None:
            outcomes = await repo.apply(transitions, worker_id="w1", now=T0)
            assert all(isinstance(o, repository.Applied) for o in outcomes)

        await timed(f"apply {n} transitions", n, apply_transitions)
        singles = min(n, 500)

        async def one_by_one() -> None:
            for j in claimed[:singles]:
                [outcome] = await repo.apply(
                    [jobs.Transition(job_id=j.id, expected=S.ACCEPTED, to=S.UPLOADED,
                                     message="uploaded")],
                    worker_id="w1", now=T0,
                )
                assert isinstance(outcome, repository.Applied)

        await timed(f"apply x{singles} (one transition each)", singles, one_by_one)
        await timed("history (1000 rows)", 1, lambda: repo.history(limit=1000))
    finally:
        await repo.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("SQLite (aiosqlite, WAL):")
        await run(f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}", args.jobs)
    if args.no_postgres:
        return
    name = f"bes_bench_{uuid.uuid4().hex[:8]}"
    admin = db_engine.create_engine(PG_ADMIN_DSN, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        print("PostgreSQL (asyncpg):")
        base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        await run(f"{base}/{name}", args.jobs)
    finally:
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


if __name__ == "__main__":
    asyncio.run(main())
