"""The systemd layout: the unit's paths are the README's install, `systemd-analyze verify`
accepts it for a real install, and the installed daemon speaks the `Type=notify` protocol on a
real NOTIFY_SOCKET datagram socket (READY after migrations and intake, WATCHDOG pings while the
loop runs, STOPPING on SIGTERM), each message from the main process (`NotifyAccess=main`).

This machine runs no systemd, so the daemon is started the way systemd would start it: the
unit's command line, NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID in its environment.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from tests import harness, installed

UNIT = installed.ROOT / "systemd" / "bes-orchestrator.service"
EXE = f"{installed.README_VENV}/bin/bes-orchestrator"
API_KEY = "systemd-test-api-key-0123456789"


def unit_values(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def test_unit_runs_what_the_readme_installs() -> None:
    unit = unit_values(UNIT.read_text())
    cfg = installed.README_CONFIG
    assert unit["ExecStartPre"] == [f"{EXE} --log-json migrate -c {cfg}"]
    assert unit["ExecStart"] == [f"{EXE} --log-json run -c {cfg}"]
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["RestartPreventExitStatus"] == ["78"]
    assert unit["WatchdogSec"] == ["60"]
    readme = (installed.ROOT / "README.md").read_text()
    section = readme.split("\n## Install", 1)[1].split("\n## ", 1)[0]
    assert f"python3 -m venv {installed.README_VENV}\n" in section
    assert f"{EXE} config check -c {cfg}" in section
    assert "cp systemd/bes-orchestrator.service /etc/systemd/system/" in section
    # Every credential file the unit loads is one the README writes, named as its credential.
    for spec in unit["LoadCredential"]:
        name, path = spec.split(":", 1)
        assert Path(path).name == name, spec
        assert f"/dev/stdin {path} <<<" in section, f"the README does not write {path}"


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        reason = "systemd-analyze is not installed (Debian package: systemd)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: .ci/run installs it")
        pytest.skip(reason)
    return found


def unit_for(inst: installed.Installed, config: Path) -> str:
    """The unit with its paths pointing at the test install."""
    text = UNIT.read_text()
    assert EXE in text and installed.README_CONFIG in text
    return (text.replace(installed.README_VENV, str(inst.venv))
            .replace(installed.README_CONFIG, str(config)))


def test_sandbox_exposure_is_what_the_readme_says() -> None:
    analyze = _systemd_analyze()
    readme = (installed.ROOT / "README.md").read_text()
    claimed = re.search(r"systemd-analyze security --offline=yes "
                        r"systemd/bes-orchestrator.service` reports ([0-9.]+)", readme)
    assert claimed, "the README no longer states the unit's exposure"
    proc = subprocess.run([analyze, "security", "--offline=yes", str(UNIT)], capture_output=True,
                          text=True, timeout=60, check=False)
    measured = re.search(r"Overall exposure level for bes-orchestrator.service: ([0-9.]+)",
                         proc.stdout + proc.stderr)
    assert measured, proc.stdout + proc.stderr
    assert measured.group(1) == claimed.group(1).rstrip(".")


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> installed.Installed:
    return installed.get(tmp_path_factory.mktemp("install"))


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first test to ask for the install builds it
def test_systemd_analyze_verify_accepts_the_unit(inst: installed.Installed, tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    config = tmp_path / "config.toml"
    config.write_text("")
    good = tmp_path / "good" / "bes-orchestrator.service"
    good.parent.mkdir()
    good.write_text(unit_for(inst, config))
    proc = subprocess.run([analyze, "verify", str(good)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
    # The check has teeth: the shipped unit, whose /opt path does not exist here, is refused.
    bad = tmp_path / "bad" / "bes-orchestrator.service"
    bad.parent.mkdir()
    bad.write_text(UNIT.read_text())
    proc = subprocess.run([analyze, "verify", str(bad)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode != 0
    assert f"{EXE} is not executable" in proc.stderr, proc.stderr


@dataclass
class NotifySocket:
    """A bound AF_UNIX datagram socket, as systemd offers in NOTIFY_SOCKET; a thread records
    every message with its arrival time and the sender's pid (SCM_CREDENTIALS)."""

    path: Path
    messages: list[tuple[float, int, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        creds_size = struct.calcsize("iII")
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(creds_size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:creds_size])[0]
            self.messages.append((time.monotonic(), pid, data.decode()))

    def lines(self, key: str) -> list[tuple[float, int, str]]:
        """Messages holding the assignment `key` (e.g. "READY=1"), one per message."""
        return [(t, pid, text) for t, pid, text in self.messages if key in text.splitlines()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        yield ns
    finally:
        ns.close()


WATCHDOG_USEC = 2_000_000  # pings every 1 s (half of it)


def start_like_systemd(inst: installed.Installed, action: str, config: Path, work: Path,
                       env: dict[str, str], notify: NotifySocket) -> subprocess.Popen[bytes]:
    """The unit's command line for `action` (migrate | run), with the environment systemd gives
    a Type=notify service with WatchdogSec: NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID = the
    main pid (the shell execs the program, so its pid is the program's)."""
    unit = unit_values(unit_for(inst, config))
    (command,) = unit["ExecStartPre" if action == "migrate" else "ExecStart"]
    full_env = installed.clean_env({**env, "NOTIFY_SOCKET": str(notify.path),
                                    "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    with open(work / f"{action}.log", "ab") as log:
        return subprocess.Popen(["/bin/sh", "-c", f"export WATCHDOG_PID=$$; exec {command}"],
                                cwd=work, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_installed_daemon_speaks_the_notify_protocol(
    inst: installed.Installed, azurite: azurite_mod.Azurite, notify_socket: NotifySocket,
    tmp_path: Path,
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with installed.emulator(inst, work, API_KEY) as url:
        config = installed.write_config(work, url)
        env = installed.daemon_env(azurite.connection_string, API_KEY)

        # No schema yet: `run` stops with 78 (no restart loop) and never says READY.
        proc = start_like_systemd(inst, "run", config, work, env, notify_socket)
        assert proc.wait(timeout=120) == 78, (work / "run.log").read_text()
        assert "bes-orchestrator migrate" in (work / "run.log").read_text()
        assert notify_socket.lines("READY=1") == []

        # ExecStartPre, then ExecStart with a file already waiting in the inbox.
        pre = start_like_systemd(inst, "migrate", config, work, env, notify_socket)
        assert pre.wait(timeout=120) == 0, (work / "migrate.log").read_text()
        (work / "inbox" / "early.csv").write_bytes(b"Col1,Col2\n1,This is a good day\n")
        proc = start_like_systemd(inst, "run", config, work, env, notify_socket)
        try:
            harness.wait_for(lambda: notify_socket.lines("READY=1"), 120, what="READY=1")
            (ready_at, ready_pid, _), = notify_socket.lines("READY=1")
            assert ready_pid == proc.pid  # NotifyAccess=main
            # Intake is up: the waiting file and one dropped after READY are both processed.
            (work / "inbox" / ".late.csv.tmp").write_bytes(b"Col1,Col2\n1,I would not\n")
            (work / "inbox" / ".late.csv.tmp").rename(work / "inbox" / "late.csv")
            results = work / "results"
            harness.wait_for(lambda: {"early.output1.csv", "late.output1.csv"} <= {
                p.name for p in results.iterdir()} if results.exists() else False, 120,
                what="both results")
            # The watchdog: pings from the main process, at most WATCHDOG_USEC apart.
            harness.wait_for(lambda: len(notify_socket.lines("WATCHDOG=1")) >= 3, 30,
                             what="three WATCHDOG=1 pings")
            pings = notify_socket.lines("WATCHDOG=1")
            assert {pid for _, pid, _ in pings} == {proc.pid}
            gaps = [b[0] - a[0] for a, b in itertools.pairwise(pings)]
            assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
            assert proc.poll() is None
        finally:
            stopped_at = time.monotonic()
            code = harness.stop(proc, signal.SIGTERM, timeout=30)  # the unit's TimeoutStopSec
        log = (work / "run.log").read_text()
        assert code == 0, log
        stopping = notify_socket.lines("STOPPING=1")
        assert len(stopping) == 1 and stopping[0][1] == proc.pid, notify_socket.messages
        assert stopping[0][0] >= stopped_at > ready_at
        assert "Traceback" not in log
