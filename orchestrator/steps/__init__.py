"""The pipeline's steps. Each takes a job and the adapters, performs one external effect, and
returns what should happen next. Steps never touch the database: the worker applies results
with guarded transitions, so a step may be repeated after a crash and must be idempotent.
Steps reach a remote service only through the backend seam (`backends.base.Backend`).

Errors: a step raises `errors.TransientError` (the worker retries it with backoff) or
`errors.PermanentError` (the job fails with that code and message). Domain outcomes, like
"still running" or "the remote job failed", are returned.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Mapping
from typing import Any

import aiohttp

from orchestrator import config, jobs, lifecycle
from orchestrator.backends import base, registry
from orchestrator.storage import blob


@dataclasses.dataclass(frozen=True, kw_only=True)
class Advance:
    """The step's effect happened: move to `to`, setting `fields` (names as on jobs.Job)."""

    to: lifecycle.JobState
    message: str
    fields: jobs.Fields = dataclasses.field(default_factory=lambda: jobs.Fields())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Wait:
    """The remote job is still queued or running: look again after `delay_s`."""

    delay_s: float
    bes_status: str
    poll_count: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fail:
    """The job cannot succeed: keep the reason, then move the input to the failed folder."""

    code: str
    message: str
    fields: jobs.Fields = dataclasses.field(default_factory=lambda: jobs.Fields())


StepResult = Advance | Wait | Fail


@dataclasses.dataclass(kw_only=True)
class Context:
    """The adapters a step may use. Built once by the worker (`open_context`)."""

    settings: config.Settings
    #: Service name -> its backend: the only way a step reaches a remote service.
    backends: Mapping[str, base.Backend]
    #: The classic BES blob store: None when no service is of kind "bes" (a batch-endpoint-only
    #: daemon may run with `[storage] account_url` and no key at all).
    blobs: blob.BlobStore | None
    #: `[storage.credential]`'s credential, shared by the batch endpoints (closed here).
    storage_credential: Any = None
    #: Result references seen by the poll step, so download need not ask again. Never stored
    #: (they may carry SAS tokens, or an RRS answer): after a restart the download step asks
    #: the backend once more.
    result_cache: dict[str, Mapping[str, base.ResultRef]]
    #: Per-stage limits: transfers beyond these wait here, not in the storage account.
    uploads: asyncio.Semaphore
    downloads: asyncio.Semaphore
    #: Jobs whose submit failed in transit: it may have taken effect.
    submit_uncertain: set[str] = dataclasses.field(default_factory=set)
    #: Jobs whose start call failed in transit: it may have taken effect, so check first.
    start_uncertain: set[str] = dataclasses.field(default_factory=set)
    rng: random.Random = dataclasses.field(default_factory=random.Random)

    def service(self, name: str) -> config.ServiceConfig:
        return self.settings.service(name)

    def backend(self, name: str) -> base.Backend:
        return self.backends[name]


async def open_context(
    settings: config.Settings, session: aiohttp.ClientSession, *, rng: random.Random
) -> Context:
    """Build the adapters every step uses (one per external system); `close_context` ends them."""
    d = settings.daemon
    blobs: blob.BlobStore | None = None
    if registry.needs_blob_store(settings):
        blobs = blob.BlobStore(settings.storage, session)
        await blobs.ensure_container()
    credential = registry.storage_credential(settings)
    shared = registry.Shared(settings=settings, session=session, blobs=blobs,
                             storage_credential=credential)
    return Context(
        settings=settings,
        backends={name: registry.build(svc, shared) for name, svc in settings.services.items()},
        blobs=blobs,
        storage_credential=credential,
        result_cache={},
        uploads=asyncio.Semaphore(d.uploads),
        downloads=asyncio.Semaphore(d.downloads),
        rng=rng,
    )


async def close_context(ctx: Context) -> None:
    for backend in ctx.backends.values():
        await backend.close()
    if ctx.blobs is not None:
        await ctx.blobs.close()
    if ctx.storage_credential is not None:
        await ctx.storage_credential.close()
