"""The daemon end to end: the real CLI as a subprocess, the emulator over HTTP, real Azurite."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from azure.storage.blob import BlobServiceClient

from orchestrator import azurite as azurite_mod
from orchestrator.emulator import hashing
from tests import harness

pytestmark = pytest.mark.slow

TEXTS = [
    "This is a good day",
    "Best ramen in town, worth the queue",
    "café au lait 42 was perfect",
    "I would not read it twice",
]


def csv_text(rows: list[str], column: str = "Col2") -> str:
    lines = [f"Col1,{column}"] + [f'{i},"{t}"' for i, t in enumerate(rows)]
    return "\n".join(lines) + "\n"


def check_hashed(path: Path, texts: list[str], bits: int = 3) -> None:
    rows = harness.read_csv(path)
    header = rows[0]
    first = header.index("Col2 - Hashing feature 1")
    assert header[first:] == hashing.feature_names("Col2", bits=bits)
    assert len(rows) == len(texts) + 1
    for row, text in zip(rows[1:], texts, strict=True):
        assert row[1] == text
        want = hashing.feature_counts(text, bits=bits, ngrams=2)
        assert [int(float(v)) for v in row[first:]] == want, text


def view_rows(db_url: str) -> list[dict[str, Any]]:
    """`select * from job_history` with the database's own driver, as a report tool would."""
    url = sa.make_url(db_url)
    if url.get_backend_name() == "sqlite":
        con = sqlite3.connect(str(url.database))
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute("select * from job_history")]
        finally:
            con.close()

    async def pg() -> list[dict[str, Any]]:
        con = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(False))
        try:
            return [dict(r) for r in await con.fetch("select * from job_history")]
        finally:
            await con.close()

    return asyncio.run(pg())


def test_published_vector_is_what_the_emulator_computes() -> None:
    got = hashing.feature_counts("This is a good day", bits=3, ngrams=2)
    assert got == [1, 1, 2, 2, 0, 2, 0, 1]


def test_files_dropped_give_exact_results_and_history(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    with harness.emulator("--run-time-s", "0.1,0.5") as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               db_url=database_url)
        s.cli("migrate")
        names = [f"reviews {i} é.csv" for i in range(6)]
        for n in names:  # present before start
            s.drop(n, csv_text(TEXTS))
        proc = s.cli("run", "--once", timeout=120)
        assert "6 done, 0 failed" in proc.stdout
        for n in names:
            stem = Path(n).stem
            check_hashed(s.results / f"{stem}.output1.csv", TEXTS)
            assert (s.archive / n).exists()
        assert list(s.inbox.iterdir()) == []
        assert not [p for p in s.results.iterdir() if p.name.startswith(".")]
        stats = emu.stats()
        assert stats["submits"] == 6 and stats["starts"] == 6
        assert stats["double_starts"] == 0
        # The documented view, through the plain driver (sqlite3 / asyncpg), not our code.
        rows = view_rows(database_url)
        assert len(rows) == 6
        cols = set(rows[0].keys())
        assert {"job_id", "input_path", "input_sha256", "service", "state", "bes_job_id",
                "bes_status", "attempts", "created_at", "submitted_at", "started_at",
                "finished_at", "duration_s", "outputs", "error"} <= cols
        for r in rows:
            assert r["state"] == "done" and r["bes_status"] == "Finished"
            assert r["created_at"].endswith("Z") and "T" in r["finished_at"]
            assert r["duration_s"] > 0
            assert Path(json.loads(r["outputs"])["output1"]).exists()
            assert len(r["input_sha256"]) == 64


