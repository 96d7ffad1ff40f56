"""SIGHUP reloads the configuration: watches, limits, poll and retry policies change without
dropping a job; an invalid file, or a change only a restart can apply, keeps the old
configuration with one error line."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from orchestrator import azurite as azurite_mod
from orchestrator import config, daemon
from tests import engine_fakes as ef
from tests import harness
from tests import test_crash as crash


def _settings(tmp_path: Path, monkeypatch: Any, **kw: Any) -> config.Settings:
    return ef.load_settings(ef.write_config(tmp_path, **kw), monkeypatch)


def test_what_a_reload_may_change(tmp_path: Path, monkeypatch: Any) -> None:
    old = _settings(tmp_path / "a", monkeypatch)
    assert daemon.reload_refusal(old, _settings(tmp_path / "a", monkeypatch)) is None
    (tmp_path / "in").mkdir()
    more = _settings(tmp_path / "a", monkeypatch, max_in_flight=7, extra=f"""
[[watch]]
folder = "{tmp_path / 'in'}"
service = "svc"
""")
    assert daemon.reload_refusal(old, more) is None
    executors = _settings(tmp_path / "a", monkeypatch, executors=3)
    assert daemon.reload_refusal(old, executors) == (
        "reload: daemon.executors changed: restart the daemon to apply it "
        "(the old configuration is kept)")
    lease = _settings(tmp_path / "a", monkeypatch, lease_s=9.0)
    assert "daemon.lease_s changed" in (daemon.reload_refusal(old, lease) or "")
    path = ef.write_config(tmp_path / "a")
    path.write_text(path.read_text().replace("state.db", "other.db"))
    other_db = ef.load_settings(path, monkeypatch)
    assert (daemon.reload_refusal(old, other_db) or "").startswith("reload: database changed")


async def test_a_reload_raises_a_limit_and_wakes_parked_jobs(
    tmp_path: Path, monkeypatch: Any
) -> None:
    path = ef.write_config(tmp_path, max_in_flight=1)
    settings = ef.load_settings(path, monkeypatch)
    repo = await ef.open_repo(settings)
    backend = ef.FakeBackend(polls=1_000_000, poll_delay_s=0.02)
    try:
        await ef.enqueue(repo, 8)
        async with ef.running_daemon(settings, repo, backend, config_path=path) as (d, task):
            await ef.wait_until(lambda: d.worker.slots.parked("svc") == 7, 20, "7 parked")
            assert backend.max_remote == 1
            ef.write_config(tmp_path, max_in_flight=5)
            assert d.reload()
            await ef.wait_until(lambda: backend.max_remote == 5, 20, "5 in flight")
            assert d.worker.slots.parked("svc") == 3
            path.write_text(path.read_text() + "\n[daemon.nonsense]\n")
            assert not d.reload()  # the old configuration stays
            assert d.settings.service("svc").max_in_flight == 5
            backend.polls = 0
            await ef.wait_until(lambda: d.worker.stats.done == 8, 30, "all done")
            assert not task.done()
        assert d.worker.stats.leases_lost == 0
    finally:
        await repo.close()


def _log_events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.slow
def test_sighup_reloads_a_running_daemon(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    no_http = '[http]\nlisten = ""\n'
    with harness.emulator("--run-time-s", "0.5,1") as emu:
        def setup(max_in_flight: int, extra: str = "") -> harness.Setup:
            return harness.make_setup(
                tmp_path, emulator_url=emu.url,
                storage_connection_string=azurite.connection_string,
                service={"max_in_flight": max_in_flight}, extra=no_http + extra)

        s = setup(1)
        s.cli("migrate")
        for i in range(6):
            s.drop(f"a{i}.csv", crash.csv_text(["This is a good day"]))
        proc = s.start_daemon()
        log = s.root / "daemon.log"
        try:
            harness.wait_for(lambda: any(e.get("event") == "daemon_ready"
                                         for e in _log_events(log)), 60, what="ready")
            (s.root / "inbox2").mkdir()
            setup(10, '[[watch]]\nfolder = "inbox2"\nservice = "svc"\nsettle_s = 0.2\n')
            os.kill(proc.pid, signal.SIGHUP)
            harness.wait_for(lambda: any(e.get("event") == "config_reloaded"
                                         for e in _log_events(log)), 20, what="reloaded")
            s.drop("b.csv", crash.csv_text(["Best ramen in town"]))
            (s.root / "inbox2" / "c.csv").write_text(crash.csv_text(["I would not"]))
            harness.wait_for(lambda: len(list(s.results.glob("*.csv"))) == 8, 90,
                             what="8 results")
            # An invalid file: the old configuration stays, with one error line.
            good = s.config.read_text()
            s.config.write_text(good + "\n[daemon.nonsense]\n")
            os.kill(proc.pid, signal.SIGHUP)
            harness.wait_for(lambda: any(e.get("event") == "reload_failed"
                                         for e in _log_events(log)), 20, what="refused")
            failed = [e for e in _log_events(log) if e.get("event") == "reload_failed"]
            assert len(failed) == 1 and failed[0]["level"] == "error"
            assert failed[0]["error"].startswith("config error: daemon")
            assert proc.poll() is None
            s.drop("d.csv", crash.csv_text(["still working"]))
            harness.wait_for(lambda: len(list(s.results.glob("*.csv"))) == 9, 60,
                             what="9 results")
            s.config.write_text(good)
        finally:
            assert harness.stop(proc) == 0
        hist = s.history()
        assert len(hist) == 9 and {h["state"] for h in hist} == {"done"}
        assert {h["attempts"] for h in hist} == {1}  # no job was dropped and taken again
        assert emu.stats()["double_starts"] == 0

