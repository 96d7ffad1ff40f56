"""In-process engine tests' kit: a real migrated SQLite file, settings from a real TOML file,
and a fake backend whose step functions stand in for BES (the steps themselves have their own
tests against the emulator). Used by tests/test_worker.py, test_supervision.py, test_reload.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import sqlite3
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from orchestrator import clock, config, daemon, errors, jobs, lifecycle, steps
from orchestrator.db import migrate, repository

S = lifecycle.JobState
STORAGE_ENV = "BES_ENGINE_TEST_STORAGE"
KEY_ENV = "BES_ENGINE_TEST_KEY"


def write_config(root: Path, *, max_in_flight: int = 20, executors: int = 8,
                 extra: str = "", lease_s: float = 5.0, heartbeat_s: float = 1.0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    text = f"""
[daemon]
state_dir = "state"
worker_id = "w-test"
executors = {executors}
lease_s = {lease_s}
heartbeat_s = {heartbeat_s}

[database]
url = "sqlite+aiosqlite:///{root / 'state.db'}"

[storage]
connection_string_env = "{STORAGE_ENV}"

[http]
listen = ""

[services.svc]
base_url = "http://127.0.0.1:9"
workspace = "ws"
service = "s"
api_key_env = "{KEY_ENV}"
max_in_flight = {max_in_flight}
retry = {{ initial_s = 0.01, multiplier = 1.0, max_s = 0.02 }}
poll = {{ initial_s = 0.01, multiplier = 1.0, max_s = 0.02, jitter = 0.0 }}
{extra}
"""
    path = root / "config.toml"
    path.write_text(text)
    return path


def load_settings(path: Path, monkeypatch: Any) -> config.Settings:
    monkeypatch.setenv(STORAGE_ENV, "UseDevelopmentStorage=true")
    monkeypatch.setenv(KEY_ENV, "engine-test-key-123456")
    return config.load(path)


async def open_repo(settings: config.Settings) -> repository.Repository:
    await migrate.upgrade(settings.database.url, None)
    repo = await repository.Repository.open(settings.database.url)
    await repo.check_schema()
    return repo


def db_path(settings: config.Settings) -> Path:
    path = daemon.sqlite_path(settings.database.url)
    assert path is not None
    return path


def sql(settings: config.Settings, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    """Plain SQL on the database file, as another process would (for faults a test makes)."""
    con = sqlite3.connect(db_path(settings), timeout=30)
    try:
        with con:
            return list(con.execute(statement, params))
    finally:
        con.close()


def ts(at: dt.datetime) -> str:
    """A time as the jobs table stores it on SQLite (naive UTC text)."""
    return at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclasses.dataclass
class FakeBackend:
    """Step functions: every job goes claim → … → done; `polls` "still running" answers
    first; `faults[step]` are raised (in order) before that step succeeds."""

    polls: int = 2
    poll_delay_s: float = 0.01
    faults: dict[lifecycle.Step, list[BaseException]] = dataclasses.field(default_factory=dict)
    #: step -> an event the step waits for before it answers (to hold jobs in a step).
    gates: dict[lifecycle.Step, asyncio.Event] = dataclasses.field(default_factory=dict)
    calls: collections.Counter[tuple[str, lifecycle.Step]] = dataclasses.field(
        default_factory=collections.Counter)
    remote: int = 0  #: jobs submitted and not yet seen to finish
    max_remote: int = 0
    running: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    overlaps: int = 0  #: times a step started for a job another step was running
    entered: collections.Counter[lifecycle.Step] = dataclasses.field(
        default_factory=collections.Counter)
    hook: Callable[[jobs.Job, lifecycle.Step], Any] | None = None

    def step_for(self, state: lifecycle.JobState) -> tuple[lifecycle.Step, Any]:
        step = lifecycle.STEP_FOR_STATE[state]

        async def run(job: jobs.Job, ctx: Any) -> steps.StepResult:
            return await self._run(step, job)

        return step, run

    async def _run(self, step: lifecycle.Step, job: jobs.Job) -> steps.StepResult:
        if self.running[job.id]:
            self.overlaps += 1
        self.running[job.id] += 1
        self.entered[step] += 1
        try:
            self.calls[(job.id, step)] += 1
            if self.hook is not None:
                r = self.hook(job, step)
                if asyncio.iscoroutine(r):
                    await r
            gate = self.gates.get(step)
            if gate is not None:
                await gate.wait()
            pending = self.faults.get(step)
            if pending:
                raise pending.pop(0)
            return self._answer(step, job)
        finally:
            self.running[job.id] -= 1

    def _answer(self, step: lifecycle.Step, job: jobs.Job) -> steps.StepResult:
        now = clock.now()
        St = lifecycle.Step
        if step is St.CLAIM:
            return steps.Advance(to=S.ACCEPTED, message="claimed")
        if step is St.UPLOAD:
            return steps.Advance(to=S.UPLOADED, message="uploaded")
        if step is St.SUBMIT:
            self.remote += 1
            self.max_remote = max(self.max_remote, self.remote)
            return steps.Advance(to=S.SUBMITTED, message="submitted",
                                 fields={"bes_job_id": "r-" + job.id[:8], "submitted_at": now})
        if step is St.START:
            return steps.Advance(to=S.STARTED, message="started", fields={"started_at": now})
        if step is St.POLL:
            if job.poll_count < self.polls:
                return steps.Wait(delay_s=self.poll_delay_s, bes_status="Running",
                                  poll_count=job.poll_count + 1)
            self.remote -= 1
            return steps.Advance(to=S.REMOTE_FINISHED, message="finished")
        if step is St.DOWNLOAD:
            return steps.Advance(to=S.DOWNLOADED, message="downloaded")
        if step is St.FINISH:
            return steps.Advance(to=S.DONE, message="done")
        if step is St.FAIL:
            return steps.Advance(to=S.FAILED, message="failed")
        return steps.Advance(to=S.CANCELLED, message="cancelled")


async def fake_open_context(settings: config.Settings, session: Any, *, rng: Any) -> Any:
    """The steps are fakes: they need no adapters, only what the worker sets on reload."""
    return types.SimpleNamespace(settings=settings)


async def fake_close_context(ctx: Any) -> None:
    return None


async def enqueue(repo: repository.Repository, n: int, *, service: str = "svc") -> None:
    await repo.enqueue([f"/nowhere/in-{i}.csv" for i in range(n)], service=service,
                       now=clock.now())


async def states(repo: repository.Repository) -> collections.Counter[str]:
    counts = await repo.count_by_state()
    return collections.Counter({s.value: n for s, n in counts.items() if n})


async def wait_until(predicate: Callable[[], Any], timeout_s: float = 20.0,
                     what: str = "") -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            r = predicate()
            if asyncio.iscoroutine(r):
                r = await r
            if r:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(what)  # pragma: no cover


@contextlib.asynccontextmanager
async def running_daemon(
    settings: config.Settings, repo: repository.Repository, backend: FakeBackend, **kw: Any
) -> AsyncIterator[tuple[daemon.Daemon, asyncio.Task[daemon.Outcome]]]:
    d = daemon.Daemon(settings, repo, handle_signals=False, step_for=backend.step_for,
                      open_context=fake_open_context, close_context=fake_close_context, **kw)
    task = asyncio.create_task(d.run())
    try:
        await wait_until(lambda: d.live()[0] or task.done(), what="daemon alive")
        yield d, task
    finally:
        d.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


def transient(message: str = "503 from the fake") -> errors.TransientError:
    return errors.TransientError(message, status=503)

