"""Supervision: a dead task, a database file deleted or replaced, the systemd watchdog and
the health answers (`Daemon.live` / `Daemon.ready`), in-process with fake steps and a real
SQLite file; a second daemon with the same worker id and a stepped wall clock with real
daemon subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import structlog.testing

from orchestrator import azurite as azurite_mod
from orchestrator import clock, daemon, supervise
from tests import engine_fakes as ef
from tests import harness
from tests import test_crash as crash


@contextlib.contextmanager
def notify_socket(tmp_path: Path, monkeypatch: Any, watchdog_usec: int = 100_000
                  ) -> Iterator[socket.socket]:
    """A real sd_notify socket, as systemd gives a Type=notify unit with WatchdogSec=."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", str(watchdog_usec))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    try:
        yield sock
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def test_a_dead_task_stops_the_daemon_with_its_traceback_and_the_watchdog(
    tmp_path: Path, monkeypatch: Any
) -> None:
    settings = ef.load_settings(ef.write_config(tmp_path, heartbeat_s=0.1), monkeypatch)
    repo = await ef.open_repo(settings)
    try:
        with notify_socket(tmp_path, monkeypatch) as sock, \
                structlog.testing.capture_logs() as logged:
            async with ef.running_daemon(settings, repo, ef.FakeBackend()) as (d, task):
                await ef.wait_until(lambda: d.worker.intake.up.is_set(), what="up")
                await asyncio.sleep(0.35)
                first = received(sock)
                assert any(m.startswith("READY=1") for m in first)
                assert first.count("WATCHDOG=1") >= 2
                assert d.live() == (True, "ok")
                assert await d.ready() == (True, "ok")

                def boom() -> None:
                    raise RuntimeError("the heartbeat's own bug")

                d.worker.leases._check = boom  # the next heartbeat raises outside any retry
                outcome = await asyncio.wait_for(task, 10)
                assert outcome.exit_code == daemon.EX_SOFTWARE
                assert outcome.failure is not None and "heartbeat" in outcome.failure
                assert not d.live()[0]
                after = received(sock)
                assert "STOPPING=1" in after
                await asyncio.sleep(0.3)
                assert "WATCHDOG=1" not in received(sock)
        (died,) = [e for e in logged if e["event"] == "task_died"]
        assert died["log_level"] == "error" and died["task"] == "heartbeat"
        assert isinstance(died["exc_info"], RuntimeError)  # rendered as its traceback
        assert "the heartbeat's own bug" in died["error"]
    finally:
        await repo.close()


async def test_a_cancelled_writer_is_a_dead_task(tmp_path: Path, monkeypatch: Any) -> None:
    settings = ef.load_settings(ef.write_config(tmp_path), monkeypatch)
    repo = await ef.open_repo(settings)
    try:
        async with ef.running_daemon(settings, repo, ef.FakeBackend()) as (d, task):
            writer_task = d.worker._writer._task
            assert writer_task is not None
            writer_task.cancel()
            outcome = await asyncio.wait_for(task, 10)
            assert outcome.exit_code == daemon.EX_SOFTWARE
            assert outcome.failure == "task writer was cancelled"
    finally:
        await repo.close()


