"""Azure Machine Learning batch endpoints behind the backend seam (`kind = "batch_endpoint"`).

The flow for one input:
1. prepare_input: upload it to `<prefix>/<job id>/<attempt>/in/<file name>` in the container of
   the workspace datastore (resolved once through ARM; its account must be `[storage]`'s).
2. submit: invoke the endpoint with that input and an output file of our own at
   `<prefix>/<job id>/<attempt>/out/<output_file>` (the service fails a job whose output exists,
   so every submission gets a fresh path), tagged with our job id and attempt. The worker commits
   the returned `batchjob-…` name before anything depends on it. start is a no-op.
3. status through ARM, at a slot of the subscription's read budget; cancel through ARM.
4. open_result: read the output file we named, from the same container.

Never twice: invoke creates and starts a job and is not idempotent. When an earlier invoke for
this job may have taken effect (its answer was lost, or the daemon died before committing the
name), the job is first looked up through ARM by its tags, and invoked again only if none
exists. Whether ARM lists a job the moment invoke returns is not documented, so a lookup that
finds nothing is trusted only once `invoke_lookup_grace_s` has passed since that invoke could have
happened; until then the step waits (a transient error) instead of invoking.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
from azure.core import exceptions as azure_errors
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage.blob import aio as azblob_aio

from orchestrator import config, errors, jobs, metrics
from orchestrator.backends import base
from orchestrator.backends.batch_endpoint import budget as budget_mod
from orchestrator.backends.batch_endpoint import client as client_mod
from orchestrator.backends.batch_endpoint import protocol
from orchestrator.storage import blob

#: A poll whose read slot is this close counts as due now.
SLOT_SLACK_S = 0.05
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
#: Stable across retries of one submission, so the service could de-duplicate (undocumented).
_REQUEST_NS = uuid.UUID("5b0c1d0e-6c0f-4f57-9d0a-2b3c4d5e6f70")


@dataclasses.dataclass(frozen=True)
class BlobRef:
    """The output file of a completed job: a blob in the datastore's container (no secret)."""

    public_url: str
    blob_name: str


def attempt_of(job: jobs.Job) -> str:
    """Which submission of the job this is: `jobs retry` and resubmits each get a fresh one."""
    return str(job.runs) if job.resubmits == 0 else f"{job.runs}.{job.resubmits}"


def job_folder(prefix: str, job: jobs.Job) -> str:
    return f"{prefix.strip('/')}/{job.id}/{attempt_of(job)}"


