"""Liveness through the daemon's own endpoint: the real Daemon in-process (its steps are the
engine tests' fakes: no network is needed for what is tested here), its real supervisor,
loop probe and watchdog pinging a real datagram socket, and `/healthz` over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import daemon
from tests import engine_fakes as ef
from tests import test_web


class NotifySocket:
    """What systemd would receive: every sd_notify datagram with its arrival time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def pings(self) -> list[float]:
        return [t for t, m in self.messages if m == "WATCHDOG=1"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    # A socket path must fit 108 bytes: a short folder, not the test's long tmp_path.
    folder = Path(tempfile.mkdtemp(prefix="bes-notify-"))
    path = folder / "sock"
    ns = NotifySocket(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    try:
        yield ns
    finally:
        ns.close()
        shutil.rmtree(folder, ignore_errors=True)


def probe(url: str, *, delay_s: float = 0.0, timeout_s: float = 2.0) -> tuple[int, str]:
    """A monitoring probe from another thread: (status, body), or (0, why) for no answer."""
    time.sleep(delay_s)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (TimeoutError, urllib.error.URLError, ConnectionError) as exc:
        return 0, f"no answer: {exc}"


@contextlib.asynccontextmanager
async def daemon_with_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    port = test_web.free_port()
    cfg = ef.write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('listen = ""', f'listen = "127.0.0.1:{port}"'))
    settings = ef.load_settings(cfg, monkeypatch)
    repo = await ef.open_repo(settings)
    backend = ef.FakeBackend()
    try:
        async with ef.running_daemon(settings, repo, backend) as (d, task):
            yield d, task, f"http://127.0.0.1:{port}"
    finally:
        await repo.close()


def _make_writer_mortal(d: Any, die: asyncio.Event) -> None:
    """The writer dying of a bug cannot be produced on demand: this wraps the real writer so
    that it raises when `die` is set (the fault injected; everything around it is real)."""
    real = d.worker._run_writer

    async def writer() -> None:
        task = asyncio.ensure_future(real())
        try:
            await die.wait()
            raise RuntimeError("injected fault in the batch writer")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    d.worker._run_writer = writer


async def test_blocked_loop_stops_the_watchdog_and_the_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, notify: NotifySocket
) -> None:
    async with daemon_with_http(tmp_path, monkeypatch) as (_d, task, url):
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, probe, f"{url}/healthz") == (
            200, '{"status": "ok", "reason": "ok"}\n')
        await asyncio.sleep(0.5)
        assert len(notify.pings()) >= 3  # the watchdog pings while healthy
        answer = loop.run_in_executor(None, lambda: probe(f"{url}/healthz", delay_s=0.2,
                                                          timeout_s=0.8))
        blocked_at = time.monotonic()
        time.sleep(1.5)  # noqa: ASYNC251  (the fault under test: a step blocking the loop)
        unblocked_at = time.monotonic()
        status, why = await answer
        assert status == 0 and "no answer" in why  # a probe with a timeout fails
        await asyncio.sleep(0.5)
        during = [t for t in notify.pings() if blocked_at + 0.05 < t < unblocked_at]
        assert during == [], "the watchdog must not be pinged while the loop is blocked"
        assert any(t > unblocked_at for t in notify.pings())  # and resumes after
        assert not task.done()


async def test_dead_writer_fails_healthz_and_stops_the_watchdog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, notify: NotifySocket
) -> None:
    die = asyncio.Event()
    port = test_web.free_port()
    cfg = ef.write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace('listen = ""', f'listen = "127.0.0.1:{port}"'))
    settings = ef.load_settings(cfg, monkeypatch)
    repo = await ef.open_repo(settings)
    backend = ef.FakeBackend()
    url = f"http://127.0.0.1:{port}/healthz"
    d = daemon.Daemon(settings, repo, handle_signals=False, step_for=backend.step_for,
                         open_context=ef.fake_open_context, close_context=ef.fake_close_context)
    _make_writer_mortal(d, die)
    # Hold the shutdown at its first step, so the endpoint can be asked while the daemon is
    # still up with a dead task (it then exits 70 and systemd restarts it).
    hold = asyncio.Event()
    real_stop = d.supervisor.stop

    async def held_stop() -> None:
        await hold.wait()
        await real_stop()

    d.supervisor.stop = held_stop  # type: ignore[method-assign]
    task = asyncio.create_task(d.run())
    loop = asyncio.get_running_loop()
    try:
        await ef.wait_until(lambda: d.live()[0], what="daemon alive")
        assert (await loop.run_in_executor(None, probe, url))[0] == 200
        await asyncio.sleep(0.4)
        assert notify.pings()
        die.set()
        await ef.wait_until(lambda: not d.live()[0], what="liveness lost")
        died_at = time.monotonic()
        status, body = await loop.run_in_executor(None, probe, url)
        assert status == 503, body
        assert '"status": "fail"' in body
        assert "writer" in body or "stopping" in body
        await asyncio.sleep(0.5)
        assert not [t for t in notify.pings() if t > died_at + 0.05]
    finally:
        hold.set()
        outcome = await asyncio.wait_for(task, 30)
        await repo.close()
    assert outcome.exit_code == 70
    assert any(m == "STOPPING=1" for _, m in notify.messages)
