"""The pipeline's steps. Each takes a job and the adapters, performs one external effect, and
returns what should happen next. Steps never touch the database: the worker applies results
with guarded transitions, so a step may be repeated after a crash and must be idempotent.

Errors: a step raises `errors.TransientError` (the worker retries it with backoff) or
`errors.PermanentError` (the job fails with that code and message). Domain outcomes, like
"still running" or "BES said Failed", are returned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Mapping

import aiohttp

from orchestrator import config, lifecycle
from orchestrator.bes import client as bes_client
from orchestrator.bes import protocol, throttle
from orchestrator.storage import blob


@dataclasses.dataclass(frozen=True, kw_only=True)
class Advance:
    """The step's effect happened: move to `to`, setting `fields` (names as on jobs.Job)."""

    to: lifecycle.JobState
    message: str
    fields: Mapping[str, object] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Wait:
    """The BES job is still queued or running: look again after `delay_s`."""

    delay_s: float
    bes_status: str
    poll_count: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fail:
    """The job cannot succeed: keep the reason, then move the input to the failed folder."""

    code: str
    message: str
    fields: Mapping[str, object] = dataclasses.field(default_factory=dict)


StepResult = Advance | Wait | Fail


@dataclasses.dataclass(kw_only=True)
class Context:
    """The adapters a step may use. Built once by the worker."""

    settings: config.Settings
    bes: Mapping[str, bes_client.BesClient]
    blobs: blob.BlobStore
    #: Fresh SAS references seen by the poll step, so download need not ask again. Never stored:
    #: after a restart the download step fetches them with one status call.
    sas_cache: dict[str, Mapping[str, protocol.ResultRef]]
    #: Per-stage limits: transfers beyond these wait here, not in the storage account.
    uploads: asyncio.Semaphore
    downloads: asyncio.Semaphore
    #: Jobs whose start call failed in transit: it may have taken effect, so check first.
    start_uncertain: set[str] = dataclasses.field(default_factory=set)
    rng: random.Random = dataclasses.field(default_factory=random.Random)

    def service(self, name: str) -> config.ServiceConfig:
        return self.settings.service(name)

    def client(self, name: str) -> bes_client.BesClient:
        return self.bes[name]


async def open_context(
    settings: config.Settings, session: aiohttp.ClientSession, *, rng: random.Random
) -> Context:
    """Build the adapters every step uses (one per external system); `close_context` ends them."""
    d = settings.daemon
    blobs = blob.BlobStore(settings.storage, session)
    await blobs.ensure_container()
    return Context(
        settings=settings,
        bes={name: bes_client.BesClient(svc, session, gate=throttle.ServiceGate())
             for name, svc in settings.services.items()},
        blobs=blobs,
        sas_cache={},
        uploads=asyncio.Semaphore(d.uploads),
        downloads=asyncio.Semaphore(d.downloads),
        rng=rng,
    )


async def close_context(ctx: Context) -> None:
    await ctx.blobs.close()