async def test_a_stalled_loop_is_not_live(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(daemon, "LOOP_STALL_S", 0.3)
    monkeypatch.setattr(daemon, "LOOP_PROBE_S", 0.05)
    settings = ef.load_settings(ef.write_config(tmp_path), monkeypatch)
    repo = await ef.open_repo(settings)
    try:
        async with ef.running_daemon(settings, repo, ef.FakeBackend()) as (d, _task):
            await asyncio.sleep(0.05)
            assert d.live()[0]
            time.sleep(0.6)  # noqa: ASYNC251 - blocking the loop is the fault under test
            ok, why = d.live()
            assert not ok and "event loop stalled" in why
            await asyncio.sleep(0.2)
            assert d.live() == (True, "ok")  # it recovers once the loop answers again
    finally:
        await repo.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
async def test_the_database_file_deleted_or_replaced_stops_the_daemon(
    tmp_path: Path, monkeypatch: Any, how: str
) -> None:
    settings = ef.load_settings(ef.write_config(tmp_path, heartbeat_s=0.1), monkeypatch)
    repo = await ef.open_repo(settings)
    db = ef.db_path(settings)
    try:
        await ef.enqueue(repo, 5)
        backend = ef.FakeBackend(polls=1_000_000, poll_delay_s=0.05)
        with structlog.testing.capture_logs() as logged:
            async with ef.running_daemon(settings, repo, backend) as (d, task):
                await ef.wait_until(lambda: d.worker.stats.polls >= 5, 20, "polling")
                if how == "deleted":
                    for suffix in ("", "-wal", "-shm"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(f"{db}{suffix}")
                else:
                    shutil.copy(db, tmp_path / "copy.db")
                    os.replace(tmp_path / "copy.db", db)
                outcome = await asyncio.wait_for(task, 10)
        assert outcome.exit_code == daemon.EX_FATAL
        assert outcome.failure is not None and f"was {how}" in outcome.failure
        (fatal,) = [e for e in logged if e["event"] == "daemon_fatal"]
        assert fatal["log_level"] == "error" and "exc_info" not in fatal  # one line
        assert not [e for e in logged if e["event"] == "task_died"]
        if how == "deleted":
            assert not db.exists()  # no empty database was made in its place
    finally:
        await repo.close()


def test_database_file_identity_is_pure_stat(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    db.write_bytes(b"")
    f = daemon.DatabaseFile.of(f"sqlite+aiosqlite:///{db}")
    f.check()
    db.unlink()
    with pytest.raises(supervise.Fatal, match="was deleted"):
        f.check()
    assert daemon.DatabaseFile.of("postgresql+asyncpg://u@h/db").path is None
    assert daemon.sqlite_path("sqlite+aiosqlite:///:memory:") is None


# -- real daemons ---------------------------------------------------------------------------
def _daemon_log(s: harness.Setup, name: str = "daemon.log") -> str:
    path = s.root / name
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.mark.slow
def test_a_second_daemon_with_the_same_worker_id_refuses_to_start(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with harness.emulator() as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               daemon={"worker_id": "shared-id"}, extra='[http]\nlisten = ""\n')
        s.cli("migrate")
        first = s.start_daemon()
        try:
            harness.wait_for(lambda: "daemon_ready" in _daemon_log(s), 60, what="first ready")
            second = s.cli("run", check=False, timeout=60)
            assert second.returncode == 78, second
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("config error: daemon.worker_id:")
            assert first.poll() is None  # the first one is untouched
            s.drop("a.csv", crash.csv_text(["This is a good day"]))
            harness.wait_for(lambda: (s.results / "a.output1.csv").exists(), 60, what="done")
        finally:
            harness.stop(first, signal.SIGKILL)
        # A crashed holder is no live daemon: systemd's restart under the same id works.
        again = s.start_daemon(log_name="again.log")
        try:
            harness.wait_for(lambda: "daemon_ready" in _daemon_log(s, "again.log"), 60,
                             what="restart after a crash")
        finally:
            assert harness.stop(again) == 0


@pytest.mark.slow
def test_a_wall_clock_step_with_400_jobs_in_flight_strands_nothing(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    """The daemon's clock jumps 120 s ahead (more than lease_s) while 400 jobs are in flight:
    every job still finishes, none is started twice, none is left in remote_finished."""
    shift = tmp_path / "clock-shift"
    shift.write_text("0")
    with harness.emulator("--run-time-s", "3,6") as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            service={"max_in_flight": 500,
                     "poll": {"initial_s": 0.5, "multiplier": 1.5, "max_s": 2.0, "jitter": 0.1}},
            watch={"settle_s": 0.1}, daemon={"lease_s": 30.0, "heartbeat_s": 2.0},
            extra='[http]\nlisten = ""\n')
        s.env[clock.TEST_CLOCK_ENV] = str(shift)
        s.cli("migrate")
        for i in range(400):
            s.drop(f"c{i:03d}.csv", crash.csv_text(["This is a good day"]))
        proc = s.start_daemon()
        try:
            harness.wait_for(lambda: emu.stats()["starts"] >= 300, 120, interval=0.5,
                             what="300 jobs started")
            shift.write_text("120")
            harness.wait_for(lambda: len(list(s.results.glob("*.csv"))) >= 400, 240,
                             interval=1.0, what="400 results")
            hist = s.history()
            assert len(hist) == 400
            assert {h["state"] for h in hist} == {"done"}, sorted(
                (h["state"], h["input_name"]) for h in hist if h["state"] != "done")[:5]
            stats = emu.stats()
            assert stats["double_starts"] == 0 and stats["starts"] == 400, stats
        finally:
            assert harness.stop(proc) == 0
        assert "job_orphan_recovered" not in _daemon_log(s)


async def test_the_http_endpoint_answers_live_and_ready(tmp_path: Path, monkeypatch: Any) -> None:
    with socket.socket() as probe:  # a free port (the config refuses port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = ef.write_config(tmp_path)
    path.write_text(path.read_text().replace('listen = ""', f'listen = "127.0.0.1:{port}"'))
    settings = ef.load_settings(path, monkeypatch)
    repo = await ef.open_repo(settings)
    try:
        async with ef.running_daemon(settings, repo, ef.FakeBackend()) as (d, task), \
                aiohttp.ClientSession() as http:
            await ef.wait_until(lambda: d.worker.intake.up.is_set(), what="up")
            assert d.server is not None and d.server.port == port
            for probe_path in ("/healthz", "/readyz"):
                async with http.get(f"http://127.0.0.1:{port}{probe_path}") as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["status"] == "ok"
            d.request_stop()
            await asyncio.wait_for(task, 10)
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get(f"http://127.0.0.1:{port}/healthz"):
                    pass
    finally:
        await repo.close()
