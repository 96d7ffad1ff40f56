"""Acceptance-test harness: the real CLI as a subprocess, the real emulator as a subprocess,
real Azurite (from conftest), real files. Shared by the daemon, crash and scale-out suites."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.emulator import process

API_KEY = "test-api-key-QWERTY0123456789"
APIM_KEY = "test-apim-key-ZXCVB9876543210"
API_KEY_ENV = "BES_TEST_API_KEY"
APIM_KEY_ENV = "BES_TEST_APIM_KEY"
STORAGE_ENV = "BES_TEST_STORAGE"
ROOT = Path(__file__).resolve().parent.parent


def cli_cmd() -> list[str]:
    return [sys.executable, "-m", "orchestrator"]


@dataclass
class Emulator:
    url: str
    proc: subprocess.Popen[str]
    args: list[str] = field(default_factory=list)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
            return json.loads(r.read())

    def stats(self) -> dict[str, Any]:
        data = self.get("/_emulator/stats")
        assert isinstance(data, dict)
        return data

    def job(self, bes_job_id: str) -> dict[str, Any]:
        data = self.get(f"/_emulator/jobs/{bes_job_id}")
        assert isinstance(data, dict)
        return data

    def configure(self, **knobs: Any) -> None:
        req = urllib.request.Request(
            f"{self.url}/_emulator/config", data=json.dumps(knobs).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()


@contextlib.contextmanager
def emulator(*args: str, port: int = 0) -> Iterator[Emulator]:
    """The emulator as a child process, checking our test API key; `--apim` (a harness
    shorthand) also makes it an APIM gateway checking the test subscription key."""
    env = {process.API_KEY_ENV: API_KEY}
    if "--apim" in args:
        args = tuple(a for a in args if a != "--apim")
        env[process.APIM_KEY_ENV] = APIM_KEY
    with process.spawn(*args, port=port, env=env) as (url, proc):
        yield Emulator(url=url, proc=proc, args=list(args))


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}"
                                for k, x in v.items()) + " }"
    raise TypeError(v)


def table(name: str, values: Mapping[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Setup:
    """A working folder with a config file, inbox and the env the CLI needs."""

    root: Path
    config: Path
    env: dict[str, str]
    db_url: str

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    def cli(self, *args: str, timeout: float = 120, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*cli_cmd(), *args, "-c", str(self.config)], env=self.env,
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def start_daemon(self, *args: str, log_name: str = "daemon.log") -> subprocess.Popen[bytes]:
        with open(self.root / log_name, "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                [*cli_cmd(), "--log-json", "run", "-c", str(self.config), *args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                start_new_session=True)

    def drop(self, name: str, content: str | bytes) -> Path:
        """Write-then-rename into the inbox, as writers are told to."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        tmp = self.inbox / f".{name}.tmp"
        tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        final = self.inbox / name
        tmp.rename(final)
        return final

    def history(self) -> list[dict[str, Any]]:
        out = self.cli("jobs", "list", "--json", "--limit", "100000").stdout
        data = json.loads(out)
        assert isinstance(data, list)
        return data


def make_setup(
    root: Path,
    *,
    emulator_url: str,
    storage_connection_string: str,
    db_url: str | None = None,
    service: Mapping[str, Any] | None = None,
    watch: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
    storage: Mapping[str, Any] | None = None,
    http: Mapping[str, Any] | None = None,
    extra: str = "",
) -> Setup:
    root.mkdir(parents=True, exist_ok=True)
    db_url = db_url or f"sqlite+aiosqlite:///{root / 'state.db'}"
    svc = {
        "base_url": emulator_url, "workspace": "ws1", "service": "hashing",
        "api_key_env": API_KEY_ENV, "max_in_flight": 20,
        "poll": {"initial_s": 0.2, "multiplier": 1.5, "max_s": 1.0, "jitter": 0.1},
        "retry": {"initial_s": 0.2, "multiplier": 2.0, "max_s": 2.0},
        **(service or {}),
    }
    w = {"folder": "inbox", "pattern": "*.csv", "service": "svc", "settle_s": 0.2,
         "create": True, **(watch or {})}
    d = {"state_dir": "state", "heartbeat_s": 1.0, "lease_s": 5.0, "rescan_s": 2.0,
         **(daemon or {})}
    st = {"connection_string_env": STORAGE_ENV, "container": "bes-test", **(storage or {})}
    # The status endpoint stays off unless a test asks for it (`http`, or an [http] table in
    # `extra`): many daemons share this host, and its default port would collide.
    h = "" if "[http]" in extra else table("http", {"listen": "", **(http or {})})
    text = (table("daemon", d) + table("database", {"url": db_url}) + table("storage", st)
            + h + table("services.svc", svc) + table("[watch]", w) + extra)
    cfg = root / "config.toml"
    cfg.write_text(text)
    env = {**os.environ, API_KEY_ENV: API_KEY, APIM_KEY_ENV: APIM_KEY,
           STORAGE_ENV: storage_connection_string, "PYTHONPATH": str(ROOT)}
    return Setup(root=root, config=cfg, env=env, db_url=db_url)


def wait_for(predicate: Any, timeout: float, interval: float = 0.2, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15) -> int:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    return proc.wait(timeout=timeout)


def read_csv(path: Path) -> list[list[str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))
