"""Jobs per second through the emulator: upload, submit, start, poll, download.

Starts Azurite and the emulator (`python -m orchestrator.emulator`, zero run time) as child
processes, pushes tiny CSV files through with high concurrency and prints one JSON line:
{"bench": "emulator_throughput", "jobs": N, "seconds": ..., "jobs_per_s": ...}

`--backend batch-endpoint` does the same through the emulator's Azure ML batch endpoint
(invoke on the scoring plane, poll through ARM, read the output blob). `--in-flight N` instead
invokes N jobs that stay Preparing and then reads their status through ARM as fast as it can:
the emulator's invoke rate, ARM reads/s and RSS with N jobs held (what a daemon benchmark with
thousands of jobs in flight leans on).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import aiohttp
import psutil
from azure.storage import blob as azblob
from azure.storage.blob import aio as azblob_aio

from orchestrator import azurite as azurite_mod

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"Col1,Col2\r\n1,This is a good day\r\n2,\"Hello, world\"\r\n"
EXPECTED_LINE = "1,This is a good day,1,1,2,2,0,2,0,1"
CONTAINER = "bench"
POLL_INTERVAL_S = 0.05


WS = ("/subscriptions/00000000-0000-0000-0000-00000000bench/resourceGroups/bench/providers/"
      "Microsoft.MachineLearningServices/workspaces/bench")
ARM_Q = "?api-version=2024-04-01"


@contextlib.contextmanager
def emulator_process(*args: str, env: Mapping[str, str] | None = None
                     ) -> Iterator[tuple[str, int]]:
    """(base URL, pid)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.emulator", "--port", "0", "--seed", "1", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("emulator listening on "):
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield line.split()[-1], proc.pid
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


# -- batch endpoints ---------------------------------------------------------------------------


async def _token(http: aiohttp.ClientSession, base: str, secret: str, resource: str) -> str:
    """Once per audience, as azure-identity would, from the emulator's managed identity."""
    async with http.get(f"{base}/msi/token", params={"api-version": "2019-08-01",
                                                     "resource": resource},
                        headers={"X-IDENTITY-HEADER": secret}) as r:
        r.raise_for_status()
        token: str = (await r.json())["access_token"]
    return token


def _invoke_body(in_path: str, out_path: str, i: int) -> dict[str, object]:
    uri = "azureml://datastores/workspaceblobstore/paths/"
    return {"properties": {
        "InputData": {"input_data": {"JobInputType": "UriFile", "Uri": uri + in_path}},
        "OutputData": {"output_data": {"JobOutputType": "UriFile", "Uri": uri + out_path}},
        "tags": {"bes-orchestrator.job": str(i), "bes-orchestrator.attempt": "1"}}}


async def batch_job(i: int, *, base: str, http: aiohttp.ClientSession, upload_url: str,
                    ml: dict[str, str], arm: dict[str, str]) -> None:
    name = f"in/{i}.csv"
    async with http.put(upload_url.format(name=name), data=PAYLOAD,
                        headers={"x-ms-blob-type": "BlockBlob"}) as r:
        r.raise_for_status()
    async with http.post(f"{base}/endpoints/hash/jobs", json=_invoke_body(
            name, f"out/{i}.csv", i), headers=ml) as r:
        r.raise_for_status()
        job = (await r.json())["name"]
    while True:
        async with http.get(f"{base}{WS}/jobs/{job}{ARM_Q}", headers=arm) as r:
            r.raise_for_status()
            status = (await r.json())["properties"]["status"]
        if status == "Completed":
            break
        if status in ("Failed", "Canceled"):
            raise RuntimeError(f"job {job} ended {status}")
        await asyncio.sleep(POLL_INTERVAL_S)
    async with http.get(upload_url.format(name=f"out/{i}.csv")) as r:
        r.raise_for_status()
        text = (await r.read()).decode()
    if text.splitlines()[1] != EXPECTED_LINE:
        raise RuntimeError(f"wrong output for job {job}: {text[:200]!r}")


