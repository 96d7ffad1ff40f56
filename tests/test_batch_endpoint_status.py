"""`status` shows each batch-endpoint service's effective poll interval: the service's poll.max_s,
or longer when its subscription's ARM read budget cannot carry that many jobs polling. Computed
from the config and the database alone: the real CLI as a subprocess on a real database (SQLite
and PostgreSQL), no daemon."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext import asyncio as sa_asyncio

from orchestrator import clock, config, jobs, lifecycle
from orchestrator.backends.batch_endpoint import status as be_status
from orchestrator.db import migrate, repository, tables
from tests import harness

SUB_A = "00000000-aaaa-2222-3333-444444444444"
SUB_B = "11111111-bbbb-2222-3333-444444444444"


def _ws(sub: str, ws: str) -> str:
    return (f"/subscriptions/{sub}/resourceGroups/rg1/providers/"
            f"Microsoft.MachineLearningServices/workspaces/{ws}")


def _service(name: str, sub: str, *, max_s: float, reads: float | None = None) -> str:
    extra = f"arm_reads_per_s = {reads}\n" if reads is not None else ""
    return (f'[services.{name}]\nkind = "batch_endpoint"\n'
            f'scoring_uri = "https://{name}.westeurope.inference.ml.azure.com/jobs"\n'
            f'workspace_id = "{_ws(sub, name)}"\n{extra}'
            f"[services.{name}.poll]\nmax_s = {max_s}\n")


def _config(root: Path, db_url: str) -> Path:
    """Two endpoints on subscription A (the first sets its rate: 10/s), one on B (default 20/s),
    and a classic BES service, which gets no row."""
    text = (f'[daemon]\nstate_dir = "state"\n[database]\nurl = "{db_url}"\n'
            '[storage]\nconnection_string_env = "BES_TEST_STATUS_UNSET_STORAGE"\n'
            '[http]\nlisten = ""\n'
            + _service("a1", SUB_A, max_s=30.0, reads=10.0)
            + _service("a2", SUB_A, max_s=120.0, reads=50.0)
            + _service("b1", SUB_B, max_s=30.0)
            + '[services.classic]\nbase_url = "http://127.0.0.1:9"\nworkspace = "w"\n'
              'service = "s"\napi_key_env = "BES_TEST_STATUS_UNSET_KEY"\n'
            + '[[watch]]\nfolder = "inbox"\nservice = "a1"\n')
    cfg = root / "config.toml"
    cfg.write_text(text)
    return cfg


async def _jobs(url: str, states: dict[str, dict[lifecycle.JobState, int]]) -> None:
    """Jobs of each service in the given states (created claimed, then moved by SQL)."""
    await migrate.upgrade(url)
    repo = await repository.Repository.open(url)
    i = 0
    try:
        for service, by_state in states.items():
            for state, n in by_state.items():
                ids = []
                for _ in range(n):
                    job_id = f"{i:032x}"
                    i += 1
                    await repo.create_job(jobs.NewJob(
                        id=job_id, service=service, watch=None, claim_key=f"k:{job_id}",
                        source_path=f"/in/{job_id}.csv", input_name=f"{job_id}.csv",
                        output_dir="/o", archive_dir="/a", failed_dir="/f"),
                        worker_id="w1", now=clock.now(), lease_s=30)
                    ids.append(job_id)
                engine = sa_asyncio.create_async_engine(url)
                try:
                    async with engine.begin() as conn:
                        await conn.execute(sa.update(tables.jobs)
                                           .where(tables.jobs.c.id.in_(ids))
                                           .values(state=state.value))
                finally:
                    await engine.dispose()
    finally:
        await repo.close()


def _status(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BES_TEST_STATUS_")}
    proc = subprocess.run([*harness.cli_cmd(), "status", *args, "-c", str(cfg)],
                          env={**env, "PYTHONPATH": str(harness.ROOT)}, capture_output=True,
                          text=True, timeout=60, cwd=cfg.parent, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


async def test_status_shows_each_batch_endpoint_services_effective_poll_interval(
    tmp_path: Path, database_url: str
) -> None:
    S = lifecycle.JobState
    await _jobs(database_url, {
        "a1": {S.SUBMITTED: 300, S.STARTED: 500, S.UPLOADED: 40, S.DONE: 60},
        "a2": {S.STARTED: 200},
        "b1": {S.STARTED: 100},
        "classic": {S.STARTED: 900},  # another kind: never counted against ARM
    })
    cfg = _config(tmp_path, database_url)

    data = json.loads(_status(cfg, "--json").stdout)
    rows = {r["service"]: r for r in data["batch_endpoint_polling"]}
    assert list(rows) == ["a1", "a2", "b1"]
    # Subscription A: 1,000 jobs polling (a1's 800 + a2's 200) at a1's 10 reads/s -> 100 s.
    assert rows["a1"] == {"service": "a1", "subscription": SUB_A, "jobs_polling": 1000,
                          "arm_reads_per_s": 10.0, "wanted_s": 30.0,
                          "effective_interval_s": 100.0}
    # a2 wants 120 s, which the budget can carry.
    assert rows["a2"]["jobs_polling"] == 1000 and rows["a2"]["arm_reads_per_s"] == 10.0
    assert rows["a2"]["effective_interval_s"] == 120.0
    # Subscription B: 100 jobs at the default 20 reads/s -> 5 s, so poll.max_s (30 s) holds.
    assert rows["b1"]["jobs_polling"] == 100 and rows["b1"]["arm_reads_per_s"] == 20.0
    assert rows["b1"]["effective_interval_s"] == 30.0

    text = _status(cfg).stdout
    assert ("a1: effective poll interval 100 s (the read budget of 10 ARM reads/s over 1000 "
            f"jobs polling on subscription {SUB_A})") in text, text
    assert "a2: effective poll interval 120 s (poll.max_s;" in text, text
    assert "b1: effective poll interval 30 s (poll.max_s; 100 jobs polling" in text, text
    assert "classic:" not in text


def test_no_batch_endpoint_service_no_rows(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    asyncio.run(_jobs(f"sqlite+aiosqlite:///{db}", {"svc": {lifecycle.JobState.STARTED: 3}}))
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[database]\nurl = "sqlite+aiosqlite:///{db}"\n[http]\nlisten = ""\n'
                   '[storage]\nconnection_string_env = "BES_TEST_STATUS_UNSET_STORAGE"\n'
                   '[services.svc]\nbase_url = "http://127.0.0.1:9"\nworkspace = "w"\n'
                   'service = "s"\napi_key_env = "BES_TEST_STATUS_UNSET_KEY"\n'
                   '[[watch]]\nfolder = "inbox"\nservice = "svc"\n')
    assert json.loads(_status(cfg, "--json").stdout)["batch_endpoint_polling"] == []
    assert "effective poll interval" not in _status(cfg).stdout


def test_the_interval_is_the_budget_share_once_the_policy_is_shorter() -> None:
    """The pure rule at its edges: no job polling, exactly at the budget, one over it."""
    svc = config.BatchEndpointService.model_validate({
        "name": "e", "scoring_uri": "https://e.x.inference.ml.azure.com/jobs",
        "workspace_id": _ws(SUB_A, "w"), "arm_reads_per_s": 20.0, "poll": {"max_s": 30.0},
        "output_dir": "/o", "archive_dir": "/a", "failed_dir": "/f"})
    for polling, want in ((0, 30.0), (600, 30.0), (601, 30.05), (20_000, 1000.0)):
        [row] = be_status.intervals([svc], {"e": polling})
        assert row.effective_interval_s == want, (polling, row)
