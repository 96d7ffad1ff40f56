"""The emulator as a child process: its CLI, and a large file streamed through in bounded memory."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from azure.storage.blob import aio as azblob_aio
from click.testing import CliRunner

from orchestrator import azurite as azurite_mod
from orchestrator.emulator import cli

ROOT = Path(__file__).resolve().parent.parent
BIG_BYTES = 64 * 1024 * 1024
#: A few 1 MiB chunks in flight at most; a whole 64 MiB file would blow well past this.
MAX_RSS_GROWTH_BYTES = 24 * 1024 * 1024


@contextlib.contextmanager
def emulator_process(*args: str) -> Iterator[tuple[str, psutil.Process]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.emulator", "--port", "0", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("emulator listening on http://127.0.0.1:"), line
        yield line.split()[-1], psutil.Process(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        assert proc.stdout is not None
        proc.stdout.close()
        assert proc.wait(timeout=10) == 0  # a clean stop on SIGTERM


def test_help_documents_every_knob() -> None:
    result = CliRunner().invoke(cli.emulator_command, ["--help"])
    assert result.exit_code == 0
    for knob in ("--queue-delay-s", "--run-time-s", "--failure-rate", "--failure-details",
                 "--max-running", "--error-503-rate", "--drop-rate", "--rate-limit", "--quota",
                 "--int-status", "--api-key", "--apim-key", "--sas-lifetime-s", "--host",
                 "--port", "--slow-response-s", "--seed", "--service", "--inputs", "--outputs",
                 "--global-parameters"):
        assert knob in result.output, knob


def test_bad_knob_is_refused() -> None:
    result = CliRunner().invoke(cli.emulator_command, ["--rate-limit", "lots"])
    assert result.exit_code != 0 and "N/Ss" in result.output


async def _wait_finished(http: aiohttp.ClientSession, url: str,
                         proc: psutil.Process) -> tuple[dict[str, object], int]:
    peak = proc.memory_info().rss
    for _ in range(6000):
        peak = max(peak, proc.memory_info().rss)
        async with http.get(url) as r:
            st: dict[str, object] = await r.json()
        if st["StatusCode"] not in ("NotStarted", "Running"):
            return st, peak
        await asyncio.sleep(0.01)
    raise AssertionError("job did not end")


@pytest.mark.slow
async def test_identity_streams_large_file_in_bounded_memory(
        azurite: azurite_mod.Azurite) -> None:
    data = os.urandom(1024 * 1024) * (BIG_BYTES // (1024 * 1024))
    container = "streaming"
    async with azblob_aio.BlobServiceClient.from_connection_string(
            azurite.connection_string, max_single_put_size=1 << 20,
            max_block_size=1 << 20) as svc:
        with contextlib.suppress(Exception):
            await svc.create_container(container)
        await svc.get_blob_client(container, "big.csv").upload_blob(
            io.BytesIO(data), length=len(data), overwrite=True, max_concurrency=4)
        await svc.get_blob_client(container, "small.csv").upload_blob(b"a\r\n1\r\n",
                                                                      overwrite=True)
    conn = azurite.connection_string
    with emulator_process("--service", "copy=identity") as (base, proc):
        jobs = f"{base}/workspaces/w/services/copy/jobs"
        async with aiohttp.ClientSession() as http:

            async def run(name: str) -> tuple[dict[str, object], int]:
                body = {"Inputs": {"input1": {"ConnectionString": conn,
                                              "RelativeLocation": f"{container}/{name}"}},
                        "Outputs": {"output1": {"ConnectionString": conn,
                                                "RelativeLocation": f"{container}/o-{name}"}}}
                async with http.post(f"{jobs}?api-version=2.0", json=body) as r:
                    job_id = await r.json()
                async with http.post(f"{jobs}/{job_id}/start?api-version=2.0") as r:
                    assert r.status == 204
                return await _wait_finished(http, f"{jobs}/{job_id}?api-version=2.0", proc)

            await run("small.csv")  # warm up: clients, pools, imports
            baseline = proc.memory_info().rss
            st, peak = await run("big.csv")
            assert st["StatusCode"] == "Finished", st
            results = st["Results"]
            assert isinstance(results, dict)
            ref = results["output1"]
            digest = hashlib.sha256()
            size = 0
            async with http.get(ref["BaseLocation"] + ref["RelativeLocation"]
                                + ref["SasBlobToken"]) as r:
                async for chunk in r.content.iter_chunked(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
    assert size == BIG_BYTES
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    print(f"emulator RSS growth {(peak - baseline) / 2**20:.1f} MiB for {BIG_BYTES >> 20} MiB")
    assert peak - baseline < MAX_RSS_GROWTH_BYTES, (peak - baseline) / 2**20
