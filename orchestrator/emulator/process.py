"""Run the emulator as a child process: for the demo, the acceptance tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping

API_KEY_ENV = "BES_EMULATOR_API_KEY"
APIM_KEY_ENV = "BES_EMULATOR_APIM_KEY"
#: Batch endpoints: the emulator's own storage access, and the managed-identity secret.
BE_STORAGE_ENV = "BES_EMULATOR_BE_STORAGE"
IDENTITY_HEADER_ENV = "BES_EMULATOR_IDENTITY_HEADER"


@contextlib.contextmanager
def spawn(
    *args: str, port: int = 0, env: Mapping[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start `python -m orchestrator.emulator` on 127.0.0.1; yield (base URL, process).

    Keys go through the environment (API_KEY_ENV, APIM_KEY_ENV, BE_STORAGE_ENV,
    IDENTITY_HEADER_ENV), never the command line,
    where `ps` would show them. The process is stopped on every exit path.
    """
    cmd = [sys.executable, "-m", "orchestrator.emulator", "--host", "127.0.0.1",
           "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "emulator listening on http://127.0.0.1:PORT"
        if "listening on" not in line:
            raise RuntimeError(f"the emulator did not start: {line.strip()!r}")
        yield line.strip().rsplit(" ", 1)[-1], proc
    finally:
        if proc.stdout is not None:
            proc.stdout.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
