"""The one write path for a job's state: `apply`. Workers' steps, people's commands (`jobs
cancel`, `jobs retry`), the tests and the benches all change a job through it.

Every change is a guarded UPDATE
    ... WHERE id = :id AND state = :expected AND lease_owner = :me
(a person's command drops the lease condition: people overrule workers, whose next guarded
write then finds the state changed and stops) plus a `job_events` row, in one transaction.

Before anything is written each item is checked, purely: the state change must be an edge of
`lifecycle.EDGES` for its actor, and every field must be one `jobs.Fields` declares. An item
that fails the check is `Rejected` (a bug: never written); one whose guard does not hold is
`Lost` (another worker or a person owns the job now); the others are `Applied`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext import asyncio as sa_asyncio

from orchestrator import jobs, lifecycle
from orchestrator.db import dialect as db_dialect
from orchestrator.db import queries, rows, tables

_JOBS = tables.jobs
_EVENTS = tables.job_events

Item = jobs.Transition | jobs.Reschedule


@dataclasses.dataclass(frozen=True, kw_only=True)
class Applied:
    """Committed, with its event."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Lost:
    """The guard did not hold: nothing was written for this item."""

    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rejected:
    """The item is a bug (an illegal state change, a field no change may set): never written."""

    reason: str


Outcome = Applied | Lost | Rejected
APPLIED = Applied()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Row:
    state: str
    bes_status: str | None
    lease_owner: str | None


async def apply(
    conn: sa_asyncio.AsyncConnection,
    dialect: db_dialect.Dialect,
    items: Sequence[Item],
    *,
    worker_id: str | None,
    now: dt.datetime,
) -> list[Outcome]:
    """Apply `items` in order inside the caller's write transaction; one outcome per item.
    A job may appear more than once: each item's guard sees the state the earlier ones left,
    so a poll's reschedule and the transition after it can share a batch."""
    if not items:
        return []
    current = await _current_rows(conn, dialect, {i.job_id for i in items})
    plan = _Plan.make(items, current, worker_id=worker_id, now=now)
    for round_ in plan.rounds:
        await dialect.update_many(conn, round_.groups, db_dialect.GUARD)
    if plan.events:
        await conn.execute(sa.insert(_EVENTS), plan.events)
    return plan.outcomes


async def _current_rows(
    conn: sa_asyncio.AsyncConnection, dialect: db_dialect.Dialect, ids: Iterable[str]
) -> dict[str, _Row]:
    """The rows the guards are checked against, locked until commit on PostgreSQL (in id order,
    like a heartbeat's, so the two cannot deadlock); SQLite's single writer is us already."""
    out: dict[str, _Row] = {}
    ordered = sorted(ids)
    for start in range(0, len(ordered), dialect.id_chunk):
        chunk = ordered[start:start + dialect.id_chunk]
        query = dialect.lock(
            sa.select(_JOBS.c.id, _JOBS.c.state, _JOBS.c.bes_status, _JOBS.c.lease_owner)
            .where(dialect.id_in(_JOBS.c.id, chunk))
            .order_by(_JOBS.c.id)
        )
        for r in await conn.execute(query):
            out[r.id] = _Row(state=r.state, bes_status=r.bes_status, lease_owner=r.lease_owner)
    return out


@dataclasses.dataclass
class _Round:
    """Updates that touch each job at most once, so they can run as executemany batches."""

    #: SET column names -> parameter sets; executemany needs the same keys in every set.
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def add(self, values: dict[str, Any], guard: dict[str, Any]) -> None:
        self.groups.setdefault(tuple(sorted(values)), []).append({**values, **guard})


@dataclasses.dataclass
class _Plan:
    rounds: list[_Round]
    events: list[dict[str, Any]]
    outcomes: list[Outcome]

    @classmethod
    def make(
        cls,
        items: Sequence[Item],
        current: dict[str, _Row],
        *,
        worker_id: str | None,
        now: dt.datetime,
    ) -> _Plan:
        """Pure: check each item against the rows read (and the items before it), and sort the
        passing ones into rounds: the n-th change of a job goes into round n."""
        plan = cls(rounds=[], events=[], outcomes=[])
        state = dict(current)
        changes: dict[str, int] = {}
        for item in items:
            person = isinstance(item, jobs.Transition) and item.actor is lifecycle.Actor.PERSON
            actor = None if person else worker_id
            checked = _check(item, actor, now)
            if person and worker_id is not None:
                checked = Rejected(reason=f"job {item.job_id[:8]}: a person's change sent by "
                                          f"worker {worker_id}")
            if isinstance(checked, Rejected):
                plan.outcomes.append(checked)
                continue
            row = state.get(item.job_id)
            lost = _lost_reason(item, row, actor)
            if lost is not None:
                plan.outcomes.append(Lost(reason=lost))
                continue
            assert row is not None
            n = changes.get(item.job_id, 0)
            changes[item.job_id] = n + 1
            if n == len(plan.rounds):
                plan.rounds.append(_Round())
            guard = {"b_id": item.job_id, "b_expected": item.expected.value, "b_owner": actor}
            plan.rounds[n].add(checked, guard)
            plan.outcomes.append(APPLIED)
            if isinstance(item, jobs.Transition):
                plan.events.append(
                    rows.event(item.job_id, now, item.expected, item.to, actor, item.message)
                )
                if lifecycle.is_terminal(item.to):
                    del state[item.job_id]  # the lease is freed: nothing later may touch it
                else:
                    state[item.job_id] = _Row(
                        state=item.to.value,
                        bes_status=checked.get("bes_status", row.bes_status),
                        lease_owner=checked.get("lease_owner", row.lease_owner),
                    )
                continue
            if item.bes_status != row.bes_status:
                plan.events.append(
                    rows.event(item.job_id, now, item.expected, item.expected, actor,
                               f"BES status {row.bes_status} -> {item.bes_status}")
                )
            state[item.job_id] = dataclasses.replace(row, bes_status=item.bes_status)
        return plan


