"""The spool folder: where each input waits while its job runs. It describes itself.

A spooled input is `<job id><suffix>` (suffix: the original name's extension, lowercased, when
it is short and alphanumeric). Beside it, `<job id>.job.json` records what is needed to rebuild
the job without the database: the job id, the original file name, the service, the watch (None
for queue-table jobs), where it came from, its result/archive/failed folders, its SHA-256 and
size. The claim step writes the record (fsynced) before the input appears in the spool, and
the finish step removes it after the input has left; so every spooled input has its record.

`recover` runs at daemon start: a spooled input whose job row is missing (the database was
deleted, or replaced by an older copy) is registered again as a new CLAIMED job with the same
id, logged one line each. Its claim step finds the input already in the spool and goes on from
there; nothing is stranded. The BES job of the lost history (if any) is not known any more, so
the input runs again from the start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from orchestrator import clock, config, fsutil, jobs, lifecycle, logs
from orchestrator.db import repository

#: The sidecar's name ending. Two dots: never the name of a spooled input (one suffix at most).
RECORD_SUFFIX = ".job.json"
RECORD_FORMAT = 1
#: An input's suffix is kept in its spool name only when it is short and alphanumeric.
MAX_SUFFIX_LEN = 16
#: The lease owner of re-registered jobs: no worker has this id, so no heartbeat renews it and
#: the first worker to look claims the job (its event names this owner).
RECOVERY_OWNER = "spool-recovery"

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
_log = logs.get("bes.spool")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """What the sidecar holds: enough to rebuild the job."""

    job_id: str
    input_name: str  #: the original file name
    service: str
    watch: str | None  #: None for queue-table jobs
    claim_key: str  #: the original claim (kept for the record; a rebuilt job gets a new one)
    source_path: str  #: where the input was found
    output_dir: str
    archive_dir: str
    failed_dir: str
    input_sha256: str
    input_size: int


def input_path(spool_dir: Path, job_id: str, input_name: str) -> Path:
    """`<spool>/<job id><suffix>`: never collides, and is found again after a crash."""
    suffix = Path(input_name).suffix
    if len(suffix) > MAX_SUFFIX_LEN or not suffix[1:].isalnum():
        suffix = ""
    return spool_dir / f"{job_id}{suffix.lower()}"


def record_path(spool_dir: Path, job_id: str) -> Path:
    return spool_dir / f"{job_id}{RECORD_SUFFIX}"


def record_for(job: jobs.Job, *, sha256: str, size: int) -> Record:
    return Record(
        job_id=job.id, input_name=job.input_name, service=job.service, watch=job.watch,
        claim_key=job.claim_key, source_path=job.source_path, output_dir=job.output_dir,
        archive_dir=job.archive_dir, failed_dir=job.failed_dir, input_sha256=sha256,
        input_size=size,
    )


def write_record(spool_dir: Path, record: Record, *, sync_dir: bool = True) -> None:
    """Write the sidecar atomically and fsynced (blocking). `sync_dir=False` when the caller
    fsyncs the spool folder itself right after (the input's own rename into it)."""
    data = {"format": RECORD_FORMAT, **dataclasses.asdict(record)}
    fsutil.write_text_atomic(record_path(spool_dir, record.job_id),
                             json.dumps(data, ensure_ascii=False, indent=1) + "\n",
                             sync_dir=sync_dir)


def read_record(path: Path) -> Record:
    """Raise ValueError (or OSError) when the sidecar is missing or not one we wrote."""
    data: Any = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path.name}: not a spool record of format {RECORD_FORMAT}")
    try:
        record = Record(**{f.name: data[f.name] for f in dataclasses.fields(Record)})
    except KeyError as exc:
        raise ValueError(f"{path.name}: no {exc.args[0]!r}") from None
    if not _JOB_ID.match(record.job_id):
        raise ValueError(f"{path.name}: bad job id")
    return record


def remove_record(spool_dir: Path, job_id: str) -> None:
    """The input has left the spool: its record goes too (blocking)."""
    record_path(spool_dir, job_id).unlink(missing_ok=True)


def _scan(spool_dir: Path) -> dict[str, tuple[Path | None, Path | None]]:
    """job id -> (spooled input, sidecar), for every job id found in the spool (blocking).
    Hidden names (temp files of an interrupted copy) are not inputs."""
    found: dict[str, tuple[Path | None, Path | None]] = {}
    try:
        entries = list(os.scandir(spool_dir))
    except FileNotFoundError:
        return found
    for e in entries:
        name = e.name
        job_id = name[:32]
        if name.startswith(".") or not _JOB_ID.match(job_id) or not e.is_file(
                follow_symlinks=False):
            continue
        spooled, record = found.get(job_id, (None, None))
        if name == job_id + RECORD_SUFFIX:
            record = spool_dir / name
        elif name == job_id or (name[32] == "." and "." not in name[33:]):
            spooled = spool_dir / name
        else:
            continue
        found[job_id] = (spooled, record)
    return found


def _new_job(spooled: Path, record: Record) -> jobs.NewJob:
    return jobs.NewJob(
        id=record.job_id, service=record.service, watch=record.watch,
        # Not the original key: a queue row's key ("queue:<id>") would collide with a new
        # queue row once the table starts again from 1.
        claim_key=f"spool:{record.job_id}",
        source_path=str(spooled), input_name=record.input_name,
        output_dir=record.output_dir, archive_dir=record.archive_dir,
        failed_dir=record.failed_dir,
    )


async def recover(settings: config.Settings, repo: repository.Repository) -> int:
    """Register again every spooled input that has no job row; returns how many.

    Called at daemon start, before the worker claims jobs. A spooled input without a readable
    record cannot be rebuilt: it is left where it is, with one error line naming it."""
    spool_dir = settings.daemon.spool_dir
    found = await asyncio.to_thread(_scan, spool_dir)
    news: list[jobs.NewJob] = []
    for job_id, (spooled, record_file) in sorted(found.items()):
        try:
            job: jobs.Job | None = await repo.get_job(job_id)
        except repository.NotFound:
            job = None
        if job is not None:
            if (spooled is None and record_file is not None
                    and job.state in lifecycle.TERMINAL_STATES):
                # The input left the spool; a crash came before its record was removed.
                await asyncio.to_thread(record_file.unlink, missing_ok=True)
            continue
        if spooled is None:
            continue  # a record whose input never arrived (or already left): nothing to run
        if record_file is None:
            _log.error("spool_input_unknown", path=str(spooled),
                       reason=f"no {job_id}{RECORD_SUFFIX} beside it: left in place")
            continue
        try:
            record = await asyncio.to_thread(read_record, record_file)
        except (OSError, ValueError) as exc:
            _log.error("spool_input_unknown", path=str(spooled),
                       reason=f"unreadable record ({exc}): left in place")
            continue
        digest, size = await asyncio.to_thread(fsutil.sha256_file, spooled)
        if digest != record.input_sha256 or size != record.input_size:
            _log.warning("spool_input_changed", path=str(spooled), job_id=job_id[:8],
                         recorded_sha256=record.input_sha256, sha256=digest)
        news.append(_new_job(spooled, record))
    if not news:
        return 0
    made = await repo.create_jobs(news, worker_id=RECOVERY_OWNER, now=clock.now(), lease_s=0.0)
    for job in made:
        _log.warning("spool_input_recovered", job_id=job.short_id, path=job.source_path,
                     input_name=job.input_name, service=job.service, watch=job.watch)
    return len(made)
