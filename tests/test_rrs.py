"""RRS (`kind = "rrs"`) end to end: the real CLI as a subprocess, the emulator's request-response
endpoint over HTTP, real Azurite for the daemon's container (RRS itself stores nothing)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from tests import harness
from tests.test_daemon import TEXTS, check_hashed, csv_text

pytestmark = pytest.mark.slow

RRS = {"kind": "rrs"}


def _events(db: Path, job_id: str) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [r[0] for r in con.execute(
            "select to_state from job_events where job_id = ? order by id", (job_id,))]
    finally:
        con.close()


def test_rrs_gives_the_same_result_files_and_history_as_bes(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    """The same inputs through RRS (folder `inbox`) and through BES (folder `inbox_bes`): the
    result files are byte for byte the same, and both jobs pass the same milestones."""
    (tmp_path / "inbox_bes").mkdir(parents=True)
    with harness.emulator("--run-time-s", "0.1") as emu:
        bes = harness.table("services.bes", {
            "base_url": emu.url, "workspace": "ws1", "service": "hashing",
            "api_key_env": harness.API_KEY_ENV,
            "poll": {"initial_s": 0.2, "multiplier": 1.5, "max_s": 1.0, "jitter": 0.1}})
        watch_bes = harness.table("[watch]", {
            "folder": "inbox_bes", "service": "bes", "settle_s": 0.2,
            "output_dir": "results_bes", "archive_dir": "archive_bes",
            "failed_dir": "failed_bes"})
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               service=RRS, extra=bes + watch_bes)
        s.cli("migrate")
        names = [f"reviews {i} é.csv" for i in range(4)]
        for n in names:
            s.drop(n, csv_text(TEXTS))
            (tmp_path / "inbox_bes" / n).write_text(csv_text(TEXTS))
        proc = s.cli("run", "--once", timeout=120)
        assert "8 done, 0 failed" in proc.stdout, proc.stdout + proc.stderr
        for n in names:
            stem = Path(n).stem
            rrs_result = s.results / f"{stem}.output1.csv"
            check_hashed(rrs_result, TEXTS)
            assert rrs_result.read_bytes() == (
                tmp_path / "results_bes" / f"{stem}.output1.csv").read_bytes()
            assert (s.archive / n).exists()
        assert not [p for p in s.results.iterdir() if p.name.startswith(".")]
        stats = emu.stats()
        assert stats["executes"] == 4, stats  # one request-response call per RRS job
        assert stats["submits"] == 4 and stats["starts"] == 4, stats  # the BES jobs only
        hist = s.history()
        rrs = [h for h in hist if h["service"] == "svc"]
        bes_rows = [h for h in hist if h["service"] == "bes"]
        assert len(rrs) == 4 and len(bes_rows) == 4
        for h in rrs:
            assert h["state"] == "done" and h["bes_status"] == "Finished", h
            assert h["bes_job_id"] == f"rrs-{h['job_id']}"
        db = tmp_path / "state.db"
        assert _events(db, rrs[0]["job_id"]) == _events(db, bes_rows[0]["job_id"])


def test_rrs_refuses_files_over_its_limits_and_says_to_use_bes(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with harness.emulator() as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               service={**RRS, "max_rows": 3, "max_bytes": 2000})
        s.cli("migrate")
        s.drop("small.csv", csv_text(TEXTS[:3]))
        s.drop("many.csv", csv_text(TEXTS))  # 4 rows
        s.drop("big.csv", csv_text(["x" * 3000]))  # 1 row, over 2000 bytes
        proc = s.cli("run", "--once", check=False, timeout=120)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        check_hashed(s.results / "small.output1.csv", TEXTS[:3])
        hist = {h["input_name"]: h for h in s.history()}
        for name, limit in (("many.csv", "max_rows"), ("big.csv", "max_bytes")):
            h = hist[name]
            assert h["state"] == "failed" and h["error_code"] == "TooLargeForRrs", h
            assert limit in h["error"] and 'kind = "bes"' in h["error"], h["error"]
            err = (s.failed / f"{name}.error.txt").read_text()
            assert 'use kind = "bes"' in err
            assert h["bes_job_id"] is None  # refused before anything was sent
        assert emu.stats()["executes"] == 1


def test_rrs_bad_input_fails_with_the_service_reason(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with harness.emulator() as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               service=RRS)
        s.cli("migrate")
        s.drop("nocol.csv", csv_text(["hello"], column="Text"))
        proc = s.cli("run", "--once", check=False, timeout=120)
        assert proc.returncode == 1
        h = s.history()[0]
        assert h["state"] == "failed" and h["error_code"] == "RrsJobFailed", h
        assert h["bes_status"] == "Failed"
        assert "Col2" in h["error"]
        err = (s.failed / "nocol.csv.error.txt").read_text()
        assert "Col2" in err and "jobs retry" in err


def test_rrs_rides_out_throttling_503s_and_dropped_calls_without_leaking_keys(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with harness.emulator("--apim", "--seed", "3", "--rate-limit", "4/1s",
                          "--error-503-rate", "0.2", "--drop-rate", "0.1") as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               service={**RRS, "apim_key_env": harness.APIM_KEY_ENV})
        s.cli("migrate")
        texts = {f"f{i}.csv": [f"{t} {i}" for t in TEXTS[:2]] for i in range(16)}
        for name, rows in texts.items():
            s.drop(name, csv_text(rows))
        proc = s.cli("run", "--once", check=False, timeout=150)
        assert "16 done, 0 failed" in proc.stdout, proc.stdout + proc.stderr
        for name, rows in texts.items():
            check_hashed(s.results / f"{Path(name).stem}.output1.csv", rows)
        stats = emu.stats()
        assert stats["http_429"] > 0 and stats["http_503"] > 0 and stats["dropped"] > 0, stats
        output = proc.stdout + proc.stderr
        db = (tmp_path / "state.db").read_bytes()
        for secret in (harness.API_KEY, harness.APIM_KEY):
            assert secret not in output
            assert secret.encode() not in db
