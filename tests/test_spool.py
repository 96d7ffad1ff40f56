"""The spool describes itself: a spooled input whose job row is gone (database deleted or
replaced) is registered again at start and processed; nothing is stranded. Real SQLite files,
real folders; the end-to-end case runs the daemon, SIGKILLs it and deletes its database."""

# The tests play the operator: blocking file calls in them are the point, not a slip.

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from orchestrator import clock, config, jobs, lifecycle, spool
from orchestrator.db import migrate, repository
from orchestrator.steps import claim
from tests import harness
from tests import test_crash as crash


def _settings(root: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> config.Settings:
    monkeypatch.setenv("T_STORAGE", "UseDevelopmentStorage=true")
    monkeypatch.setenv("T_KEY", "k" * 20)
    data = {
        "daemon": {"state_dir": "state", "worker_id": "w1"},
        "database": {"url": db_url},
        "storage": {"connection_string_env": "T_STORAGE", "container": "bes-test"},
        "services": {"svc": {"base_url": "http://127.0.0.1:9", "workspace": "ws",
                             "service": "s", "api_key_env": "T_KEY"}},
        "watch": [{"folder": "inbox", "pattern": "*.csv", "service": "svc"}],
    }
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    return config.parse(data, base=root)


async def _fresh_repo(url: str) -> repository.Repository:
    await migrate.upgrade(url)
    return await repository.Repository.open(url)


async def _claimed(repo: repository.Repository, settings: config.Settings,
                   new: jobs.NewJob) -> jobs.Job:
    job = await repo.create_job(new, worker_id="w1", now=clock.now(), lease_s=30)
    assert job is not None
    claim._claim(job, Path(job.source_path), claim.spool_path(settings.daemon.spool_dir, job),
                 settings.daemon.spool_dir)
    return job


async def test_recover_registers_spooled_inputs_without_a_job_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = f"sqlite+aiosqlite:///{tmp_path / 'first.db'}"
    settings = _settings(tmp_path, first, monkeypatch)
    spool_dir = settings.daemon.spool_dir
    watched = tmp_path / "inbox" / "Données 1.CSV"
    watched.write_text("Col1,Col2\n1,a\n")
    queued = tmp_path / "elsewhere.csv"
    queued.write_text("Col1,Col2\n2,b\n")
    repo = await _fresh_repo(first)
    try:
        w = watched.stat()
        wjob = await _claimed(repo, settings, jobs.NewJob(
            id="a" * 32, service="svc", watch="watch-0",
            claim_key=f"watch-0:{watched.name}:{w.st_ino}:{w.st_size}:{w.st_mtime_ns}",
            source_path=str(watched), input_name=watched.name, output_dir="/o",
            archive_dir="/a", failed_dir="/f"))
        qjob = await _claimed(repo, settings, jobs.NewJob(
            id="b" * 32, service="svc", watch=None, claim_key="queue:1",
            source_path=str(queued), input_name=queued.name, output_dir="/o2",
            archive_dir="/a2", failed_dir="/f2"))
    finally:
        await repo.close()
    assert not watched.exists() and not queued.exists()
    wspooled = spool_dir / f"{'a' * 32}.csv"
    assert wspooled.exists() and (spool_dir / f"{'a' * 32}{spool.RECORD_SUFFIX}").exists()
    record = json.loads((spool_dir / f"{'a' * 32}{spool.RECORD_SUFFIX}").read_text())
    assert record["input_name"] == "Données 1.CSV" and record["watch"] == "watch-0"
    assert record["input_size"] == len("Col1,Col2\n1,a\n")
    # An input from an older program, with no record: it cannot be rebuilt, and is left alone.
    unknown = spool_dir / f"{'c' * 32}.csv"
    unknown.write_text("Col1,Col2\n3,c\n")

    # The database is lost: a new, empty one.
    second = f"sqlite+aiosqlite:///{tmp_path / 'second.db'}"
    settings2 = _settings(tmp_path, second, monkeypatch)
    repo = await _fresh_repo(second)
    try:
        assert await spool.recover(settings2, repo) == 2
        assert await spool.recover(settings2, repo) == 0  # once only
        got = {j.id: j for j in await repo.list_jobs()}
        assert set(got) == {wjob.id, qjob.id}
        for old in (wjob, qjob):
            new = got[old.id]
            assert new.state is lifecycle.JobState.CLAIMED
            assert (new.input_name, new.service, new.watch) == (
                old.input_name, old.service, old.watch)
            assert (new.output_dir, new.archive_dir, new.failed_dir) == (
                old.output_dir, old.archive_dir, old.failed_dir)
            assert Path(new.input_path).parent == spool_dir  # the history says where it is
            assert new.lease_owner == spool.RECOVERY_OWNER
        # Any worker claims them at once (the recovery owner's lease has already expired).
        taken = await repo.claim_due(worker_id="w2", now=clock.now(), lease_s=30, limit=10)
        assert {j.id for j in taken} == {wjob.id, qjob.id}
        # The claim step finds the input already in the spool and completes.
        rebuilt = got[wjob.id]
        digest, size = claim._claim(rebuilt, Path(rebuilt.source_path),
                                    claim.spool_path(spool_dir, rebuilt), spool_dir)
        assert (digest, size) == (record["input_sha256"], record["input_size"])
        assert wspooled.exists()
    finally:
        await repo.close()
    assert unknown.exists()


async def test_recover_ignores_inputs_whose_job_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    settings = _settings(tmp_path, url, monkeypatch)
    f = tmp_path / "inbox" / "x.csv"
    f.write_text("Col1,Col2\n1,a\n")
    repo = await _fresh_repo(url)
    try:
        await _claimed(repo, settings, jobs.NewJob(
            id="d" * 32, service="svc", watch=None, claim_key="queue:9", source_path=str(f),
            input_name="x.csv", output_dir="/o", archive_dir="/a", failed_dir="/f"))
        assert await spool.recover(settings, repo) == 0
    finally:
        await repo.close()


@pytest.mark.slow
def test_database_deleted_under_a_spool_every_input_is_processed(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    n = 6
    with harness.emulator("--run-time-s", "60") as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string)
        s.cli("migrate")
        for i in range(n):
            s.drop(f"in{i}.csv", crash.csv_text(crash.texts_for(i)))
        daemon = s.start_daemon()
        try:
            harness.wait_for(
                lambda: sum(h["state"] == "started" for h in s.history()) == n, 90,
                what="every job started (its input in the spool)")
        finally:
            harness.stop(daemon, signal.SIGKILL)
        spool_dir = tmp_path / "state" / "spool"
        assert len(list(spool_dir.glob("*.csv"))) == n and not list(s.inbox.glob("*.csv"))
        for p in tmp_path.glob("state.db*"):
            p.unlink()
        s.cli("migrate")
        emu.configure(run_time_s=[0.1, 0.1])
        # A new, empty database: the daemon finds the inputs in its spool at start.
        proc = s.cli("run", "--once", timeout=110, check=False)
        hist = s.history()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert len(hist) == n and all(h["state"] == "done" for h in hist), hist
        for i in range(n):
            crash.check_result(s.results / f"in{i}.output1.csv", crash.texts_for(i))
            assert (s.archive / f"in{i}.csv").exists()
        assert not list(spool_dir.iterdir())  # inputs and their records are gone