def test_missing_column_fails_with_details(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    with harness.emulator() as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               db_url=database_url)
        s.cli("migrate")
        s.drop("nocol.csv", csv_text(["hello"], column="Text"))
        s.drop("good.csv", csv_text(TEXTS))
        proc = s.cli("run", "--once", check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert (s.failed / "nocol.csv").exists()
        err = (s.failed / "nocol.csv.error.txt").read_text()
        assert "Col2" in err and "job" in err.lower()
        check_hashed(s.results / "good.output1.csv", TEXTS)
        hist = {h["input_name"]: h for h in s.history()}
        assert hist["nocol.csv"]["state"] == "failed"
        assert "Col2" in hist["nocol.csv"]["error"]
        assert hist["good.csv"]["state"] == "done"


def test_queue_table_submission(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    with harness.emulator() as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               db_url=database_url,
                               service={"output_dir": "qresults", "archive_dir": "qarchive",
                                        "failed_dir": "qfailed"})
        s.cli("migrate")
        src = tmp_path / "elsewhere"
        src.mkdir()
        files = []
        for i in range(3):
            f = src / f"q{i}.csv"
            f.write_text(csv_text(TEXTS[:2]))
            files.append(str(f))
        out = s.cli("submit", *files, "--service", "svc").stdout
        assert out.count("queued") == 3
        s.cli("run", "--once")
        for i in range(3):
            check_hashed(tmp_path / "qresults" / f"q{i}.output1.csv", TEXTS[:2])
            assert (tmp_path / "qarchive" / f"q{i}.csv").exists()


def test_growing_file_is_taken_only_when_settled(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    with harness.emulator() as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               db_url=database_url, watch={"settle_s": 1.0})
        s.cli("migrate")
        s.inbox.mkdir()
        daemon = s.start_daemon()
        try:
            path = s.inbox / "growing.csv"
            texts = [f"row number {i} is here" for i in range(12)]
            with open(path, "w") as f:
                f.write("Col1,Col2\n")
                for i, t in enumerate(texts):
                    f.write(f'{i},"{t}"\n')
                    f.flush()
                    time.sleep(0.25)
                    assert path.exists(), "taken while still growing"
            harness.wait_for(lambda: (s.results / "growing.output1.csv").exists(), 60,
                             what="result of the settled file")
            check_hashed(s.results / "growing.output1.csv", texts)
        finally:
            assert harness.stop(daemon) == 0


def test_restart_mid_run_resumes_without_double_start(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    with harness.emulator("--run-time-s", "1.5,2.5") as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               db_url=database_url, service={"max_in_flight": 4})
        s.cli("migrate")
        for i in range(12):
            s.drop(f"r{i}.csv", csv_text(TEXTS[:1]))
        daemon = s.start_daemon()
        harness.wait_for(lambda: emu.stats()["starts"] >= 4, 60, what="some jobs started")
        assert harness.stop(daemon, signal.SIGTERM) == 0  # clean stop: BES jobs keep running
        before = emu.stats()
        assert before["starts"] < 12
        s.cli("run", "--once", timeout=120)
        after = emu.stats()
        for i in range(12):
            check_hashed(s.results / f"r{i}.output1.csv", TEXTS[:1])
        assert after["double_starts"] == 0
        assert after["starts"] == 12  # every job started exactly once across both runs
        assert after["max_running_seen"] <= 4  # the service's cap held across the restart
        hist = s.history()
        assert all(h["state"] == "done" for h in hist) and len(hist) == 12


def test_multi_input_output_and_global_parameters_reach_the_service(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    blobs = BlobServiceClient.from_connection_string(azurite.connection_string)
    container = blobs.get_container_client("bes-lookup")
    if not container.exists():
        container.create_container()
    container.upload_blob("lookup.csv", b"Key,Value\na,1\n", overwrite=True)
    with harness.emulator("--inputs", "input1,lookup", "--outputs", "output1,summary") as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            db_url=database_url, service={"extra_inputs": {"lookup": "bes-lookup/lookup.csv"},
                     "outputs": {"output1": ".csv", "summary": ".csv"},
                     "global_parameters": {"Hashing bitsize": "4"}})
        s.cli("migrate")
        s.drop("multi.csv", csv_text(TEXTS))
        s.cli("run", "--once")
        check_hashed(s.results / "multi.output1.csv", TEXTS, bits=4)
        assert (s.results / "multi.summary.csv").exists()
        [job] = s.history()
        seen = emu.job(job["bes_job_id"])
        body = json.dumps(seen)
        assert "Hashing bitsize" in body and "lookup" in body and "summary" in body
        assert harness.API_KEY not in body and "AccountKey=Eby8" not in body


def test_job_timeout_cancels_the_bes_job(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    with harness.emulator("--run-time-s", "60") as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               db_url=database_url, service={"job_timeout_s": 2})
        s.cli("migrate")
        s.drop("slow.csv", csv_text(TEXTS[:1]))
        proc = s.cli("run", "--once", check=False, timeout=60)
        assert proc.returncode == 1
        assert emu.stats()["deletes"] == 1
        [job] = s.history()
        assert job["state"] == "failed" and job["error_code"] == "Timeout"
        assert "cancelled" in (s.failed / "slow.csv.error.txt").read_text()
        listed = json.loads(s.cli("jobs", "list", "--state", "failed", "--json").stdout)
        assert [j["job_id"] for j in listed] == [job["job_id"]]


def test_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    s = harness.make_setup(tmp_path, emulator_url="http://127.0.0.1:1",
                           storage_connection_string="x", extra="[bogus]\nkey = 1\n")
    proc = s.cli("config", "check", check=False)
    assert proc.returncode == 78
    assert proc.stderr.strip().count("\n") == 0 and "bogus" in proc.stderr
    env_missing = dict(s.env)
    del env_missing[harness.API_KEY_ENV]
    s.config.write_text(s.config.read_text().replace("[bogus]\nkey = 1\n", ""))
    s.env = env_missing
    proc = s.cli("run", "--once", check=False)
    assert proc.returncode == 78 and "services.svc.api_key_env" in proc.stderr


def test_run_refuses_unmigrated_database(
    tmp_path: Path, azurite: azurite_mod.Azurite, database_url: str
) -> None:
    s = harness.make_setup(tmp_path, emulator_url="http://127.0.0.1:1",
                           storage_connection_string=azurite.connection_string,
                           db_url=database_url)
    proc = s.cli("run", "--once", check=False)
    assert proc.returncode == 78 and "migrate" in proc.stderr
