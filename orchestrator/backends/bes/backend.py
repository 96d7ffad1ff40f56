"""Classic BES behind the backend seam: upload to blob storage, submit, start, poll, download
from the SAS URLs in `Results`. The wire is `client` and `protocol`; this module only maps it
onto `backends.base`.

Never twice: the submit returns an id that the worker commits before start is ever called; a
crash in between leaves an unstarted BES job, which costs nothing and runs nothing, so an
uncertain submit simply submits again. An uncertain start is resolved by the stored id: a status
past NotStarted proves the earlier start took effect, and a second start is refused by BES
with CannotStartJob, so no job is ever started twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp

from orchestrator import config, errors, jobs, metrics
from orchestrator.backends import base
from orchestrator.backends.bes import client as client_mod
from orchestrator.backends.bes import protocol, throttle
from orchestrator.storage import blob, naming

#: BES statuses as neutral phases.
PHASES: Mapping[protocol.BesStatus, base.Phase] = {
    protocol.BesStatus.NOT_STARTED: base.Phase.QUEUED,
    protocol.BesStatus.RUNNING: base.Phase.RUNNING,
    protocol.BesStatus.FAILED: base.Phase.FAILED,
    protocol.BesStatus.CANCELLED: base.Phase.CANCELLED,
    protocol.BesStatus.FINISHED: base.Phase.FINISHED,
}


def input_blob(job: jobs.Job, input_name: str) -> str:
    """The job's input blob: deterministic, so a repeated upload overwrites the same blob."""
    return naming.input_blob_name(job.id, input_name, Path(job.input_name).suffix.lower() or ".csv")


def to_report(report: protocol.StatusReport) -> base.Report:
    return base.Report(phase=PHASES[report.status], status=report.status.value,
                       results=report.results, details=report.details)


class BesBackend:
    """One BES service (`kind = "bes"`)."""

    kind = "bes"
    noun = "BES job"
    code_prefix = "Bes"

    def __init__(self, service: config.BesService, session: aiohttp.ClientSession,
                 blobs: blob.BlobStore) -> None:
        self.name = service.name
        self.service = service
        self.outputs: Mapping[str, str] = dict(service.outputs)
        self.blobs = blobs
        self.client = client_mod.BesClient(service, session, gate=throttle.ServiceGate())

    # ---- the seam -------------------------------------------------------------------------

    async def prepare_input(self, job: jobs.Job) -> str:
        size = await self.blobs.upload_file(Path(job.input_path),
                                            input_blob(job, self.service.input_name))
        metrics.bytes_uploaded.labels(self.name).inc(size)
        return f"uploaded {size} bytes"

    def submit_body(self, job: jobs.Job) -> dict[str, Any]:
        service = self.service
        inputs: dict[str, dict[str, Any]] = {
            service.input_name: self.blobs.reference(input_blob(job, service.input_name),
                                                     write=False)
        }
        for name, location in service.extra_inputs.items():
            container, _, blob_name = location.strip("/").partition("/")
            inputs[name] = self.blobs.reference_for(container, blob_name, write=False)
        outputs = {
            name: self.blobs.reference(naming.output_blob_name(job.id, name, ext), write=True)
            for name, ext in service.outputs.items()
        }
        return protocol.build_submit_body(
            inputs=inputs, outputs=outputs, global_parameters=service.global_parameters
        )

    async def submit(self, job: jobs.Job, *, maybe_submitted: bool) -> base.Submitted:
        # An earlier submit whose id was never committed left at most an unstarted BES job:
        # nothing can start it, so submitting again is safe whatever `maybe_submitted` says.
        del maybe_submitted
        bes_job_id = await self.client.submit(self.submit_body(job))
        return base.Submitted(remote_id=bes_job_id, status=protocol.BesStatus.NOT_STARTED.value,
                              message=f"BES job {bes_job_id} submitted")

    async def start(self, job: jobs.Job, *, maybe_started: bool) -> str:
        assert job.bes_job_id is not None, "start without a committed BES job id"
        if maybe_started:
            # An earlier start may have taken effect (lost response, or a crash after the
            # call): a status past NotStarted proves it, and then start is not called again.
            report = await self.client.status(job.bes_job_id)
            if report.status is not protocol.BesStatus.NOT_STARTED:
                return f"BES job already {report.status.value}; not started again"
        try:
            await self.client.start(job.bes_job_id)
        except client_mod.StartConflict:
            return "BES job was already started (CannotStartJob)"
        return "BES job started"

    async def status(self, job: jobs.Job) -> base.Report:
        assert job.bes_job_id is not None, "status without a committed BES job id"
        return to_report(await self.client.status(job.bes_job_id))

    async def cancel(self, remote_id: str) -> None:
        await self.client.cancel(remote_id)

    def open_result(self, ref: base.ResultRef
                    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        if not isinstance(ref, protocol.ResultRef):
            raise errors.PermanentError("not a BES result reference", code="BadResult")
        return self.blobs.open_download(ref)

    async def cleanup(self, job: jobs.Job) -> None:
        names = [input_blob(job, self.service.input_name)] + [
            naming.output_blob_name(job.id, n, ext) for n, ext in self.service.outputs.items()
        ]
        with contextlib.suppress(errors.TransientError):
            await self.blobs.delete_blobs(names)

    async def close(self) -> None:
        """Nothing of its own: the session and the blob store are shared."""
