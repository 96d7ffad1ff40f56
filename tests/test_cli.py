"""The operators' commands as people and scripts use them: the real CLI in a subprocess, real
SQLite files, a real second Unix user where a permission must really be refused (we run as
root, whom no permission stops)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from orchestrator import clock, jobs, lifecycle
from orchestrator.db import migrate, repository
from orchestrator.steps import finish
from tests import harness
from tests import test_claim_user as users_mod

#: Secrets the config names but the environment does not hold: database-only commands must
#: not need them.
CONFIG = """
[daemon]
state_dir = "state"
[database]
url = "sqlite+aiosqlite:///{db}"
[storage]
connection_string_env = "BES_TEST_CLI_UNSET_STORAGE"
[services.svc]
base_url = "http://127.0.0.1:9"
workspace = "ws"
service = "s"
api_key_env = "BES_TEST_CLI_UNSET_KEY"
[[watch]]
folder = "inbox-that-is-not-there"
service = "svc"
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BES_TEST_CLI_")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    return {**env, "PYTHONPATH": str(harness.ROOT)}


def _cli(cfg: Path, *args: str, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*harness.cli_cmd(), *args, "-c", str(cfg)], env=env or _env(),
                          capture_output=True, text=True, timeout=60, cwd=cfg.parent,
                          check=False)


def _config(root: Path, db: Path) -> Path:
    cfg = root / "config.toml"
    cfg.write_text(CONFIG.format(db=db))
    return cfg


async def _make_db(url: str, names: list[str]) -> None:
    await migrate.upgrade(url)
    repo = await repository.Repository.open(url)
    try:
        for i, name in enumerate(names):
            await repo.create_job(jobs.NewJob(
                id=f"{i:032x}", service="svc", watch=None, claim_key=f"queue:{i}",
                source_path=f"/in/{name}", input_name=name, output_dir="/o",
                archive_dir="/a", failed_dir="/f"), worker_id="w1", now=clock.now(),
                lease_s=30)
    finally:
        await repo.close()


# --------------------------------------------------------------------------------------------
# Database-only commands need no secret and create no database


def test_status_and_jobs_need_no_secret_of_the_daemon(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    asyncio.run(_make_db(f"sqlite+aiosqlite:///{db}", ["a.csv"]))
    cfg = _config(tmp_path, db)
    for args in (["status"], ["status", "--json"], ["jobs", "list"],
                 ["jobs", "show", "0000"], ["jobs", "cancel", "0000"]):
        proc = _cli(cfg, *args)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    # The daemon itself still needs them: one line naming the key.
    proc = _cli(cfg, "run", "--once")
    assert proc.returncode == 78 and "BES_TEST_CLI_UNSET" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [["status"], ["jobs", "list"], ["jobs", "show", "abcd"],
                                  ["jobs", "retry", "abcd"]])
def test_database_commands_do_not_create_a_missing_database(
    tmp_path: Path, args: list[str]
) -> None:
    db = tmp_path / "state" / "state.db"
    cfg = _config(tmp_path, db)
    proc = _cli(cfg, *args)
    assert proc.returncode == 78, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        f"config error: database.url: no database at {db} (run `bes-orchestrator migrate` "
        "first, or check database.url)")
    assert not db.exists() and not db.parent.exists()


