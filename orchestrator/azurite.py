"""Start and stop a private Azurite blob server: used by the tests, the demo and the benchmarks.

Azurite is pinned in the project's `package.json` and installed with `npm ci`. Data goes to a
temporary `--location` folder (in-memory persistence grew to GBs in benchmarks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: Azurite's documented development account: public, not a secret.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
READY_TIMEOUT_S = 30.0


#: How to get Azurite when it is missing (one line, shown as is).
INSTALL_HINT = (
    "in a checkout, ./scripts/dev-setup installs the pinned version into node_modules; "
    "elsewhere `npm install -g azurite@3.37.0` puts azurite-blob on PATH, "
    "or set AZURITE_BLOB to its path"
)


class AzuriteNotFound(FileNotFoundError):
    """No `azurite-blob` to run. The message is one line saying how to get it."""


def _project_root() -> Path:
    """The checkout this package runs from (editable install); meaningless in a wheel install,
    where it is site-packages and holds no node_modules."""
    return Path(__file__).resolve().parent.parent


def find_binary() -> str:
    """The `azurite-blob` executable: $AZURITE_BLOB, the project's node_modules (the checkout's,
    or the current folder's), or PATH. AzuriteNotFound says how to get it."""
    explicit = os.environ.get("AZURITE_BLOB")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise AzuriteNotFound(f"AZURITE_BLOB={explicit} is not an executable file; "
                                  + INSTALL_HINT)
        return explicit
    for root in dict.fromkeys((_project_root(), Path.cwd())):
        local = root / "node_modules" / ".bin" / "azurite-blob"
        if local.exists():
            return str(local)
    found = shutil.which("azurite-blob")
    if found:
        return found
    raise AzuriteNotFound("azurite-blob not found (not in $AZURITE_BLOB, node_modules or PATH): "
                          + INSTALL_HINT)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def connection_string(host: str, port: int) -> str:
    return (
        "DefaultEndpointsProtocol=http;"
        f"AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://{host}:{port}/{ACCOUNT};"
    )


class Azurite:
    """A running `azurite-blob` child process. Use `start()` or the `running()` context."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 location: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_location = location is None
        self.location = location or Path(tempfile.mkdtemp(prefix="azurite-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = self.location / "azurite.log"

    @property
    def connection_string(self) -> str:
        return connection_string(self.host, self.port)

    @property
    def blob_endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/{ACCOUNT}"

    def start(self) -> Azurite:
        cmd = [
            find_binary(),
            "--blobHost", self.host,
            "--blobPort", str(self.port),
            "--location", str(self.location),
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ]
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"azurite exited with {self.proc.returncode}: {self._tail_log()}"
                )
            with contextlib.suppress(OSError), socket.create_connection(
                (self.host, self.port), timeout=0.5
            ):
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"azurite did not listen on {self.host}:{self.port} in time")

    def _tail_log(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-500:]
        except OSError:
            return ""

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the process by its PID (its whole process group) and remove its data."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
        if self._own_location and not keep_data:
            shutil.rmtree(self.location, ignore_errors=True)

    def restart(self) -> None:
        """Start again on the same port and data folder (after `stop(keep_data=True)`)."""
        self.start()


@contextlib.contextmanager
def running(**kwargs: object) -> Iterator[Azurite]:
    az = Azurite(**kwargs)  # type: ignore[arg-type]
    az.start()
    try:
        yield az
    finally:
        az.stop()