async def run_batch(*, jobs: int, concurrency: int, base: str, conn: str, secret: str) -> float:
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as http, \
            azblob_aio.BlobServiceClient.from_connection_string(conn) as blobs:
        with contextlib.suppress(Exception):
            await blobs.create_container(CONTAINER)
        sas = azblob.generate_container_sas(
            azurite_mod.ACCOUNT, CONTAINER, account_key=azurite_mod.ACCOUNT_KEY,
            permission=azblob.ContainerSasPermissions(read=True, write=True, create=True),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        upload_url = f"{blobs.url.rstrip('/')}/{CONTAINER}/{{name}}?{sas}"
        ml = {"Authorization": "Bearer " + await _token(http, base, secret,
                                                        "https://ml.azure.com")}
        arm = {"Authorization": "Bearer " + await _token(http, base, secret,
                                                         "https://management.azure.com")}
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(jobs):
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                await batch_job(queue.get_nowait(), base=base, http=http,
                                upload_url=upload_url, ml=ml, arm=arm)

        await batch_job(-1, base=base, http=http, upload_url=upload_url, ml=ml, arm=arm)
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - began


async def run_in_flight(*, jobs: int, concurrency: int, base: str, secret: str, pid: int,
                        read_s: float) -> dict[str, object]:
    """Invoke `jobs` jobs that stay Preparing, then poll them through ARM for `read_s`."""
    proc = psutil.Process(pid)
    rss_before = proc.memory_info().rss
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as http:
        ml = {"Authorization": "Bearer " + await _token(http, base, secret,
                                                        "https://ml.azure.com")}
        arm = {"Authorization": "Bearer " + await _token(http, base, secret,
                                                         "https://management.azure.com")}
        names: list[str] = []
        todo = iter(range(jobs))

        async def invoker() -> None:
            for i in todo:
                async with http.post(f"{base}/endpoints/hash/jobs", headers=ml,
                                     json=_invoke_body("in/x.csv", f"out/{i}.csv", i)) as r:
                    r.raise_for_status()
                    names.append((await r.json())["name"])

        began = time.perf_counter()
        await asyncio.gather(*(invoker() for _ in range(concurrency)))
        invoke_s = time.perf_counter() - began
        rss_held = proc.memory_info().rss
        reads = 0
        cpu_before = proc.cpu_times()
        began = time.perf_counter()
        deadline = began + read_s

        async def reader(k: int) -> None:
            nonlocal reads
            j = k
            while time.perf_counter() < deadline:
                async with http.get(f"{base}{WS}/jobs/{names[j % len(names)]}{ARM_Q}",
                                    headers=arm) as r:
                    r.raise_for_status()
                    await r.read()
                reads += 1
                j += concurrency

        await asyncio.gather(*(reader(k) for k in range(concurrency)))
        seconds = time.perf_counter() - began
        cpu_after = proc.cpu_times()
    cpu_s = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    return {"invokes_per_s": round(jobs / invoke_s, 1),
            "arm_reads_per_s": round(reads / seconds, 1),
            "emulator_cpu_per_read_ms": round(1000 * cpu_s / max(reads, 1), 3),
            "emulator_rss_mib_before": round(rss_before / 2**20, 1),
            "emulator_rss_mib_held": round(rss_held / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--backend", choices=("bes", "batch-endpoint"), default="bes")
    parser.add_argument("--in-flight", type=int, default=0, metavar="N",
                        help="batch-endpoint: hold N jobs Preparing, then measure ARM reads/s")
    parser.add_argument("--read-s", type=float, default=10.0,
                        help="with --in-flight: seconds of ARM reads")
    args = parser.parse_args()
    if args.backend == "bes":
        with azurite_mod.running() as az, emulator_process() as (base, _):
            seconds = asyncio.run(run(jobs=args.jobs, concurrency=args.concurrency, base=base,
                                      conn=az.connection_string))
        print(json.dumps({"bench": "emulator_throughput", "jobs": args.jobs,
                          "seconds": round(seconds, 3),
                          "jobs_per_s": round(args.jobs / seconds, 1)}), flush=True)
        return
    secret = secrets.token_urlsafe(16)
    flags = ["--be-container", CONTAINER, "--arm-reads", "off"]
    if args.in_flight:
        flags += ["--prepare-s", "1000000"]
    with azurite_mod.running() as az, emulator_process(*flags, env={
            "BES_EMULATOR_BE_STORAGE": az.connection_string,
            "BES_EMULATOR_IDENTITY_HEADER": secret}) as (base, pid):
        if args.in_flight:
            figures = asyncio.run(run_in_flight(jobs=args.in_flight,
                                                concurrency=args.concurrency, base=base,
                                                secret=secret, pid=pid, read_s=args.read_s))
            print(json.dumps({"bench": "emulator_throughput", "backend": "batch-endpoint",
                              "in_flight": args.in_flight, **figures}), flush=True)
            return
        seconds = asyncio.run(run_batch(jobs=args.jobs, concurrency=args.concurrency,
                                        base=base, conn=az.connection_string, secret=secret))
    print(json.dumps({"bench": "emulator_throughput", "backend": "batch-endpoint",
                      "jobs": args.jobs, "seconds": round(seconds, 3),
                      "jobs_per_s": round(args.jobs / seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