def _check(item: Item, actor: str | None, now: dt.datetime) -> dict[str, Any] | Rejected:
    """Pure: the SET values of a legal item, or why it is a bug."""
    where = f"job {item.job_id[:8]}"
    if isinstance(item, jobs.Reschedule):
        if actor is None:
            return Rejected(reason=f"{where}: a reschedule needs the worker holding the lease")
        return {"next_run_at": item.next_run_at, "bes_status": item.bes_status,
                "poll_count": item.poll_count, "updated_at": now}
    refusal = lifecycle.refusal(item.expected, item.to, item.actor)
    if refusal is not None:
        return Rejected(reason=f"{where}: {refusal}")
    if item.actor is lifecycle.Actor.WORKER and actor is None:
        return Rejected(reason=f"{where}: a worker's change needs a worker id")
    try:
        return rows.transition_values(item, now)
    except rows.UnknownField as exc:
        return Rejected(reason=f"{where}: {exc}")


def _lost_reason(item: Item, row: _Row | None, actor: str | None) -> str | None:
    """Pure: why the guard fails (None when it holds)."""
    want = f"job {item.job_id[:8]}: expected state {item.expected}"
    if actor is not None:
        want += f" leased to {actor}"
    if row is None:
        return f"{want}; no such job, or it ended"
    if row.state != item.expected.value or (actor is not None and row.lease_owner != actor):
        return f"{want}; found state {row.state} leased to {row.lease_owner}"
    return None


# -- people's commands: transitions by a person, through `apply` -------------------------------
async def request_cancel(
    conn: sa_asyncio.AsyncConnection, dialect: db_dialect.Dialect, job_id: str, *,
    now: dt.datetime,
) -> jobs.Job:
    """Any job still moving forward -> CANCELLING with the lease freed, so whichever worker
    claims it next runs the cancel step. A job already CANCELLING is returned unchanged; one
    that ended or is FAILING raises InvalidState. Accepts an id prefix."""
    job = await queries.resolve(conn, job_id, lock_with=dialect)
    if job.state is lifecycle.JobState.CANCELLING:
        return job
    if not lifecycle.can_cancel(job.state):
        raise queries.InvalidState(f"job {job.short_id} is {job.state}: it cannot be cancelled")
    t = jobs.Transition(
        job_id=job.id, expected=job.state, to=lifecycle.JobState.CANCELLING,
        message="cancel requested", fields={"cancel_requested": True}, next_run_at=now,
        actor=lifecycle.Actor.PERSON,
    )
    return await _person(conn, dialect, t, now=now)


async def retry(
    conn: sa_asyncio.AsyncConnection, dialect: db_dialect.Dialect, job_id: str, *,
    now: dt.datetime,
) -> jobs.Job:
    """FAILED/CANCELLED -> run again, runs + 1, attempts 0; raise InvalidState otherwise.
    Accepts an id prefix.

    Where it starts is `lifecycle.resume_state`: a job that failed locally after its remote
    job finished (a full results disk, a broken download) resumes at that step with the
    remote job's references kept; the input stays where the history says it is (the failed
    folder) until the finish step archives it. Anything else starts from CLAIMED with
    source_path = the input's current place, which the claim step moves back into the spool."""
    job = await queries.resolve(conn, job_id, lock_with=dialect)
    if not lifecycle.can_retry(job.state):
        raise queries.InvalidState(
            f"job {job.short_id} is {job.state}: only failed or cancelled jobs are retried"
        )
    resume = lifecycle.JobState.CLAIMED
    if job.state is lifecycle.JobState.FAILED:
        resume = lifecycle.resume_state(await queries.failed_from(conn, job.id), job.error_code)
    fields: jobs.Fields = {"runs": job.runs + 1, "attempts": 0, "error": None,
                           "error_code": None, "finished_at": None, "cancel_requested": False}
    if resume is lifecycle.JobState.CLAIMED:
        fields.update(jobs.fresh_run(job))
        message = "retry requested"
    else:
        step = lifecycle.STEP_FOR_STATE[resume]
        message = (f"retry requested; resuming at the {step} step"
                   f" (it failed with {job.error_code}; the remote results are kept)")
    t = jobs.Transition(job_id=job.id, expected=job.state, to=resume, message=message,
                        fields=fields, next_run_at=now, actor=lifecycle.Actor.PERSON)
    return await _person(conn, dialect, t, now=now)


async def _person(
    conn: sa_asyncio.AsyncConnection, dialect: db_dialect.Dialect, t: jobs.Transition, *,
    now: dt.datetime,
) -> jobs.Job:
    [outcome] = await apply(conn, dialect, [t], worker_id=None, now=now)
    if isinstance(outcome, Rejected):  # pragma: no cover - the checks above rule it out
        raise queries.InvalidState(outcome.reason)
    if isinstance(outcome, Lost):  # pragma: no cover - the row is locked (PG) or we are the writer
        raise queries.InvalidState(f"job {t.job_id[:8]} changed meanwhile; try again")
    return await queries.resolve(conn, t.job_id)
