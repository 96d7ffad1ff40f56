"""One large input: the daemon's upload rate against the raw SDK rate, streamed result, RSS.

    .venv/bin/python bench/large.py [--mib 1024]

Baseline (same run, same Azurite, same file): the blob SDK's `upload_blob` from an open file,
chunked (`--chunk-mib`, default 4 MiB blocks, the daemon's `upload_chunk_bytes`) with 4
parallel transfers (its
`upload_parallelism`). Then the daemon runs `run --once` on the same file against the emulator
with the identity model (the result is the input, byte for byte, so the download is 1 GiB too).
Daemon upload rate = size / (its `job_uploaded` log time − its `job_accepted` log time);
download rate likewise from `job_remote_finished` to `job_downloaded`. Peak RSS from wait4.
Targets: upload ≥ 0.9 of raw; RSS ≤ 150 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import common
from azure.storage.blob import aio as azblob_aio

DEFAULT_CHUNK_MIB = 4  #: the daemon's default upload_chunk_bytes


def write_input(path: Path, mib: int) -> str:
    """A CSV of `mib` MiB (distinct lines, so nothing compresses), and its sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        f.write(b"Col1,Col2\n")
        h.update(b"Col1,Col2\n")
        block = b"".join(b"%09d,This is a good day for a large file\n" % i for i in range(80_000))
        written = 10
        while written < mib * 2**20:
            part = block[: mib * 2**20 - written]
            f.write(part)
            h.update(part)
            written += len(part)
    return h.hexdigest()


async def raw_upload(path: Path, conn: str, chunk: int) -> float:
    async with azblob_aio.BlobServiceClient.from_connection_string(
            conn, max_block_size=chunk, max_single_put_size=chunk) as svc:
        c = svc.get_container_client("raw")
        await c.create_container()
        size = path.stat().st_size  # noqa: ASYNC240 - before the clock starts
        with open(path, "rb") as f:  # noqa: ASYNC230 - the SDK reads it, as in real use
            began = time.perf_counter()
            await c.upload_blob("big.csv", f, length=size, max_concurrency=4,
                                overwrite=True)
            return time.perf_counter() - began


def _events(log: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):
            rec = json.loads(line)
            ts = dt.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
            out.setdefault(rec["event"], ts.timestamp())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--chunk-mib", type=int, default=DEFAULT_CHUNK_MIB,
                    help="block size, for both the SDK baseline and the daemon")
    args = ap.parse_args()
    chunk = args.chunk_mib * 2**20
    size = args.mib * 2**20
    with tempfile.TemporaryDirectory(prefix="bench-large-") as tmp, common.azurite() as az, \
            common.emulator("--model", "identity", "--seed", "1") as emu:
        root = Path(tmp)
        src = root / "big.csv"
        digest = write_input(src, args.mib)
        raw_s = asyncio.run(raw_upload(src, az.connection_string, chunk))
        setup = common.make_setup(
            root / "daemon", emu=emu, az=az,
            service={"poll": {"initial_s": 0.5, "multiplier": 1.3, "max_s": 2.0, "jitter": 0.1},
                     "request_timeout_s": 300.0},
            storage={"upload_chunk_bytes": chunk, "upload_parallelism": 4},
        )
        setup.inbox.mkdir(parents=True, exist_ok=True)
        os.rename(src, setup.inbox / "big.csv")
        res = common.run_once(setup, timeout_s=900, log_level="debug")  # per-step events
        if res.rc != 0:
            raise SystemExit(f"daemon run failed (rc {res.rc}):\n{res.output}")
        ev = _events(setup.root / "daemon.log")
        results = list(setup.results.glob("*.csv"))
        out_ok = len(results) == 1 and results[0].stat().st_size == size
        if out_ok:
            h = hashlib.sha256()
            with open(results[0], "rb") as f:
                while block := f.read(2**24):
                    h.update(block)
            out_ok = h.hexdigest() == digest
    up_s = ev["job_uploaded"] - ev["job_accepted"]
    down_s = ev["job_downloaded"] - ev["job_remote_finished"]
    mb = size / 1e6
    print(json.dumps({
        "bench": "large", "mib": args.mib, "chunk_mib": args.chunk_mib,
        "raw_upload_mb_s": round(mb / raw_s, 1), "daemon_upload_mb_s": round(mb / up_s, 1),
        "upload_ratio": round(raw_s / up_s, 3), "target_ratio": 0.9,
        "daemon_download_mb_s": round(mb / down_s, 1), "result_identical": out_ok,
        "daemon_max_rss_mb": round(res.max_rss_mb, 1), "target_rss_mb": 150,
        "daemon_wall_s": round(res.wall_s, 1), "daemon_cpu_s": round(res.cpu_s, 1),
        "claim_s": round(ev["job_accepted"] - ev["input_claimed"], 2),
        "bes_s": round(ev["job_remote_finished"] - ev["job_submitted"], 1),
    }), flush=True)


if __name__ == "__main__":
    main()
