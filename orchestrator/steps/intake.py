"""Intake: turn a settled file in a watched folder, or a queue-table row, into a CLAIMED job.

Crash-safe order: the row is inserted first (its `claim_key` is UNIQUE, so two hosts sharing a
folder can never both claim one file), then the claim step renames the file into the spool.
A crash between the two leaves a CLAIMED row whose file is still in the inbox: the claim step
finishes the move when the job is next claimed.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from orchestrator import config, jobs, watcher


def new_job_id() -> str:
    return uuid.uuid4().hex


def from_candidate(settings: config.Settings, cand: watcher.Candidate) -> jobs.NewJob:
    watch = next(w for w in settings.watches if w.name == cand.watch)
    return jobs.NewJob(
        id=new_job_id(),
        service=watch.service,
        watch=watch.name,
        claim_key=cand.claim_key(),
        source_path=str(cand.path),
        input_name=cand.path.name,
        output_dir=str(watch.output_dir),
        archive_dir=str(watch.archive_dir),
        failed_dir=str(watch.failed_dir),
    )


def from_queue(settings: config.Settings, item: jobs.QueueItem) -> jobs.NewJob:
    """A queue row names a file and a service. An unknown service still makes a job, which then
    fails with a clear reason, so the row is never silently dropped."""
    svc = settings.services.get(item.service)
    state = settings.daemon.state_dir
    return jobs.NewJob(
        id=new_job_id(),
        service=item.service,
        watch=None,
        claim_key=f"queue:{item.id}",
        source_path=item.path,
        input_name=Path(item.path).name or f"queue-{item.id}",
        output_dir=str(svc.output_dir if svc else state / "results" / "_unknown"),
        archive_dir=str(svc.archive_dir if svc else state / "archive" / "_unknown"),
        failed_dir=str(svc.failed_dir if svc else state / "failed" / "_unknown"),
    )
