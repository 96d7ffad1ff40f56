"""The database-only commands' SQLite reads (`db/sqlite_reads.py`, standard-library sqlite3)
against the repository's (SQLAlchemy) on one real database: the same answers, record for
record; and the commands themselves, in a subprocess: no SQLAlchemy loaded, and every schema
problem still one line and exit 78."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator import errors, jobs, lifecycle
from orchestrator.backends.batch_endpoint import status as be_status
from orchestrator.db import migrate, repository, sqlite_reads
from orchestrator.db import urls as db_urls
from tests import test_cli as cli_tests
from tests import test_repository as repo_tests

S = lifecycle.JobState
T0 = repo_tests.T0


@pytest.fixture
async def built(tmp_path: Path) -> AsyncIterator[tuple[Path, repository.Repository]]:
    """A database with jobs in many states, two services, results, errors, a takeover and two
    ids that share a prefix; the repository open on it."""
    db = tmp_path / "state.db"
    url = f"sqlite+aiosqlite:///{db}"
    await migrate.upgrade(url)
    repo = await repository.Repository.open(url)
    try:
        made: list[jobs.Job] = []
        for i in range(12):
            job = await repo.create_job(
                repo_tests.new_job(f"f{i}", job_id=f"abcd{i}{0:027x}" if i < 2 else None,
                                   service="other" if i % 3 == 0 else "svc"),
                worker_id="w1", now=T0 + dt.timedelta(seconds=i, microseconds=7 * i),
                lease_s=repo_tests.LEASE_S)
            assert job is not None
            made.append(job)
        walk = repo_tests.walk
        await walk(repo, made[0], S.DONE, outputs={"output1": "/out/f0.output1.csv"})
        await walk(repo, made[1], S.FAILED, "the model said no", error="Bad input: line 3",
                   error_code="FailedJob", bes_status="Failed")
        await walk(repo, made[2], S.STARTED, bes_job_id="job-2", bes_status="Running")
        await walk(repo, made[3], S.SUBMITTED, bes_job_id="job-3")
        await walk(repo, made[4], S.STARTED, bes_job_id="job-4", bes_status="NotStarted")
        await repo.request_cancel(made[5].id, now=T0)
        # Another worker takes over the expired leases (events naming the previous owner) and
        # the cancelling job a person freed.
        taken = await repo.claim_due(worker_id="w2", now=T0 + dt.timedelta(hours=1),
                                     lease_s=repo_tests.LEASE_S, limit=100)
        assert len(taken) == 10  # every active job: all but the done and the failed one
        yield db, repo
    finally:
        await repo.close()


def _same(a: object, b: object) -> None:
    """Equal records, field by field (a failure names the field)."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        assert dataclasses.asdict(a) == dataclasses.asdict(b)  # type: ignore[arg-type]
    assert a == b


async def test_the_sqlite_reads_answer_as_the_repository(
    built: tuple[Path, repository.Repository],
) -> None:
    db, repo = built
    with sqlite_reads.reading(db) as fast:
        assert fast.revision() == migrate.head_revision()
        assert fast.count_by_state() == await repo.count_by_state()
        _same(fast.oldest_active(), await repo.oldest_active())
        assert fast.polling_counts() == await be_status.polling_counts(repo.read_engine)
        assert fast.polling_counts() == {"svc": 2, "other": 1}
        for state, service, limit in [(None, None, 50), (S.DONE, None, 50),
                                      (None, "other", 50), (None, None, 3),
                                      (S.CLAIMED, "svc", 2), (S.FAILED, "nope", 5)]:
            want = await repo.list_jobs(state=state, service=service, limit=limit)
            got = fast.list_jobs(state=state, service=service, limit=limit)
            assert [j.id for j in got] == [j.id for j in want], (state, service, limit)
            for g, w in zip(got, want, strict=True):
                _same(g, w)
        every = await repo.list_jobs(limit=100)
        assert len(every) == 12
        for job in every:
            _same(fast.get_job(job.id), job)
            _same(fast.get_job(job.id[:8].upper() + " "), await repo.get_job(job.id[:8]))
            assert fast.events(job.id) == await repo.events(job.id)
            assert fast.events(job.id), job.id
        assert any("taken over by w2" in e.message for j in every for e in fast.events(j.id))
        for bad, kind in [("abcd", errors.InvalidState), ("ffff", errors.NotFound),
                          ("zz", errors.NotFound), ("abc", errors.NotFound)]:
            with pytest.raises(kind) as fast_info:
                fast.get_job(bad)
            with pytest.raises(kind) as repo_info:
                await repo.get_job(bad)
            assert str(fast_info.value) == str(repo_info.value)


