"""Jobs per second through the BES emulator: upload, submit, start, poll, download.

Starts Azurite and the emulator (`python -m orchestrator.emulator`, zero run time) as child
processes, pushes tiny CSV files through with high concurrency and prints one JSON line:
{"bench": "emulator_throughput", "jobs": N, "seconds": ..., "jobs_per_s": ...}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from azure.storage import blob as azblob
from azure.storage.blob import aio as azblob_aio

from orchestrator import azurite as azurite_mod

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"Col1,Col2\r\n1,This is a good day\r\n2,\"Hello, world\"\r\n"
EXPECTED_LINE = "1,This is a good day,1,1,2,2,0,2,0,1"
CONTAINER = "bench"
POLL_INTERVAL_S = 0.05


@contextlib.contextmanager
def emulator_process() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.emulator", "--port", "0", "--seed", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("emulator listening on "):
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield line.split()[-1]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


async def one_job(i: int, *, base: str, conn: str, http: aiohttp.ClientSession,
                  upload_url: str) -> None:
    name = f"in/{i}.csv"
    # Plain PUT with a container SAS: the SDK's per-request CPU would be the client's, not
    # the emulator's, and the bench measures the emulator.
    url = upload_url.format(name=name)
    async with http.put(url, data=PAYLOAD, headers={"x-ms-blob-type": "BlockBlob"}) as r:
        r.raise_for_status()
    jobs = f"{base}/workspaces/bench/services/hash/jobs"
    body = {"Inputs": {"input1": {"ConnectionString": conn,
                                  "RelativeLocation": f"/{CONTAINER}/{name}"}},
            "Outputs": {"output1": {"ConnectionString": conn,
                                    "RelativeLocation": f"/{CONTAINER}/out/{i}.csv"}},
            "GlobalParameters": {}}
    async with http.post(f"{jobs}?api-version=2.0", json=body) as r:
        r.raise_for_status()
        job_id = await r.json()
    async with http.post(f"{jobs}/{job_id}/start?api-version=2.0") as r:
        r.raise_for_status()
    while True:
        async with http.get(f"{jobs}/{job_id}?api-version=2.0") as r:
            r.raise_for_status()
            status = await r.json()
        if status["StatusCode"] == "Finished":
            break
        if status["StatusCode"] in ("Failed", "Cancelled"):
            raise RuntimeError(f"job {job_id} ended {status}")
        await asyncio.sleep(POLL_INTERVAL_S)
    ref = status["Results"]["output1"]
    async with http.get(ref["BaseLocation"] + ref["RelativeLocation"] + ref["SasBlobToken"]) as r:
        r.raise_for_status()
        text = (await r.read()).decode()
    if text.splitlines()[1] != EXPECTED_LINE:
        raise RuntimeError(f"wrong output for job {job_id}: {text[:200]!r}")


async def run(*, jobs: int, concurrency: int, base: str, conn: str) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as http, \
            azblob_aio.BlobServiceClient.from_connection_string(conn) as blobs:
        with contextlib.suppress(Exception):
            await blobs.create_container(CONTAINER)
        sas = azblob.generate_container_sas(
            azurite_mod.ACCOUNT, CONTAINER, account_key=azurite_mod.ACCOUNT_KEY,
            permission=azblob.ContainerSasPermissions(write=True, create=True),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        upload_url = f"{blobs.url.rstrip('/')}/{CONTAINER}/{{name}}?{sas}"
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(jobs):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                await one_job(queue.get_nowait(), base=base, conn=conn, http=http,
                              upload_url=upload_url)

        # Warm up connections before the clock starts.
        await one_job(-1, base=base, conn=conn, http=http,
                              upload_url=upload_url)
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with azurite_mod.running() as az, emulator_process() as base:
        seconds = asyncio.run(run(jobs=args.jobs, concurrency=args.concurrency, base=base,
                                  conn=az.connection_string))
    print(json.dumps({"bench": "emulator_throughput", "jobs": args.jobs,
                      "seconds": round(seconds, 3),
                      "jobs_per_s": round(args.jobs / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