# --------------------------------------------------------------------------------------------
# A database the user cannot write: one line, exit 78 (not a 200-line traceback)


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """Outside pytest's tmp_path, which only root may enter."""
    d = Path(tempfile.mkdtemp(prefix="bes-cli-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to become another user")
@pytest.mark.parametrize("db_exists", [False, True], ids=["no-file", "file-writable"])
def test_a_database_folder_the_user_cannot_write_is_one_line_and_78(
    shared_root: Path, db_exists: bool
) -> None:
    users = users_mod.ensure_users()
    who = users.daemon
    folder = shared_root / "db"
    folder.mkdir(mode=0o755)  # root's: the other user cannot create state.db-wal in it
    db = folder / "state.db"
    if db_exists:  # the traceback case: the file is the user's, its folder is not
        asyncio.run(_make_db(f"sqlite+aiosqlite:///{db}", ["a.csv"]))
        for p in folder.iterdir():
            os.chown(p, who.pw_uid, who.pw_gid)
    state = shared_root / "state"
    state.mkdir()
    os.chown(state, who.pw_uid, who.pw_gid)
    cfg = _config(shared_root, db)
    cfg.chmod(0o644)
    python, path = users_mod.python_for(who)
    env = {**_env(), "PYTHONPATH": path, "HOME": str(shared_root),
           "BES_TEST_CLI_UNSET_STORAGE": "UseDevelopmentStorage=true",
           "BES_TEST_CLI_UNSET_KEY": "k" * 20}
    (shared_root / "inbox-that-is-not-there").mkdir()
    commands = [["migrate"], ["run", "--once"], ["status"], ["jobs", "list"]]
    if not db_exists:
        commands = [["migrate"], ["run", "--once"]]  # status/jobs: "no database at" (above)
    for args in commands:
        proc = subprocess.run([*users_mod.as_user(who), python, "-m", "orchestrator", *args,
                               "-c", str(cfg)], env=env, capture_output=True, text=True,
                              timeout=60, cwd=shared_root, check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 78, (args, proc.stdout, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("config error: database.url: "), (
            args, proc.stderr[-2000:])
        assert str(folder) in lines[0], lines


# --------------------------------------------------------------------------------------------
# submit


def test_submit_the_same_file_twice_queues_it_once(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    asyncio.run(_make_db(f"sqlite+aiosqlite:///{db}", []))
    cfg = _config(tmp_path, db)
    data = tmp_path / "a.csv"
    data.write_text("Col1,Col2\n1,x\n")
    (tmp_path / "link.csv").symlink_to(data)
    proc = _cli(cfg, "submit", "a.csv", "a.csv", "./a.csv", str(data), "link.csv",
                "--service", "svc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"queued {data} (queue id 1)"]
    assert proc.stderr.count("skipped") == 4

    async def queue() -> list[str]:
        repo = await repository.Repository.open(f"sqlite+aiosqlite:///{db}")
        try:
            got = await repo.claim_queue(
                worker_id="w", now=clock.now(), lease_s=30, limit=10,
                make_job=lambda item: jobs.NewJob(
                    id=f"{item.id:032x}", service=item.service, watch=None,
                    claim_key=f"queue:{item.id}", source_path=item.path,
                    input_name=Path(item.path).name, output_dir="/o", archive_dir="/a",
                    failed_dir="/f"))
            return [j.source_path for j in got]
        finally:
            await repo.close()

    assert asyncio.run(queue()) == [str(data)]


# --------------------------------------------------------------------------------------------
# Output for people


def test_jobs_list_piped_prints_every_value_in_full(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    long_name = "a-rather-long-input-name-" + "x" * 90 + ".csv"
    asyncio.run(_make_db(f"sqlite+aiosqlite:///{db}", [long_name, "[red]markup[/red].csv"]))
    cfg = _config(tmp_path, db)
    proc = _cli(cfg, "jobs", "list")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert long_name in out
    assert "[red]markup[/red].csv" in out  # a name is text, not rich markup
    listed = json.loads(_cli(cfg, "jobs", "list", "--json").stdout)
    for j in listed:
        assert j["created_at"] in out  # `2026-11-30T16:…Z`, never `2026-11-30T1…`
    assert "…" not in out
    status = _cli(cfg, "status").stdout
    # The oldest job's line is one line, whole (health lines follow it).
    [oldest] = [ln for ln in status.splitlines() if ln.startswith("oldest in flight: ")]
    assert oldest.startswith("oldest in flight: 00000000") and oldest.endswith(" s old)"), status


def _failed_job(error: str | None, code: str | None) -> jobs.Job:
    now = clock.now()
    return jobs.Job(
        id="f" * 32, state=lifecycle.JobState.FAILING, service="svc", watch="inbox",
        claim_key="k", source_path="/in/x.csv", input_name="x.csv", input_path="/s/x.csv",
        input_sha256=None, input_size=None, output_dir="/o", archive_dir="/a",
        failed_dir="/f", bes_job_id=None, bes_status=None, result_refs={}, outputs={},
        error=error, error_code=code, attempts=1, runs=1, poll_count=0, resubmits=0,
        cancel_requested=False, lease_owner=None, lease_expires_at=None, next_run_at=now,
        deadline_at=None, created_at=now, updated_at=now, submitted_at=None,
        started_at=None, finished_at=None)


def test_error_file_is_sentences_a_person_can_read() -> None:
    text = finish.error_text(
        _failed_job("cannot write /r/x.output1.csv: No space left on device", "ResultUnwritable"),
        lifecycle.JobState.FAILED)
    lines = text.splitlines()
    assert lines[0] == "The job for x.csv failed."
    assert "Reason: cannot write /r/x.output1.csv: No space left on device." in lines
    assert "Error code: ResultUnwritable." in lines
    assert "BES job id: none (the job was never submitted)." in lines
    assert lines[-1] == "To run it again: bes-orchestrator jobs retry ffffffff"
    assert "device Error code" not in text

    cancelled = finish.error_text(_failed_job(None, None), lifecycle.JobState.CANCELLED)
    assert cancelled.splitlines()[0] == "The job for x.csv was cancelled."
    assert "It was cancelled on request (bes-orchestrator jobs cancel)." in cancelled
    assert "no reason was recorded" not in cancelled and "Error code: -" not in cancelled


@pytest.mark.postgres
def test_status_reads_only_the_database_password(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL with a password: the one secret a database-only command reads."""
    asyncio.run(_make_db(pg_url, ["a.csv"]))
    cfg = tmp_path / "config.toml"
    cfg.write_text(CONFIG.replace('url = "sqlite+aiosqlite:///{db}"',
                                  f'url = "{pg_url}"\npassword_env = "BES_TEST_CLI_DB_PW"'))
    env = {**_env(), "BES_TEST_CLI_DB_PW": "trust-auth-ignores-it"}
    proc = _cli(cfg, "status", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["counts"]["claimed"] == 1
    proc = _cli(cfg, "status")  # without it: one line naming the database's key
    assert proc.returncode == 78 and "database.password_env" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    from tests import conftest

    name = await conftest._create_pg_database()
    try:
        yield conftest._pg_url(name)
    finally:
        await conftest._drop_pg_database(name)
