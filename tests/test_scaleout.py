"""Several daemons sharing one PostgreSQL job table (issue 6): the real CLI as subprocesses,
the real emulator over HTTP, real Azurite, a fresh PostgreSQL database per test."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa

from orchestrator import azurite as azurite_mod
from orchestrator import errors, jobs, lifecycle
from orchestrator.db import copy as copy_mod
from orchestrator.db import engine as db_engine
from orchestrator.db import migrate, repository
from orchestrator.emulator import hashing
from tests import harness

pytestmark = pytest.mark.slow

TEXTS = ["This is a good day", "café au lait 42 was perfect"]
DB_PASSWORD = "pg-Secret-Passw0rd-XYZZY"
DB_PASSWORD_ENV = "BES_TEST_DB_PASSWORD"
#: worker.CLAIM_INTERVAL_S: a survivor looks for expired leases this often.
CLAIM_INTERVAL_S = 0.5


def csv_text(rows: list[str]) -> str:
    return "Col1,Col2\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(rows))


def check_hashed(path: Path, texts: list[str], bits: int = 3) -> None:
    rows = harness.read_csv(path)
    first = rows[0].index("Col2 - Hashing feature 1")
    assert rows[0][first:] == hashing.feature_names("Col2", bits=bits)
    assert [r[1] for r in rows[1:]] == texts
    for row, text in zip(rows[1:], texts, strict=True):
        assert [int(float(v)) for v in row[first:]] == hashing.feature_counts(
            text, bits=bits, ngrams=2), text


def is_pg(db_url: str) -> bool:
    return sa.make_url(db_url).get_backend_name() == "postgresql"


def pg_fetch(db_url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    """A query with plain asyncpg (not our code): what the test sees is what is stored."""
    dsn = sa.make_url(db_url).set(drivername="postgresql").render_as_string(False)

    async def go() -> list[dict[str, Any]]:
        con = await asyncpg.connect(dsn)
        try:
            return [dict(r) for r in await con.fetch(query, *args)]
        finally:
            await con.close()

    return asyncio.run(go())


def _count(db_url: str, where: str, *args: Any) -> int:
    return int(pg_fetch(db_url, f"select count(*) as n from jobs where {where}", *args)[0]["n"])


def with_worker_id(s: harness.Setup, worker_id: str) -> harness.Setup:
    """The same setup under a config file that differs only in daemon.worker_id."""
    cfg = s.root / f"config-{worker_id}.toml"
    cfg.write_text(s.config.read_text().replace(
        "[daemon]\n", f"[daemon]\nworker_id = {json.dumps(worker_id)}\n", 1))
    return dataclasses.replace(s, config=cfg)


def require_pg(database_url: str) -> None:
    if not is_pg(database_url):
        pytest.skip("several daemons on one database: the PostgreSQL case")


# ------------------------------------------------------------------------------------------
# configuration: the password comes from env, and never shows


def test_database_password_from_env_never_shown(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    require_pg(database_url)
    with harness.emulator() as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            db_url=database_url)
        s.config.write_text(s.config.read_text().replace(
            "[database]\n", f"[database]\npassword_env = {json.dumps(DB_PASSWORD_ENV)}\n", 1))
        # Without the variable the daemon does not start, and says which key wants it.
        proc = s.cli("migrate", check=False)
        assert proc.returncode == 78 and "database.password_env" in proc.stderr
        s.env[DB_PASSWORD_ENV] = DB_PASSWORD
        checked = s.cli("config", "check")
        assert json.loads(checked.stdout)["database"]["password"] == "***"
        outputs = [checked.stdout + checked.stderr]
        outputs.append(s.cli("migrate").stdout)
        s.drop("pw.csv", csv_text(TEXTS))
        proc = s.cli("--log-json", "run", "--once")
        outputs.append(proc.stdout + proc.stderr)
        check_hashed(s.results / "pw.output1.csv", TEXTS)
        outputs.append(s.cli("status", "--json").stdout)
        [job] = s.history()
        outputs.append(s.cli("jobs", "show", "--json", job["job_id"]).stdout)
        for text in outputs:
            assert DB_PASSWORD not in text
        # The URL the engine connects with carries it; the form for logs hides it.
        url = db_engine.parse_url(database_url, password=DB_PASSWORD)
        assert url.password == DB_PASSWORD
        assert DB_PASSWORD not in db_engine.safe_url(url) and "***" in db_engine.safe_url(url)
        # A password written into the URL itself is refused, naming the key.
        s.config.write_text(s.config.read_text().replace(
            "postgres@", f"postgres:{DB_PASSWORD}@", 1))
        proc = s.cli("config", "check", check=False)
        assert proc.returncode == 78 and "database.url" in proc.stderr
        assert DB_PASSWORD not in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------------------
# intake: two daemons on one shared folder


def test_two_daemons_on_one_inbox_claim_each_file_once(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    """Same machine, same folder: what two hosts see on a network share. Both watchers offer
    every file; the UNIQUE claim_key lets exactly one daemon make its job."""
    require_pg(database_url)
    n = 40
    with harness.emulator("--run-time-s", "0.1,0.3") as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            db_url=database_url, watch={"settle_s": 0.3})
        s.cli("migrate")
        s.inbox.mkdir()
        daemons = [with_worker_id(s, f"inbox-{c}").start_daemon(log_name=f"daemon-{c}.log")
                   for c in "ab"]
        try:
            harness.wait_for(
                lambda: len(pg_fetch(database_url, "select id from workers")) == 2, 30,
                what="both daemons registered")
            texts = {f"shared-{i:02d}.csv": [f"row {i} from the share", TEXTS[i % 2]]
                     for i in range(n)}
            for name, rows in texts.items():
                s.drop(name, csv_text(rows))
            harness.wait_for(lambda: _count(database_url, "state = 'done'") >= n, 90,
                             what="every file done")
        finally:
            codes = [harness.stop(d) for d in daemons]
        assert codes == [0, 0]
        made = pg_fetch(database_url, "select claim_key, input_name, state, lease_owner "
                                      "from jobs order by input_name")
        assert [r["input_name"] for r in made] == sorted(texts)  # one job per file
        assert all(r["state"] == "done" for r in made)
        claimers = pg_fetch(database_url, "select worker, count(*) as n from job_events "
                                          "where to_state = 'claimed' group by worker")
        assert sum(c["n"] for c in claimers) == n  # one claim each, whoever made it
        stats = emu.stats()
        assert stats["submits"] == n and stats["starts"] == n and stats["double_starts"] == 0
        for name, rows in texts.items():
            check_hashed(s.results / f"{Path(name).stem}.output1.csv", rows)
            assert (s.archive / name).exists()
        assert sorted(p.name for p in s.results.iterdir()) == sorted(
            f"{Path(name).stem}.output1.csv" for name in texts)  # one result each
        assert list(s.inbox.iterdir()) == []


# ------------------------------------------------------------------------------------------
# takeover: three daemons, one SIGKILLed mid-run


def _most_started(db_url: str) -> tuple[str, int]:
    rows = pg_fetch(db_url, "select lease_owner, count(*) as n from jobs where state = "
                            "'started' group by lease_owner order by n desc limit 1")
    return (rows[0]["lease_owner"], int(rows[0]["n"])) if rows else ("", 0)


def test_takeover_after_sigkill_resumes_without_double_start(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    require_pg(database_url)
    n, lease_s, heartbeat_s = 300, 3.0, 1.0
    with harness.emulator("--run-time-s", "1.0,2.0") as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            db_url=database_url,
            service={"max_in_flight": 15, "output_dir": "results", "archive_dir": "archive",
                     "failed_dir": "failed"},
            # At most 150 jobs per daemon: two daemons share the 300 and the third stands by
            # with room, so a takeover is never held up by a full survivor.
            daemon={"lease_s": lease_s, "heartbeat_s": heartbeat_s, "max_jobs_held": 150})
        s.cli("migrate")
        src = tmp_path / "outgoing"
        src.mkdir()
        texts = {f"t{i:03d}.csv": [f"review number {i}", TEXTS[i % 2]] for i in range(n)}
        for name, rows in texts.items():
            (src / name).write_text(csv_text(rows))
        procs = {f"daemon-{c}": with_worker_id(s, f"daemon-{c}").start_daemon(
            log_name=f"daemon-{c}.log") for c in "abc"}
        try:
            harness.wait_for(
                lambda: len(pg_fetch(database_url, "select id from workers")) == 3, 30,
                what="three daemons registered")
            s.cli("submit", *(str(src / name) for name in texts), "--service", "svc")
            harness.wait_for(lambda: _most_started(database_url)[1] >= 5, 60, interval=0.05,
                             what="a daemon holds started BES jobs")
            victim = _most_started(database_url)[0]
            assert harness.stop(procs[victim], signal.SIGKILL) == -signal.SIGKILL
            killed_at = dt.datetime.now(dt.UTC)
            held = {r["id"]: r for r in pg_fetch(
                database_url, "select id, state, lease_expires_at from jobs "
                              "where lease_owner = $1 and state <> all($2)",
                victim, sorted(s.value for s in lifecycle.TERMINAL_STATES))}
            assert any(r["state"] == "started" for r in held.values())
            harness.wait_for(lambda: _count(database_url, "state = 'done'") >= n, 90,
                             what="all jobs done by the survivors")
        finally:
            codes = {w: harness.stop(p) for w, p in procs.items() if w != victim}
        assert list(codes.values()) == [0, 0]
        assert _count(database_url, "state <> 'done'") == 0
        # Exact results for every file, each exactly once.
        for name, rows in texts.items():
            check_hashed(s.results / f"{Path(name).stem}.output1.csv", rows)
            assert (s.archive / name).exists()
        assert len(list(s.results.iterdir())) == n
        # No BES job started twice: the survivors polled what the victim had started.
        stats = emu.stats()
        assert stats["starts"] == n and stats["double_starts"] == 0
        # Every job the victim held shows the takeover, by a survivor, not before its lease
        # expired and soon after (one claim interval, plus slack for a busy 2-core machine).
        takeovers = {t["job_id"]: t for t in pg_fetch(
            database_url, "select job_id, at, worker, message from job_events "
                          "where message like $1 order by id", f"lease of {victim} expired;%")}
        assert set(takeovers) == set(held)
        survivors = set(procs) - {victim}
        delays = []
        for job_id, t in takeovers.items():
            expiry = held[job_id]["lease_expires_at"]
            assert expiry <= killed_at + dt.timedelta(seconds=lease_s)
            assert t["worker"] in survivors
            assert t["message"] == f"lease of {victim} expired; taken over by {t['worker']}"
            assert expiry <= t["at"] <= expiry + dt.timedelta(seconds=CLAIM_INTERVAL_S + 1.0), (
                t, expiry)
            delays.append((t["at"] - killed_at).total_seconds())
        print(f"takeover: {len(held)} jobs held by {victim} "
              f"({sum(r['state'] == 'started' for r in held.values())} started) taken over "
              f"{min(delays):.2f}-{max(delays):.2f} s after SIGKILL (lease {lease_s} s); "
              f"by {sorted({t['worker'] for t in takeovers.values()})}")
        # Through the CLI as well: `jobs show --json` lists the takeover event.
        shown = json.loads(s.cli("jobs", "show", "--json", next(iter(takeovers))).stdout)
        assert any(e["message"].startswith(f"lease of {victim} expired; taken over by ")
                   for e in shown["events"])


# ------------------------------------------------------------------------------------------
# db copy: an existing SQLite history into a new database


async def _make_sqlite_history(url: str) -> dict[str, Any]:
    """A small history through the repository: a finished job with events, an active job
    leased to a worker, and queue rows (one claimed, one not)."""
    await migrate.upgrade(url)
    repo = await repository.Repository.open(url)
    now = dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
    try:
        await repo.register_worker("old-host-1", host="old-host", pid=1, now=now)
        done = await repo.create_job(
            jobs.NewJob(id="a" * 32, service="svc", watch="w", claim_key="w:a.csv:1:2:3",
                        source_path="/in/a.csv", input_name="a.csv", output_dir="/out",
                        archive_dir="/arch", failed_dir="/fail"),
            worker_id="old-host-1", now=now, lease_s=30)
        assert done is not None
        for expected, to in ((lifecycle.JobState.CLAIMED, lifecycle.JobState.FAILING),
                             (lifecycle.JobState.FAILING, lifecycle.JobState.FAILED)):
            assert await repo.apply(
                [jobs.Transition(job_id=done.id, expected=expected, to=to, message=f"to {to}",
                                 fields={"error": "boom", "error_code": "X"})],
                worker_id="old-host-1", now=now) == [repository.Applied()]
        await repo.enqueue(["/in/q1.csv", "/in/q2.csv"], service="svc", now=now)
        claimed = await repo.claim_queue(
            worker_id="old-host-1", now=now, lease_s=30, limit=1,
            make_job=lambda item: jobs.NewJob(
                id="b" * 32, service=item.service, watch=None, claim_key=f"queue:{item.id}",
                source_path=item.path, input_name=Path(item.path).name, output_dir="/out",
                archive_dir="/arch", failed_dir="/fail"))
        assert [j.id for j in claimed] == ["b" * 32]
        return {
            "jobs": {j.id: j for j in await repo.list_jobs()},
            "events": {j: await repo.events(j) for j in ("a" * 32, "b" * 32)},
            "history": await repo.history(),
        }
    finally:
        await repo.close()


async def _read_target(url: str) -> dict[str, Any]:
    repo = await repository.Repository.open(url)
    try:
        await repo.check_schema()
        return {
            "jobs": {j.id: j for j in await repo.list_jobs()},
            "events": {j: await repo.events(j) for j in ("a" * 32, "b" * 32)},
            "history": await repo.history(),
            "workers": await _count_workers(url),
            # New rows after the copy get fresh ids (the sequences moved past the copied ones).
            "new_queue_ids": await repo.enqueue(["/in/q3.csv"], service="svc",
                                                now=dt.datetime.now(dt.UTC)),
            "claimable": await repo.claim_due(worker_id="new-host-1",
                                              now=dt.datetime.now(dt.UTC), lease_s=30, limit=10),
        }
    finally:
        await repo.close()


async def _count_workers(url: str) -> int:
    engine = db_engine.create_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(sa.text("select count(*) from workers"))).scalar_one())
    finally:
        await engine.dispose()


def test_db_copy_moves_a_sqlite_history_and_refuses_a_non_empty_target(
    tmp_path: Path, database_url: str
) -> None:
    source_url = f"sqlite+aiosqlite:///{tmp_path / 'old' / 'history.db'}"
    (tmp_path / "old").mkdir()
    before = asyncio.run(_make_sqlite_history(source_url))
    target_url = database_url if is_pg(database_url) else (
        f"sqlite+aiosqlite:///{tmp_path / 'new.db'}")
    src = harness.make_setup(tmp_path / "old", emulator_url="http://127.0.0.1:1",
                             storage_connection_string="UseDevelopmentStorage=true",
                             db_url=source_url)

    def copy_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*harness.cli_cmd(), "db", "copy", *args], env=src.env,
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)

    # The target is migrated by the copy itself (a fresh database has no schema yet).
    proc = copy_cli("-c", str(src.config), "--to", target_url)
    assert proc.returncode == 0, proc.stderr
    n_events = sum(len(e) for e in before["events"].values())
    assert f"copied 2 jobs, {n_events} events, 2 queue rows" in proc.stdout
    after = asyncio.run(_read_target(target_url))
    assert set(after["jobs"]) == set(before["jobs"])
    for job_id, old in before["jobs"].items():
        new = after["jobs"][job_id]
        if old.state in lifecycle.ACTIVE_STATES:
            # Leases belong to the old database's processes: the copy arrives unleased.
            assert old.lease_owner == "old-host-1" and new.lease_owner is None
            assert new.lease_expires_at is None
            old = dataclasses.replace(old, lease_owner=None, lease_expires_at=None)
        assert new == old
    assert after["events"] == before["events"]
    # The job_history view reads the same, but for the lease holder of the active job.
    assert after["history"] == [
        {**h, "worker": None if h["state"] in lifecycle.ACTIVE_STATES else h["worker"]}
        for h in before["history"]]
    assert after["workers"] == 0
    assert after["new_queue_ids"] == [3]
    # The active job is picked up by a daemon on the new database at the step it had reached.
    assert [(j.id, j.state, j.attempts) for j in after["claimable"]] == [
        ("b" * 32, lifecycle.JobState.CLAIMED, 2)]
    # A second copy would mix two histories: refused, nothing written.
    proc = copy_cli("--from", source_url, "--to", target_url,
                    "--to-password-env", DB_PASSWORD_ENV)
    assert proc.returncode == 78 and DB_PASSWORD_ENV in proc.stderr  # the variable is unset
    src.env[DB_PASSWORD_ENV] = DB_PASSWORD
    proc = copy_cli("--from", source_url, "--to", target_url,
                    "--to-password-env", DB_PASSWORD_ENV)
    if not is_pg(target_url):
        assert proc.returncode == 2 and "SQLite database has no password" in proc.stderr
        proc = copy_cli("--from", source_url, "--to", target_url)
    assert proc.returncode == 1
    assert "already has" in proc.stderr and "empty database" in proc.stderr
    assert DB_PASSWORD not in proc.stdout + proc.stderr
    assert len(asyncio.run(_read_target(target_url))["jobs"]) == 2
    # A missing source is an error, not a new empty file.
    proc = copy_cli("--from", f"sqlite+aiosqlite:///{tmp_path / 'nope.db'}", "--to", target_url)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    assert not (tmp_path / "nope.db").exists()


async def test_copy_refuses_a_source_behind_the_schema(tmp_path: Path) -> None:
    source_url = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    (tmp_path / "empty.db").touch()
    with pytest.raises(errors.DatabaseVersionError, match="migrate"):
        await copy_mod.copy_history(source_url, f"sqlite+aiosqlite:///{tmp_path / 't.db'}")
    assert not (tmp_path / "t.db").exists()  # the target is left alone


def test_timing_bound_matches_the_worker() -> None:
    """The takeover test's bound assumes the worker's claim interval."""
    from orchestrator import worker

    assert worker.CLAIM_INTERVAL_S == CLAIM_INTERVAL_S
