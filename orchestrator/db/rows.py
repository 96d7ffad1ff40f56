"""Rows <-> records: the only place that knows how a `jobs.Job` is stored. Pure."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from orchestrator import jobs, lifecycle, redact

JOB_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(jobs.Job))
_JSON_FIELDS = frozenset({"result_refs", "outputs"})
STATE_VALUES = frozenset(s.value for s in lifecycle.JobState)

#: What every run of a job starts from (a new job, and a full `retry`): nothing remote, no
#: result.
FRESH_RUN: dict[str, Any] = {
    "bes_job_id": None,
    "bes_status": None,
    "result_refs": "{}",
    "outputs": "{}",
    "error": None,
    "error_code": None,
    "poll_count": 0,
    "resubmits": 0,
    "cancel_requested": False,
    "submitted_at": None,
    "started_at": None,
    "finished_at": None,
    "deadline_at": None,
}


class UnknownField(ValueError):
    """A change names a column that a state change may not set (a bug in the caller)."""


def new_job_values(
    new: jobs.NewJob, *, worker_id: str, now: dt.datetime, lease_s: float
) -> dict[str, Any]:
    return {
        "id": new.id,
        "state": lifecycle.JobState.CLAIMED.value,
        "service": new.service,
        "watch": new.watch,
        "claim_key": new.claim_key,
        "source_path": new.source_path,
        "input_name": new.input_name,
        "input_path": new.source_path,
        "input_sha256": None,
        "input_size": None,
        "output_dir": new.output_dir,
        "archive_dir": new.archive_dir,
        "failed_dir": new.failed_dir,
        **FRESH_RUN,
        "attempts": 1,
        "runs": 1,
        "lease_owner": worker_id,
        "lease_expires_at": now + dt.timedelta(seconds=lease_s),
        "next_run_at": now,
        "created_at": now,
        "updated_at": now,
    }


def job(m: Mapping[Any, Any]) -> jobs.Job:
    """A Job from a jobs row (or the values just inserted: same shape)."""
    kw = {name: m[name] for name in JOB_COLUMNS}
    kw["state"] = lifecycle.JobState(kw["state"])
    kw["result_refs"] = json.loads(kw["result_refs"] or "{}")
    kw["outputs"] = json.loads(kw["outputs"] or "{}")
    kw["cancel_requested"] = bool(kw["cancel_requested"])
    return jobs.Job(**kw)


def encode(name: str, value: object) -> object:
    """One `jobs.Fields` value as stored; raise UnknownField for a name it does not declare."""
    if name not in jobs.FIELD_NAMES:
        raise UnknownField(f"a state change cannot set {name!r}")
    if name in _JSON_FIELDS:
        if not isinstance(value, Mapping):
            raise UnknownField(f"{name} must be a mapping, not {type(value).__name__}")
        return redact.redact(json.dumps(dict(value), sort_keys=True))
    if isinstance(value, lifecycle.JobState):
        return value.value
    if isinstance(value, str):
        return redact.redact(value)  # belt and braces: no SAS signature or key is ever stored
    return value


def transition_values(t: jobs.Transition, now: dt.datetime) -> dict[str, Any]:
    """The SET clause of a transition. A terminal state, or a person's command, frees the
    lease. Raise UnknownField for a field the change may not set."""
    values = {name: encode(name, value) for name, value in t.fields.items()}
    values["state"] = t.to.value
    values["updated_at"] = now
    values["next_run_at"] = t.next_run_at or now
    if lifecycle.is_terminal(t.to) or t.actor is lifecycle.Actor.PERSON:
        values["lease_owner"] = None
        values["lease_expires_at"] = None
    if lifecycle.is_terminal(t.to) and values.get("finished_at") is None:
        values["finished_at"] = now
    return values


def event(
    job_id: str,
    at: dt.datetime,
    from_state: lifecycle.JobState | str | None,
    to_state: lifecycle.JobState | str,
    worker: str | None,
    message: str,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "at": at,
        "from_state": None if from_state is None else str(from_state),
        "to_state": str(to_state),
        "worker": worker,
        "message": redact.redact(message),
    }


def job_event(m: Mapping[Any, Any]) -> jobs.JobEvent:
    """A JobEvent from a job_events row."""
    return jobs.JobEvent(
        id=m["id"],
        job_id=m["job_id"],
        at=m["at"],
        from_state=None if m["from_state"] is None else lifecycle.JobState(m["from_state"]),
        to_state=lifecycle.JobState(m["to_state"]),
        worker=m["worker"],
        message=m["message"],
    )
