"""The batch writer against real databases: a poisoned item fails alone, transient trouble is
retried, and what is transient is told apart by the database's own errors."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import uuid
from pathlib import Path
from typing import cast

import asyncpg
import pytest
import sqlalchemy as sa

from orchestrator import jobs, lifecycle, writer
from orchestrator.db import dialect as db_dialect
from orchestrator.db import engine as db_engine
from orchestrator.db import migrate, repository

S = lifecycle.JobState
T0 = dt.datetime(2026, 11, 27, 20, 45, 55, tzinfo=dt.UTC)
#: A lone write is committed within a batch window; this bounds "not blocked".
PROMPT_S = 5.0


async def claimed(repo: repository.Repository, n: int) -> list[jobs.Job]:
    made = await repo.create_jobs(
        [jobs.NewJob(id=uuid.uuid4().hex, service="svc", watch="w", claim_key=f"k{i}",
                     source_path=f"/in/{i}.csv", input_name=f"{i}.csv", output_dir="/o",
                     archive_dir="/a", failed_dir="/f") for i in range(n)],
        worker_id="w1", now=T0, lease_s=600)
    assert len(made) == n
    return made


def spooled(job: jobs.Job, **fields: object) -> jobs.Transition:
    return jobs.Transition(job_id=job.id, expected=S.CLAIMED, to=S.ACCEPTED, message="spooled",
                           fields=cast(jobs.Fields, {"input_path": f"/spool/{job.id}", **fields}))


async def test_a_poisoned_item_fails_alone_and_blocks_nothing(
    repo: repository.Repository,
) -> None:
    """One update with a misspelt field, one the database refuses at bind time, and one illegal
    state change share a batch with good updates: the good ones commit at once, each bad one
    raises ItemRejected with its reason, and later writes go through (the writer once retried
    the whole batch every second, forever)."""
    good, typo, naive, illegal, later = await claimed(repo, 5)
    w = writer.BatchWriter(repo, "w1")
    w.start()
    try:
        futs = [
            w.submit(spooled(good)),
            w.submit(spooled(typo, input_sha265="ab")),  # the misspelling of issue 10
            w.submit(spooled(naive, started_at=T0.replace(tzinfo=None))),
            w.submit(jobs.Transition(job_id=illegal.id, expected=S.CLAIMED, to=S.DONE,
                                     message="skips every step")),
        ]
        _, pending = await asyncio.wait(futs, timeout=PROMPT_S)
        assert not pending, "the writer is stuck on a poisoned batch"
        assert futs[0].result() is True
        for fut, why in zip(futs[1:], ["cannot set 'input_sha265'", "naive datetime",
                                       "illegal state change claimed -> done"], strict=True):
            with pytest.raises(writer.ItemRejected, match=why):
                fut.result()
        assert await asyncio.wait_for(w.submit(spooled(later)), PROMPT_S) is True
    finally:
        await w.close()
    states = {j.id: j.state for j in await repo.list_jobs()}
    assert states == {good.id: S.ACCEPTED, typo.id: S.CLAIMED, naive.id: S.CLAIMED,
                      illegal.id: S.CLAIMED, later.id: S.ACCEPTED}
    assert len(await repo.events(typo.id)) == 1  # a rejected item leaves no trace
    assert w.rejected == 3


async def test_lost_lease_is_false_not_an_error(repo: repository.Repository) -> None:
    [job] = await claimed(repo, 1)
    w = writer.BatchWriter(repo, "someone-else")
    w.start()
    try:
        assert await asyncio.wait_for(w.submit(spooled(job)), PROMPT_S) is False
    finally:
        await w.close()


async def test_sqlite_locked_is_retried_until_it_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds the write lock past the busy timeout: the write waits and then
    commits; nothing is rejected. (The busy timeout is shortened so the test is quick.)"""
    monkeypatch.setattr(db_engine, "SQLITE_PRAGMAS", tuple(
        "PRAGMA busy_timeout=50" if p.startswith("PRAGMA busy_timeout") else p
        for p in db_engine.SQLITE_PRAGMAS))
    monkeypatch.setattr(writer, "RETRY_DB_S", 0.1)
    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    await migrate.upgrade(url)
    repo = await repository.Repository.open(url)
    try:
        [job] = await claimed(repo, 1)
        other = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        w = writer.BatchWriter(repo, "w1")
        w.start()
        fut = w.submit(spooled(job))
        await asyncio.sleep(0.6)
        assert not fut.done() and w.transient_retries >= 1
        other.execute("COMMIT")
        other.close()
        assert await asyncio.wait_for(fut, PROMPT_S) is True
        await w.close()
        assert (await repo.get_job(job.id)).state is S.ACCEPTED
    finally:
        await repo.close()


