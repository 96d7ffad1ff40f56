"""Faults (issue 5, parts 2, 3, 6, 7): a misbehaving service, storage that goes away, results
that cannot be fetched or written, a clean stop with hundreds of jobs in flight, stuck jobs.
Real processes throughout: the CLI, the emulator, Azurite."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from tests import harness
from tests import test_crash as crash

pytestmark = pytest.mark.slow

DETAILS = "Injected failure: the module raised an exception (code 0042)"


def drop_many(s: harness.Setup, n: int, prefix: str = "f") -> dict[str, list[str]]:
    expected = {f"{prefix}{i:04d}.csv": crash.texts_for(i) for i in range(n)}
    for name, texts in expected.items():
        s.drop(name, crash.csv_text(texts))
    return expected


def test_service_faults_together(tmp_path: Path, azurite: azurite_mod.Azurite) -> None:
    """503s, dropped connections (half after the call took effect), a gateway rate limit,
    integer status codes and injected failures, all at once."""
    with harness.emulator(
        "--apim", "--seed", "7", "--run-time-s", "0.2,0.8", "--error-503-rate", "0.1",
        "--drop-rate", "0.05", "--rate-limit", "40/1s", "--int-status",
        "--failure-rate", "0.05", "--failure-details", DETAILS,
    ) as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            service={"apim_key_env": harness.APIM_KEY_ENV, "max_in_flight": 30})
        s.cli("migrate")
        expected = drop_many(s, 80)
        proc = s.cli("run", "--once", check=False, timeout=110)
        stats = emu.stats()
        hist = s.history()
        failed = [h for h in hist if h["state"] == "failed"]
        done = [h for h in hist if h["state"] == "done"]
        assert len(hist) == len(expected)
        assert len(done) + len(failed) == len(expected), proc.stdout
        # The faults really happened.
        assert stats["http_503"] > 0 and stats["dropped"] > 0 and stats["http_429"] > 0, stats
        # Only injected failures fail, and they carry the service's Details.
        injected = {h["bes_job_id"] for h in hist
                    if emu.job(h["bes_job_id"])["details"] == DETAILS}
        assert {h["bes_job_id"] for h in failed} == injected
        assert len(failed) <= stats["failures_injected"]
        for h in failed:
            assert h["error_code"] == "BesJobFailed", h
            assert DETAILS in h["error"]
            err = (s.failed / f"{h['input_name']}.error.txt").read_text()
            assert DETAILS in err and h["job_id"] in err
        # Every other job finished with exact results.
        for h in done:
            crash.check_result(s.results / f"{Path(h['input_name']).stem}.output1.csv",
                               expected[h["input_name"]])
        # Only stored ids were started, each once, even when a start response was lost.
        assert stats["double_starts"] == 0, stats
        assert stats["starts"] == len(expected), stats
        assert proc.returncode == (1 if failed else 0)


@pytest.mark.timeout(180)
def test_azurite_down_for_30_s_mid_run(tmp_path: Path) -> None:
    """Storage goes away for 30 s while jobs upload, run and download; the daemon waits and
    retries, and every job finishes."""
    (tmp_path / "azurite-data").mkdir()
    az = azurite_mod.Azurite(location=tmp_path / "azurite-data")
    az.start()
    try:
        with harness.emulator("--run-time-s", "0.5,2") as emu:
            s = harness.make_setup(
                tmp_path / "w", emulator_url=emu.url,
                storage_connection_string=az.connection_string,
                service={"max_in_flight": 10})
            s.cli("migrate")
            expected = drop_many(s, 40)
            daemon = s.start_daemon()
            try:
                harness.wait_for(lambda: emu.stats()["starts"] >= 5, 60, what="jobs started")
                az.stop(keep_data=True)
                time.sleep(30)
                assert daemon.poll() is None, "the daemon died while storage was down"
                az.start()
                harness.wait_for(
                    lambda: sum(1 for h in s.history() if h["state"] in ("done", "failed"))
                    == len(expected), 60, interval=1, what="every job ended")
            finally:
                assert harness.stop(daemon) == 0
            log = (s.root / "daemon.log").read_text()
            assert "step_retry" in log  # it noticed, and retried
            hist = s.history()
            assert len(hist) == len(expected)
            # Nothing failed: uploads, submits, polls and downloads waited out the outage, and a
            # BES job that failed inside BES because it could not reach storage was submitted
            # again (services.*.resubmit_on).
            assert [h for h in hist if h["state"] != "done"] == []
            for name, texts in expected.items():
                crash.check_result(s.results / f"{Path(name).stem}.output1.csv", texts)
                assert (s.archive / name).exists()
            stats = emu.stats()
            assert stats["double_starts"] == 0
            # Every start beyond one per input is a resubmission, a new BES job after the old
            # one ended Failed: none was started twice.
            resubmits = sum(h["resubmits"] for h in hist)
            assert stats["starts"] == len(expected) + resubmits, (stats, resubmits)
    finally:
        az.stop()


def test_expired_sas_fails_clearly_and_retry_reruns(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    # The SAS in Results lives 1 s; the first poll comes 3 s after start, so it has expired.
    with harness.emulator("--run-time-s", "0.1", "--sas-lifetime-s", "1") as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            service={"poll": {"initial_s": 3.0, "multiplier": 1.5, "max_s": 3.0, "jitter": 0}})
        s.cli("migrate")
        texts = crash.texts_for(1)
        s.drop("late.csv", crash.csv_text(texts))
        proc = s.cli("run", "--once", check=False, timeout=60)
        assert proc.returncode == 1
        [job] = s.history()
        assert job["state"] == "failed"
        assert "SAS" in job["error"] and "expired" in job["error"], job["error"]
        assert "sig=" not in job["error"]
        err = (s.failed / "late.csv.error.txt").read_text()
        assert "expired" in err and "jobs retry" in err
        assert (s.failed / "late.csv").exists()  # the input is kept
        assert not list(s.results.glob("*")) if s.results.exists() else True
        emu.configure(sas_lifetime_s=86400)
        s.cli("jobs", "retry", job["job_id"])
        s.cli("run", "--once", timeout=60)
        [again] = s.history()
        assert again["job_id"] == job["job_id"] and again["state"] == "done"
        # The retried input left the failed folder, and its stale error file went with it.
        assert not (s.failed / "late.csv.error.txt").exists()
        assert not (s.failed / "late.csv").exists()
        crash.check_result(s.results / "late.output1.csv", texts)
        assert (s.archive / "late.csv").exists() and not (s.failed / "late.csv").exists()


def test_unwritable_output_folder_fails_clearly_and_keeps_the_input(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    # We run as root, so permissions do not stop us: a file where a folder should be does.
    (tmp_path / "blocked").write_text("not a folder\n")
    with harness.emulator("--run-time-s", "0.1") as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            watch={"output_dir": "blocked/results"})
        s.cli("migrate")
        texts = crash.texts_for(2)
        s.drop("x.csv", crash.csv_text(texts))
        proc = s.cli("run", "--once", check=False, timeout=60)
        assert proc.returncode == 1
        [job] = s.history()
        assert job["state"] == "failed" and job["error_code"] == "ResultUnwritable", job
        assert "blocked/results" in job["error"]
        assert (s.failed / "x.csv").read_text() == crash.csv_text(texts)  # input kept
        assert "ResultUnwritable" in (s.failed / "x.csv.error.txt").read_text()


def test_sigterm_with_500_in_flight_exits_fast_and_resumes(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with harness.emulator("--run-time-s", "20,25") as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            service={"max_in_flight": 500,
                     "poll": {"initial_s": 2.0, "multiplier": 1.5, "max_s": 3.0, "jitter": 0.1}},
            watch={"settle_s": 0.1})
        s.cli("migrate")
        texts = ["This is a good day"]
        for i in range(500):
            s.drop(f"g{i:03d}.csv", crash.csv_text(texts))
        daemon = s.start_daemon()
        harness.wait_for(lambda: emu.stats()["starts"] >= 400, 80, interval=0.5,
                         what="400 jobs started")
        began = time.monotonic()
        assert harness.stop(daemon, signal.SIGTERM, timeout=10) == 0
        took = time.monotonic() - began
        assert took < 10, took
        stats = emu.stats()
        assert stats["deletes"] == 0  # the BES jobs were left running
        assert stats["jobs_by_state"]["Running"] >= 400 - stats["jobs_by_state"]["Finished"]
        s.cli("run", "--once", timeout=110)
        after = emu.stats()
        assert after["double_starts"] == 0 and after["starts"] == 500, after
        hist = s.history()
        assert len(hist) == 500 and {h["state"] for h in hist} == {"done"}
        print(f"SIGTERM with {stats['starts']} started: exited in {took:.2f} s")


@pytest.mark.parametrize("knob", ["--queue-delay-s", "--run-time-s"])
def test_stuck_job_is_cancelled_and_failed(
    tmp_path: Path, azurite: azurite_mod.Azurite, knob: str
) -> None:
    """Kept NotStarted (queue delay) or Running past the timeout: DELETE, failed, listed."""
    with harness.emulator(knob, "120") as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            service={"job_timeout_s": 2})
        s.cli("migrate")
        s.drop("stuck.csv", crash.csv_text(["a b"]))
        proc = s.cli("run", "--once", check=False, timeout=60)
        assert proc.returncode == 1
        [job] = s.history()
        assert job["state"] == "failed" and job["error_code"] == "Timeout"
        want = "NotStarted" if knob == "--queue-delay-s" else "Running"
        assert want in job["error"] and "cancelled" in job["error"]
        assert emu.stats()["deletes"] == 1
        assert emu.job(job["bes_job_id"])["status"] == "Cancelled"
        listed = json.loads(s.cli("jobs", "list", "--state", "failed", "--json").stdout)
        assert [j["job_id"] for j in listed] == [job["job_id"]]
        assert (s.failed / "stuck.csv").exists()