async def test_the_reads_never_write(built: tuple[Path, repository.Repository]) -> None:
    db, _repo = built
    with sqlite_reads.reading(db) as fast, pytest.raises(sqlite3.OperationalError,
                                                         match="readonly"):
        fast._conn.execute("DELETE FROM jobs")


def test_a_missing_file_is_never_created(tmp_path: Path) -> None:
    db = tmp_path / "absent.db"
    with pytest.raises(sqlite3.OperationalError), sqlite_reads.reading(db):
        pass
    assert not db.exists()


@pytest.mark.parametrize("url", [
    "sqlite+aiosqlite:///state.db", "sqlite+aiosqlite:////var/lib/x/state.db",
    "sqlite+aiosqlite:///a dir/with space+plus.db", "sqlite+aiosqlite:///caf%C3%A9/%2541.db",
    "sqlite+aiosqlite:///t@b/c:d#e.db", "sqlite+aiosqlite:///", "sqlite+aiosqlite:///:memory:",
    "sqlite:///rel/x.db", "sqlite+pysqlite:////abs/x.db",
])
def test_plain_sqlite_urls_parse_as_sqlalchemy_parses_them(url: str) -> None:
    import sqlalchemy as sa

    parsed = sa.make_url(url)
    assert db_urls.plain_sqlite_database(url) == parsed.database
    assert db_urls.render_sqlite(parsed.database or "") == parsed.set(
        drivername="sqlite+aiosqlite").render_as_string(hide_password=False)


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///x.db?timeout=5",
                                 "postgresql+asyncpg://h/db", "sqlite+aiosqlite://x.db"])
def test_other_urls_are_left_to_sqlalchemy(url: str) -> None:
    assert db_urls.plain_sqlite_database(url) is None


# -- the commands, as people run them ---------------------------------------------------------
_PROBE = """
import sys
from orchestrator import cli
try:
    cli.main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
heavy = sorted(m for m in ("sqlalchemy", "aiosqlite", "asyncpg", "alembic", "aiohttp")
               if m in sys.modules)
print("LOADED", ",".join(heavy), "EXIT", code, file=sys.stderr)
"""


def _run(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _PROBE, *args, "-c", str(cfg)],
                          env=cli_tests._env(), capture_output=True, text=True, timeout=60,
                          cwd=cfg.parent, check=False)


def test_status_and_jobs_load_no_sqlalchemy(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    asyncio.run(cli_tests._make_db(f"sqlite+aiosqlite:///{db}", ["a.csv", "b.csv"]))
    cfg = cli_tests._config(tmp_path, db)
    for args in (["status"], ["status", "--json"], ["jobs", "list"], ["jobs", "list", "--json"],
                 ["jobs", "show", f"{1:032x}"]):
        proc = _run(cfg, *args)
        assert proc.stderr.strip().endswith("LOADED  EXIT 0"), (args, proc.stderr)
    listed = json.loads(_run(cfg, "jobs", "list", "--json").stdout)
    assert sorted(j["input_name"] for j in listed) == ["a.csv", "b.csv"]
    counts = json.loads(_run(cfg, "status", "--json").stdout)["counts"]
    assert counts["claimed"] == 2


def _one_line_78(cfg: Path, args: list[str], expected: str) -> None:
    proc = cli_tests._cli(cfg, *args)
    assert proc.returncode == 78, (args, proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and expected in proc.stderr, (args, proc.stderr)
    assert "Traceback" not in proc.stderr


async def test_a_database_behind_ahead_or_unmigrated_is_one_line_and_78(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    url = f"sqlite+aiosqlite:///{db}"
    cfg = cli_tests._config(tmp_path, db)
    commands = [["status"], ["jobs", "list"], ["jobs", "show", "abcd"]]
    await migrate.upgrade(url, revision="0001")
    for args in commands:
        _one_line_78(cfg, args, f"is at revision 0001, this program needs "
                                f"{migrate.head_revision()}: run `bes-orchestrator migrate`")
    await migrate.upgrade(url)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999_future'")
    for args in commands:
        _one_line_78(cfg, args, "migrated by a newer bes-orchestrator")
    db.unlink()
    sqlite3.connect(db).close()  # an empty SQLite file: never migrated
    for args in commands:
        _one_line_78(cfg, args, "has no schema yet: run `bes-orchestrator migrate`")
    db.write_bytes(b"this is not a database, just text " * 200)
    for args in commands:
        _one_line_78(cfg, args, f"config error: database.url: cannot use the database at {db}:")