class BatchEndpointBackend:
    """One batch endpoint (`kind = "batch_endpoint"`)."""

    kind = "batch_endpoint"
    noun = "batch job"
    code_prefix = "Batch"

    def __init__(
        self,
        service: config.BatchEndpointService,
        *,
        session: aiohttp.ClientSession,
        storage: config.StorageConfig,
        credential: Any,
        budget: budget_mod.ReadBudget,
        owns_credential: bool = True,
        storage_credential: Any = None,
    ) -> None:
        """`credential` gets the ML and ARM tokens (closed here when `owns_credential`);
        `storage_credential`, from `[storage.credential]`, the datastore's when `[storage]` has
        `account_url`: the caller builds it once for every backend and closes it."""
        self.name = service.name
        self.service = service
        self.storage = storage
        self.session = session
        self.credential = credential
        self._owns_credential = owns_credential
        self.storage_credential = storage_credential
        ext = PurePosixPath(service.output_file).suffix.lower() or ".csv"
        self.outputs: Mapping[str, str] = {service.output_name: ext}
        self.budget = budget
        self.client = client_mod.BatchEndpointClient(
            service=service.name, session=session, credential=credential,
            scoring_uri=service.scoring_uri, deployment=service.deployment,
            workspace_id=service.workspace_id, arm_url=service.arm_url,
            api_version=service.api_version, budget=budget,
            request_timeout_s=service.request_timeout_s,
        )
        self._container: azblob_aio.ContainerClient | None = None
        self._service_client: azblob_aio.BlobServiceClient | None = None
        self._resolving = asyncio.Lock()
        #: job id -> the monotonic time of its reserved ARM read (its next poll).
        self._slots: dict[str, float] = {}
        #: Jobs whose slot was given up because they came late, and replaced once.
        self._reslotted: set[str] = set()
        #: job id -> when an invoke for it may have taken effect (monotonic).
        self._invoked_at: dict[str, float] = {}
        self._started = time.monotonic()

    # ---- storage --------------------------------------------------------------------------

    async def _datastore_container(self) -> azblob_aio.ContainerClient:
        """The datastore's container, resolved through ARM once (refusing another account)."""
        if self._container is not None:
            return self._container
        async with self._resolving:
            if self._container is None:
                ds = await self.client.datastore(self.service.datastore)
                svc = self._storage_service()
                if (svc.account_name or "").lower() != ds.account_name.lower():
                    raise errors.PermanentError(
                        f"datastore {self.service.datastore!r} is on storage account "
                        f"{ds.account_name!r}, but [storage] is account {svc.account_name!r}:"
                        " point [storage] at the datastore's account", code="DatastoreMismatch")
                self._service_client = svc
                self._container = svc.get_container_client(ds.container_name)
        assert self._container is not None
        return self._container

    def _storage_service(self) -> azblob_aio.BlobServiceClient:
        transport = AioHttpTransport(session=self.session, session_owner=False)
        retry = azblob_aio.ExponentialRetry(initial_backoff=1, increment_base=2,
                                            retry_total=blob.SDK_RETRY_TOTAL)
        if self.storage.account_url is not None:
            # Entra ID (scope https://storage.azure.com/.default): no account key at all.
            if self.storage_credential is None:
                raise errors.ConfigError("storage.credential",
                                         "no credential was built for account_url")
            return azblob_aio.BlobServiceClient(
                self.storage.account_url, credential=self.storage_credential,
                transport=transport, retry_policy=retry)
        return azblob_aio.BlobServiceClient.from_connection_string(
            self.storage.connection_string.get(), transport=transport, retry_policy=retry)

    # ---- the seam -------------------------------------------------------------------------

    def _paths(self, job: jobs.Job) -> tuple[str, str]:
        folder = job_folder(self.service.path_prefix, job)
        return (f"{folder}/in/{Path(job.input_name).name}",
                f"{folder}/out/{self.service.output_file}")

    async def prepare_input(self, job: jobs.Job) -> str:
        container = await self._datastore_container()
        name, _ = self._paths(job)
        try:
            with open(job.input_path, "rb") as f:  # noqa: ASYNC230 - the SDK reads it in chunks
                size = os.fstat(f.fileno()).st_size
                await container.get_blob_client(name).upload_blob(f, length=size, overwrite=True)
        except OSError as exc:
            raise errors.PermanentError(f"cannot read input {job.input_name!r}: {exc.strerror}",
                                        code="InputUnreadable") from None
        except azure_errors.AzureError as exc:
            raise _storage_error("upload", exc) from None
        metrics.bytes_uploaded.labels(self.name).inc(size)
        return f"uploaded {size} bytes to datastore {self.service.datastore}"

    async def submit(self, job: jobs.Job, *, maybe_submitted: bool) -> base.Submitted:
        attempt = attempt_of(job)
        if maybe_submitted:
            found = await self.client.find_job(job.id, attempt)
            if found is not None:
                self._invoked_at.pop(job.id, None)
                return base.Submitted(
                    remote_id=found.name, status=found.status,
                    message=f"batch job {found.name} found by its tags (an earlier invoke "
                            "took effect); not invoked again")
            since = self._invoked_at.get(job.id, self._started)
            wait = since + self.service.invoke_lookup_grace_s - time.monotonic()
            if wait > 0:
                raise errors.TransientError(
                    "an earlier invoke may have taken effect and ARM does not list it yet;"
                    f" looking again in {wait:.0f} s before invoking", retry_after_s=wait,
                    code="InvokeUncertain")
        input_path, output_path = self._paths(job)
        svc = self.service
        body = protocol.build_invoke_body(
            input_name=svc.input_name,
            input_uri=protocol.datastore_uri(svc.datastore, input_path),
            output_name=svc.output_name,
            output_uri=protocol.datastore_uri(svc.datastore, output_path),
            job_id=job.id, attempt=attempt,
            overrides=protocol.Overrides(
                mini_batch_size=svc.mini_batch_size, instance_count=svc.instance_count,
                error_threshold=svc.error_threshold, max_retries=svc.max_retries,
                retry_timeout_s=svc.retry_timeout_s),
        )
        self._invoked_at[job.id] = time.monotonic()
        created = await self.client.invoke(
            body, request_id=str(uuid.uuid5(_REQUEST_NS, f"{job.id}/{attempt}")))
        self._invoked_at.pop(job.id, None)
        where = f" ({created.studio_url})" if created.studio_url else ""
        return base.Submitted(remote_id=created.name, status=created.status,
                              message=f"batch job {created.name} invoked{where}")

    async def start(self, job: jobs.Job, *, maybe_started: bool) -> str:
        del job, maybe_started
        return "batch job started by its invoke"

    def poll_wait_s(self, job: jobs.Job) -> float:
        """Seconds until this job's ARM read slot (0: poll now). Reserves one if it has none."""
        now = time.monotonic()
        old = self._slots.get(job.id)
        slot = self.budget.slot_for_poll(old, now, may_reslot=job.id not in self._reslotted)
        if slot != old:
            self._slots[job.id] = slot
            if old is not None:
                self._reslotted.add(job.id)
        if slot - now > SLOT_SLACK_S:
            return slot - now
        del self._slots[job.id]
        self._reslotted.discard(job.id)
        return 0.0

    def next_poll_delay_s(self, job: jobs.Job, wanted_s: float) -> float:
        """Reserve the read slot of the job's next poll, at or after `wanted_s` from now."""
        now = time.monotonic()
        slot = self._slots[job.id] = self.budget.reserve(now + wanted_s, now)
        return max(wanted_s, slot - now)

    def forget(self, job: jobs.Job) -> None:
        self._slots.pop(job.id, None)
        self._reslotted.discard(job.id)
        self._invoked_at.pop(job.id, None)

    async def status(self, job: jobs.Job) -> base.Report:
        assert job.bes_job_id is not None, "status without a committed batch job name"
        remote = await self.client.get_job(job.bes_job_id)
        state = remote.state
        if state is protocol.RemoteState.FINISHED:
            self._slots.pop(job.id, None)
            _, output = self._paths(job)
            container = await self._datastore_container()
            ref = BlobRef(public_url=f"{container.url}/{output}", blob_name=output)
            return base.Report(phase=base.Phase.FINISHED, status=remote.status,
                               results={self.service.output_name: ref})
        page = f"; see {remote.studio_url}" if remote.studio_url else ""
        if state is protocol.RemoteState.FAILED:
            self._slots.pop(job.id, None)
            return base.Report(phase=base.Phase.FAILED, status=remote.status,
                               details=f"batch job {remote.name} ended {remote.status}{page}")
        if state is protocol.RemoteState.CANCELLED:
            self._slots.pop(job.id, None)
            return base.Report(phase=base.Phase.CANCELLED, status=remote.status,
                               details=f"batch job {remote.name} was {remote.status}{page}")
        phase = base.Phase.QUEUED if state is protocol.RemoteState.QUEUED else base.Phase.RUNNING
        return base.Report(phase=phase, status=remote.status)

    async def cancel(self, remote_id: str) -> None:
        await self.client.cancel(remote_id)

    def open_result(self, ref: base.ResultRef
                    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        if not isinstance(ref, BlobRef):
            raise errors.PermanentError("not a batch-endpoint result", code="BadResult")
        return self._open(ref)

    @contextlib.asynccontextmanager
    async def _open(self, ref: BlobRef) -> AsyncIterator[AsyncIterator[bytes]]:
        container = await self._datastore_container()
        try:
            downloader = await container.get_blob_client(ref.blob_name).download_blob()
        except azure_errors.ResourceNotFoundError:
            raise errors.PermanentError(
                f"the batch job completed but wrote no {self.service.output_file} at "
                f"{ref.blob_name}", code="NoResults") from None
        except azure_errors.AzureError as exc:
            raise _storage_error("download", exc) from None

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for data in downloader.chunks():
                    yield data
            except azure_errors.AzureError as exc:
                raise _storage_error("download", exc) from None

        yield chunks()

    async def cleanup(self, job: jobs.Job) -> None:
        container = await self._datastore_container()
        for name in self._paths(job):
            with contextlib.suppress(azure_errors.AzureError):
                await container.delete_blob(name)

    async def close(self) -> None:
        if self._service_client is not None:
            await self._service_client.close()
        if self._owns_credential:
            with contextlib.suppress(Exception):
                await self.credential.close()


def _storage_error(action: str, exc: Exception) -> errors.OrchestratorError:
    status = getattr(exc, "status_code", None)
    text = f"datastore {action} failed: {type(exc).__name__}" + (
        f" (HTTP {status})" if status else "")
    if status in (400, 403, 404, 409):
        return errors.PermanentError(text, code="StorageRefused", status=status)
    return errors.TransientError(text, code="StorageError", status=status)
