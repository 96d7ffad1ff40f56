"""The spool describes itself: a spooled input whose job row is gone (database deleted or
replaced) is registered again at start and processed; nothing is stranded. Real SQLite files,
real folders; the end-to-end case runs the daemon, SIGKILLs it and deletes its database."""

# The tests play the operator: blocking file calls in them are the point, not a slip.

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from orchestrator import clock, config, errors, fsutil, jobs, lifecycle, spool
from orchestrator.db import migrate, repository
from orchestrator.steps import claim
from orchestrator.storage import naming
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
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str
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

    # The database is lost: a new, empty one (SQLite or PostgreSQL).
    second = database_url
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


# --------------------------------------------------------------------------------------------
# The claim step's two ways into the spool (real files; the other-user case runs as another
# user in tests/test_claim_user.py)


def _job_for(path: Path, *, job_id: str = "e" * 32, watch: str | None = "w") -> jobs.Job:
    st = path.stat()
    now = clock.now()
    key = f"{watch}:{path.name}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" if watch else "queue:1"
    return jobs.Job(
        id=job_id, state=lifecycle.JobState.CLAIMED, service="svc", watch=watch, claim_key=key,
        source_path=str(path), input_name=path.name, input_path=str(path), input_sha256=None,
        input_size=None, output_dir="/o", archive_dir="/a", failed_dir="/f", bes_job_id=None,
        bes_status=None, result_refs={}, outputs={}, error=None, error_code=None, attempts=1,
        runs=1, poll_count=0, resubmits=0, cancel_requested=False, lease_owner="w1",
        lease_expires_at=None, next_run_at=now, deadline_at=None, created_at=now,
        updated_at=now, submitted_at=None, started_at=None, finished_at=None)


def test_claim_renames_the_daemons_own_file_and_makes_it_private(tmp_path: Path) -> None:
    src = tmp_path / "in" / "a.CSV"
    src.parent.mkdir()
    src.write_text("Col1,Col2\n1,a\n")
    inode = src.stat().st_ino
    spool_dir = tmp_path / "spool"
    job = _job_for(src)
    target = claim.spool_path(spool_dir, job)
    claim._claim(job, src, target, spool_dir)
    assert target.name == f"{job.id}.csv" and not src.exists()
    assert target.stat().st_ino == inode and target.stat().st_mode & 0o777 == 0o600
    record = spool.read_record(spool.record_path(spool_dir, job.id))
    assert (record.input_name, record.input_size) == ("a.CSV", len("Col1,Col2\n1,a\n"))


def test_claim_copies_a_file_with_other_links_and_leaves_them(tmp_path: Path) -> None:
    """A second hard link could change the bytes after the claim: the spool gets a copy."""
    src = tmp_path / "in" / "a.csv"
    src.parent.mkdir()
    src.write_text("Col1,Col2\n1,a\n")
    other = tmp_path / "elsewhere.csv"
    os.link(src, other)
    spool_dir = tmp_path / "spool"
    job = _job_for(src)
    target = claim.spool_path(spool_dir, job)
    digest, size = claim._claim(job, src, target, spool_dir)
    assert not src.exists() and other.read_text() == "Col1,Col2\n1,a\n"
    assert target.stat().st_ino != other.stat().st_ino and target.stat().st_nlink == 1
    assert (digest, size) == fsutil.sha256_file(target)
    assert not [p for p in spool_dir.iterdir() if p.name.startswith(".")]  # no temp left


def test_claim_resumed_after_a_crash_between_copy_and_removal(tmp_path: Path) -> None:
    """The copy reached the spool, the original was not removed yet: the resumed claim
    removes that original (same file version), never a new file dropped under its name."""
    src = tmp_path / "in" / "a.csv"
    src.parent.mkdir()
    src.write_text("Col1,Col2\n1,a\n")
    spool_dir = tmp_path / "spool"
    job = _job_for(src)
    target = claim.spool_path(spool_dir, job)
    spool_dir.mkdir()
    shutil.copyfile(src, target)  # as the interrupted claim left it
    claim._claim(job, src, target, spool_dir)
    assert not src.exists() and spool.record_path(spool_dir, job.id).exists()

    src.write_text("Col1,Col2\n2,a newer file under the same name\n")  # another version
    claim._claim(job, src, target, spool_dir)
    assert src.exists()


def test_claim_of_a_vanished_input_fails_and_leaves_nothing_in_the_spool(tmp_path: Path) -> None:
    src = tmp_path / "in" / "gone.csv"
    src.parent.mkdir()
    src.write_text("x")
    job = _job_for(src)
    src.unlink()
    spool_dir = tmp_path / "spool"
    with pytest.raises(errors.PermanentError) as info:
        claim._claim(job, src, claim.spool_path(spool_dir, job), spool_dir)
    assert info.value.code == "InputVanished"
    assert not spool_dir.exists() or not list(spool_dir.iterdir())


def test_a_resumed_claim_removes_what_a_killed_one_left(tmp_path: Path) -> None:
    src = tmp_path / "in" / "a.csv"
    src.parent.mkdir()
    src.write_text("Col1,Col2\n1,a\n")
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    job = dataclasses.replace(_job_for(src), attempts=2)
    target = claim.spool_path(spool_dir, job)
    left = [naming.temp_name(target), naming.temp_name(spool.record_path(spool_dir, job.id))]
    for p in left:
        p.write_text("half")
    claim._claim(job, src, target, spool_dir)
    assert sorted(p.name for p in spool_dir.iterdir()) == sorted(
        [target.name, spool.record_path(spool_dir, job.id).name])
