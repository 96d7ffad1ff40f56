"""Batch endpoints (`kind = "batch_endpoint"`) end to end: the real CLI as a subprocess, the
emulator's scoring, ARM and managed-identity planes over HTTP (tokens through azure-identity's
own code path), real Azurite for the datastore, SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from orchestrator import azurite as azurite_mod
from orchestrator.emulator import process
from tests import harness
from tests.test_daemon import TEXTS, check_hashed, csv_text

pytestmark = pytest.mark.slow

IDENTITY_SECRET = "identity-header-secret-5f3c9a"
WORKSPACE = ("/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/rg1/providers/"
             "Microsoft.MachineLearningServices/workspaces/ws1")
CONTAINER = "bes-test"  # the datastore's container is the daemon's own, on Azurite


@contextlib.contextmanager
def emulator(azurite: azurite_mod.Azurite, *args: str) -> Iterator[harness.Emulator]:
    env = {"BES_EMULATOR_BE_STORAGE": azurite.connection_string,
           "BES_EMULATOR_IDENTITY_HEADER": IDENTITY_SECRET, process.API_KEY_ENV: harness.API_KEY}
    with process.spawn("--be-container", CONTAINER, *args, env=env) as (url, proc):
        yield harness.Emulator(url=url, proc=proc, args=list(args))


def setup(
    root: Path, emu: harness.Emulator, azurite: azurite_mod.Azurite, *,
    db_url: str | None = None, service: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
) -> harness.Setup:
    root.mkdir(parents=True, exist_ok=True)
    db_url = db_url or f"sqlite+aiosqlite:///{root / 'state.db'}"
    svc = {
        "kind": "batch_endpoint", "scoring_uri": f"{emu.url}/endpoints/hashing/jobs",
        "workspace_id": WORKSPACE, "arm_url": emu.url, "datastore": "workspaceblobstore",
        "input_name": "input_data", "output_name": "output1", "max_in_flight": 20,
        "invoke_lookup_grace_s": 2.0,
        "poll": {"initial_s": 0.2, "multiplier": 1.5, "max_s": 1.0, "jitter": 0.1},
        "retry": {"initial_s": 0.2, "multiplier": 2.0, "max_s": 2.0},
        "credential": {"type": "managed_identity"},
        **(service or {}),
    }
    d = {"state_dir": "state", "heartbeat_s": 1.0, "lease_s": 5.0, "rescan_s": 2.0,
         **(daemon or {})}
    text = (harness.table("daemon", d) + harness.table("database", {"url": db_url})
            + harness.table("storage", {"connection_string_env": harness.STORAGE_ENV,
                                        "container": CONTAINER})
            + harness.table("http", {"listen": ""}) + harness.table("services.be", svc)
            + harness.table("[watch]", {"folder": "inbox", "service": "be", "settle_s": 0.2,
                                        "create": True}))
    cfg = root / "config.toml"
    cfg.write_text(text)
    env = {**os.environ, harness.STORAGE_ENV: azurite.connection_string,
           "IDENTITY_ENDPOINT": f"{emu.url}/msi/token", "IDENTITY_HEADER": IDENTITY_SECRET,
           "PYTHONPATH": str(harness.ROOT)}
    return harness.Setup(root=root, config=cfg, env=env, db_url=db_url)


def batch_stats(emu: harness.Emulator) -> dict[str, Any]:
    stats = emu.stats()["batch"]
    assert isinstance(stats, dict)
    return stats


def secrets_absent(s: harness.Setup, azurite: azurite_mod.Azurite, *extra: str) -> None:
    """No managed-identity secret, storage key or bearer token in any file the run left."""
    key = azurite.connection_string.split("AccountKey=")[1].split(";")[0]
    needles = [IDENTITY_SECRET.encode(), key.encode(), b"Bearer ", b"sig=",
               *(e.encode() for e in extra)]
    for path in s.root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"{needle[:12]!r}… found in {path}"


def test_files_become_batch_jobs_with_exact_results_and_history(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    with emulator(azurite, "--prepare-s", "0.2", "--run-time-s", "0.3",
                  "--token-lifetime-s", "2") as emu:
        s = setup(tmp_path, emu, azurite, db_url=database_url)
        s.cli("migrate")
        names = [f"reviews {i}.csv" for i in range(6)]
        for n in names:
            s.drop(n, csv_text(TEXTS))
        proc = s.cli("--log-json", "run", "--once", timeout=180)
        assert "6 done, 0 failed" in proc.stdout, proc.stdout + proc.stderr
        for n in names:
            check_hashed(s.results / f"{Path(n).stem}.output1.csv", TEXTS)
            assert (s.archive / n).exists()
        rows = s.history()
        assert len(rows) == 6
        assert all(r["state"] == "done" and r["bes_job_id"].startswith("batchjob-")
                   for r in rows), rows
        assert len({r["bes_job_id"] for r in rows}) == 6
        stats = batch_stats(emu)
        assert stats["invokes"] == 6 and stats["submissions_invoked_twice"] == 0
        assert stats["tokens_issued"] >= 2  # short-lived tokens were refreshed by the library
        secrets_absent(s, azurite)
        (tmp_path / "run.log").write_text(proc.stdout + proc.stderr)
        secrets_absent(s, azurite)


def test_a_bad_input_fails_with_the_status_and_the_studio_url(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with emulator(azurite) as emu:
        s = setup(tmp_path, emu, azurite)
        s.cli("migrate")
        s.drop("nocol.csv", "Col1,Other\n1,hello\n")
        proc = s.cli("run", "--once", timeout=120, check=False)
        assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout + proc.stderr
        assert (s.failed / "nocol.csv").exists()
        text = (s.failed / "nocol.csv.error.txt").read_text()
        assert "Failed" in text and "batchjob-" in text and "http" in text, text
        [row] = s.history()
        assert row["state"] == "failed" and row["error_code"] == "BatchJobFailed"


def test_timeout_cancels_through_arm_and_fails_timeout(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with emulator(azurite, "--run-time-s", "60") as emu:
        s = setup(tmp_path, emu, azurite, service={"job_timeout_s": 2.0})
        s.cli("migrate")
        s.drop("slow.csv", csv_text(TEXTS))
        proc = s.cli("run", "--once", timeout=120, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        [row] = s.history()
        assert row["state"] == "failed" and row["error_code"] == "Timeout", row
        remote = emu.get(f"/_emulator/batch/jobs/{row['bes_job_id']}")
        assert "CancelRequested" in remote["history"], remote
        assert batch_stats(emu)["cancels"] == 1


def test_faults_together_fail_only_injected_jobs_and_invoke_nothing_twice(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    """429 on ARM (a small read bucket), 503s, dropped connections (half after the invoke took
    effect) and NotResponding detours at once."""
    with emulator(azurite, "--run-time-s", "0.2,0.6", "--arm-reads", "10/5",
                  "--error-503-rate", "0.1", "--retry-after-s", "1", "--drop-rate", "0.1",
                  "--not-responding-rate", "0.3", "--not-responding-s", "0.5",
                  "--failure-rate", "0.05") as emu:
        s = setup(tmp_path, emu, azurite, service={"arm_reads_per_s": 8.0})
        s.cli("migrate")
        n = 30
        for i in range(n):
            s.drop(f"f{i:02}.csv", csv_text(TEXTS))
        s.cli("run", "--once", timeout=300, check=False)
        rows = s.history()
        assert len(rows) == n
        stats = batch_stats(emu)
        assert stats["submissions_invoked_twice"] == 0, stats
        failed = [r for r in rows if r["state"] != "done"]
        injected = stats["failures_injected"]
        assert len(failed) == injected, (failed, stats)
        assert all(r["error_code"] == "BatchJobFailed" for r in failed), failed
        for r in rows:
            if r["state"] == "done":
                check_hashed(Path(r["outputs"]["output1"]), TEXTS)
        assert stats["dropped"] > 0 and stats["not_responding_detours"] > 0, stats


def test_sigkill_at_random_moments_loses_nothing_and_invokes_nothing_twice(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    rng = random.Random(7)
    with emulator(azurite, "--run-time-s", "0.2,1.0", "--prepare-s", "0.1") as emu:
        s = setup(tmp_path, emu, azurite, daemon={"lease_s": 2.0, "heartbeat_s": 0.5})
        s.cli("migrate")
        n = 40
        for i in range(n):
            s.drop(f"k{i:02}.csv", csv_text(TEXTS))
        for kill in range(4):
            proc = s.start_daemon(log_name=f"daemon{kill}.log")
            time.sleep(rng.uniform(0.5, 3.0))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        done = s.cli("run", "--once", timeout=300, check=False)
        rows = s.history()
        assert len(rows) == n and all(r["state"] == "done" for r in rows), done.stdout
        stats = batch_stats(emu)
        assert stats["submissions_invoked_twice"] == 0, stats
        assert stats["invokes"] >= n
        for r in rows:
            check_hashed(Path(r["outputs"]["output1"]), TEXTS)
        leftovers = [p for p in s.results.iterdir() if p.name.startswith(".")]
        assert leftovers == []
        assert sorted(p.name for p in s.archive.iterdir()) == [f"k{i:02}.csv" for i in range(n)]


def test_jobs_cancel_and_retry_work_as_for_bes(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with emulator(azurite, "--run-time-s", "30") as emu:
        s = setup(tmp_path, emu, azurite)
        s.cli("migrate")
        s.drop("c.csv", csv_text(TEXTS))
        daemon = s.start_daemon()
        try:
            harness.wait_for(lambda: any(r["state"] == "started" for r in s.history()), 60,
                             what="the batch job to start")
            [row] = s.history()
            s.cli("jobs", "cancel", row["job_id"])
            harness.wait_for(lambda: s.history()[0]["state"] == "cancelled", 60,
                             what="the job to be cancelled")
            remote = emu.get(f"/_emulator/batch/jobs/{row['bes_job_id']}")
            assert remote["status"] in ("CancelRequested", "Canceled"), remote
            emu.configure(run_time_s=[0.1, 0.1])
            s.cli("jobs", "retry", row["job_id"])
            harness.wait_for(lambda: s.history()[0]["state"] == "done", 60,
                             what="the retried job to finish")
        finally:
            harness.stop(daemon)
        [row2] = s.history()
        assert row2["bes_job_id"] != row["bes_job_id"]
        check_hashed(s.results / "c.output1.csv", TEXTS)


def test_history_records_name_the_batch_job(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    """`job_history` (the documented view) names the batchjob id and its final status."""
    with emulator(azurite) as emu:
        s = setup(tmp_path, emu, azurite)
        s.cli("migrate")
        s.drop("h.csv", csv_text(TEXTS))
        s.cli("run", "--once", timeout=120)
        con = sqlite3.connect(tmp_path / "state.db")
        try:
            [(bes_job_id, status, outputs)] = con.execute(
                "select bes_job_id, bes_status, outputs from job_history").fetchall()
        finally:
            con.close()
        assert bes_job_id.startswith("batchjob-") and status == "Completed"
        assert json.loads(outputs)["output1"].endswith("h.output1.csv")
