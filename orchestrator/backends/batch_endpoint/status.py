"""What `status` says about batch-endpoint polling: each service's effective poll interval.

Every status poll of a batch job is an ARM read, and all reads of one subscription share one
budget (`arm_reads_per_s`, set by the first batch-endpoint service of that subscription in the
config, as the daemon does). With N jobs of the subscription polling, no job can be polled more
often than every N / rate seconds, however short the service's poll policy: the interval shown
is the longer of the two. Computed from the config and the database's counts alone, so it needs
no running daemon.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from orchestrator import config, lifecycle
from orchestrator.backends.batch_endpoint import budget as budget_mod

if TYPE_CHECKING:  # `status` reads SQLite without SQLAlchemy: imported where used
    from sqlalchemy.ext import asyncio as sa_asyncio

#: The states in which a job has a remote job being polled.
POLLING_STATES = (lifecycle.JobState.SUBMITTED, lifecycle.JobState.STARTED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PollInterval:
    service: str
    subscription: str
    #: Jobs of the whole subscription (every batch-endpoint service on it) being polled.
    jobs_polling: int
    arm_reads_per_s: float
    #: The service's poll policy cap (poll.max_s): what each job would get with no budget.
    wanted_s: float
    effective_interval_s: float

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def subscription_of(workspace_id: str) -> str:
    """`/subscriptions/{sub}/resourceGroups/…` -> `sub`, as the daemon keys its budgets."""
    parts = workspace_id.strip("/").split("/")
    return parts[1].lower() if len(parts) > 1 else workspace_id


def intervals(
    services: Iterable[config.ServiceConfig], polling_by_service: Mapping[str, int]
) -> list[PollInterval]:
    """One row per batch-endpoint service, in config order. Pure."""
    bes = [s for s in services if isinstance(s, config.BatchEndpointService)]
    rate: dict[str, float] = {}
    polling: dict[str, int] = {}
    for svc in bes:
        sub = subscription_of(svc.workspace_id)
        rate.setdefault(sub, svc.arm_reads_per_s)  # the first service of a subscription sets it
        polling[sub] = polling.get(sub, 0) + polling_by_service.get(svc.name, 0)
    rows = []
    for svc in bes:
        sub = subscription_of(svc.workspace_id)
        budget = budget_mod.ReadBudget(rate[sub])
        rows.append(PollInterval(
            service=svc.name, subscription=sub, jobs_polling=polling[sub],
            arm_reads_per_s=rate[sub], wanted_s=svc.poll.max_s,
            effective_interval_s=round(budget.effective_interval_s(polling[sub], svc.poll.max_s),
                                       3)))
    return rows


async def polling_counts(engine: sa_asyncio.AsyncEngine) -> dict[str, int]:
    """Service name -> its jobs in SUBMITTED or STARTED (read-only; the state index bounds it)."""
    import sqlalchemy as sa

    from orchestrator.db import tables

    jobs_t = tables.jobs
    query = (sa.select(jobs_t.c.service, sa.func.count())
             .where(jobs_t.c.state.in_([s.value for s in POLLING_STATES]))
             .group_by(jobs_t.c.service))
    async with engine.connect() as conn:
        return {str(r[0]): int(r[1]) for r in await conn.execute(query)}


def any_batch_endpoint(services: Iterable[config.ServiceConfig]) -> bool:
    return any(isinstance(s, config.BatchEndpointService) for s in services)


def describe(row: PollInterval) -> str:
    """One line for `status`."""
    limited = row.effective_interval_s > row.wanted_s
    why = (f"the read budget of {row.arm_reads_per_s:g} ARM reads/s over {row.jobs_polling} "
           f"jobs polling on subscription {row.subscription}" if limited
           else f"poll.max_s; {row.jobs_polling} jobs polling on subscription "
                f"{row.subscription} at {row.arm_reads_per_s:g} ARM reads/s")
    return f"{row.service}: effective poll interval {row.effective_interval_s:g} s ({why})"


async def poll_intervals(
    settings: config.Settings, engine: sa_asyncio.AsyncEngine
) -> list[PollInterval]:
    """`status`'s rows; no query when the config has no batch-endpoint service."""
    services = list(settings.services.values())
    if not any_batch_endpoint(services):
        return []
    return intervals(services, await polling_counts(engine))