@pytest.mark.postgres
async def test_postgres_connection_killed_is_retried(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server drops the writer's connection (pg_terminate_backend): the write is retried
    on a new connection and commits."""
    if not database_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL connection")
    monkeypatch.setattr(writer, "RETRY_DB_S", 0.1)
    await migrate.upgrade(database_url)
    repo = await repository.Repository.open(database_url)
    try:
        [a, b] = await claimed(repo, 2)
        w = writer.BatchWriter(repo, "w1")
        w.start()
        assert await asyncio.wait_for(w.submit(spooled(a)), PROMPT_S) is True
        dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
        admin = await asyncpg.connect(dsn)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'bes-orchestrator' AND datname = current_database() "
                "AND pid <> pg_backend_pid()")
        finally:
            await admin.close()
        assert killed >= 1
        assert await asyncio.wait_for(w.submit(spooled(b)), PROMPT_S) is True
        assert w.transient_retries >= 1 and w.rejected == 0
        await w.close()
    finally:
        await repo.close()


def test_transient_errors_are_told_by_the_database(tmp_path: Path) -> None:
    """Real driver errors: locked is transient; a constraint, a bad statement, a bad value
    are not."""
    path = tmp_path / "x.db"
    a = sqlite3.connect(path, isolation_level=None, timeout=0)
    b = sqlite3.connect(path, isolation_level=None, timeout=0)
    a.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    a.execute("INSERT INTO t VALUES (1)")
    a.execute("BEGIN IMMEDIATE")
    lite = db_dialect.SQLite()
    with pytest.raises(sqlite3.OperationalError) as locked:
        b.execute("BEGIN IMMEDIATE")
    assert lite.is_transient(locked.value)
    assert lite.is_transient(sa.exc.OperationalError("BEGIN", {}, locked.value))
    a.execute("ROLLBACK")
    with pytest.raises(sqlite3.IntegrityError) as dup:
        a.execute("INSERT INTO t VALUES (1)")
    assert not lite.is_transient(sa.exc.IntegrityError("INSERT", {}, dup.value))
    with pytest.raises(sqlite3.OperationalError) as typo:
        a.execute("SELECT nope FROM t")
    assert not lite.is_transient(typo.value)
    assert not lite.is_transient(ValueError("naive datetime"))
    assert lite.is_transient(OSError(28, "No space left on device"))
    a.close()
    b.close()


@pytest.mark.postgres
async def test_postgres_sqlstates(database_url: str) -> None:
    """Real errors from the server, classified by SQLSTATE: a lock that is not available is
    worth retrying; a value too long or a duplicate key is not."""
    if not database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL errors")
    pg = db_dialect.PostgreSQL()
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")
    one, two = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await one.execute("CREATE TABLE t (v varchar(2) PRIMARY KEY)")
        await one.execute("INSERT INTO t VALUES ('a')")
        with pytest.raises(asyncpg.PostgresError) as too_long:
            await one.execute("INSERT INTO t VALUES ('abcd')")
        assert not pg.is_transient(too_long.value)  # 22001
        with pytest.raises(asyncpg.PostgresError) as duplicate:
            await one.execute("INSERT INTO t VALUES ('a')")
        assert not pg.is_transient(duplicate.value)  # 23505
        async with one.transaction():
            await one.execute("SELECT * FROM t FOR UPDATE")
            with pytest.raises(asyncpg.PostgresError) as busy:
                await two.execute("SELECT * FROM t FOR UPDATE NOWAIT")
        assert busy.value.sqlstate == "55P03" and pg.is_transient(busy.value)
    finally:
        await one.close()
        await two.close()
    assert pg.is_transient(sa.exc.OperationalError("x", {}, _Stated("57P01")))  # admin shutdown
    assert pg.is_transient(sa.exc.OperationalError("x", {}, _Stated("08006")))  # conn failure
    assert pg.is_transient(sa.exc.OperationalError("x", {}, _Stated("53100")))  # disk full


class _Stated(Exception):
    """An error carrying only a SQLSTATE, as the drivers' wrappers do (only the code matters
    here; the real errors above show the attribute is where the classifier looks)."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate
