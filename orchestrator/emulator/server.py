"""The emulator: an aiohttp server speaking BES and RRS (and, through `batch`, Azure ML batch
endpoints), with the gateway's and the service's faults simulated (docs/emulator.md).

Routes under `/workspaces/{workspace}/services/{service}` (all need `?api-version=2.0`):
`POST /jobs`, `POST /jobs/{id}/start`, `GET /jobs/{id}`, `DELETE /jobs/{id}`, `GET /swagger.json`,
`POST /execute`. Introspection (no auth, no faults): `GET /_emulator/stats`,
`GET /_emulator/jobs/{id}`, `POST /_emulator/config`.

swagger.json lists names in `definitions`: `ExecutionInputs.properties` (inputs),
`ExecutionOutputs.properties` (outputs) and `GlobalParameters.properties`.

Jobs really run as asyncio tasks: after start they wait the queue delay, then FIFO for a running
slot, then read their input through the request's own storage reference, run the service's
model, write every output and finish with read-only SAS references in `Results`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from orchestrator import logs
from orchestrator.emulator import batch, blobs, models
from orchestrator.emulator import options as options_mod
from orchestrator.storage import naming

API_VERSION = "2.0"
APIM_401_MESSAGE = (
    "Access denied due to invalid subscription key. Make sure to provide a valid key for an "
    "active subscription."
)
APIM_403_MESSAGE = "Out of call volume quota. Quota will be replenished in {s}."
APIM_429_MESSAGE = "Rate limit is exceeded. Try again in {s} seconds."

_log = logs.get("emulator")


class Status(enum.StrEnum):
    #: Submitted, or started and waiting (queue delay, then FIFO for a running slot).
    NOT_STARTED = "NotStarted"
    #: Holding a running slot: reading, scoring, writing.
    RUNNING = "Running"
    #: Ended with Details.
    FAILED = "Failed"
    #: Deleted before it ended.
    CANCELLED = "Cancelled"
    #: Every output written; Results filled.
    FINISHED = "Finished"


#: Integer encodings (--int-status): NotStarted 0, Running 1, Failed 2, Cancelled 3, Finished 4.
STATUS_INT: dict[Status, int] = {s: i for i, s in enumerate(Status)}
TERMINAL: frozenset[Status] = frozenset({Status.FAILED, Status.CANCELLED, Status.FINISHED})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    id: str
    workspace: str
    service: str
    model: str
    inputs: Mapping[str, blobs.BlobRef]
    outputs: Mapping[str, blobs.BlobRef]
    global_parameters: Mapping[str, str]
    #: The submit body with credentials replaced by "***".
    submitted: Mapping[str, Any]
    status: Status = Status.NOT_STARTED
    started: bool = False
    details: str | None = None
    results: Mapping[str, Any] | None = None


class ApiError(Exception):
    """Becomes BES's error body: {"error": {"code", "message", "details": [{"code",
    "message"}]}}."""

    def __init__(self, status: int, code: str, message: str,
                 details: list[tuple[str, str]] | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": {"code": self.code, "message": self.message}}
        if self.details:
            body["error"]["details"] = [{"code": c, "message": m} for c, m in self.details]
        return web.json_response(body, status=self.status, headers=self.headers)


def bad_argument(detail_code: str, message: str) -> ApiError:
    return ApiError(400, "BadArgument", "Invalid argument provided.", [(detail_code, message)])


class _Window:
    """A fixed-window counter, as APIM's rate-limit and quota policies count calls."""

    def __init__(self) -> None:
        self.start = 0.0
        self.count = 0

    def hit(self, limit: options_mod.RateLimit, now: float) -> int | None:
        """None if the call is allowed, else seconds until the window resets."""
        if now - self.start >= limit.period_s:
            self.start, self.count = now, 0
        self.count += 1
        if self.count <= limit.calls:
            return None
        return max(1, math.ceil(self.start + limit.period_s - now))


STATS_COUNTERS = (
    "submits", "starts", "start_conflicts", "polls", "deletes", "executes", "http_401",
    "http_403", "http_429", "http_503", "dropped", "double_starts", "failures_injected",
)


class Emulator:
    """The state behind one emulator app: jobs, the FIFO of started jobs, counters."""

    def __init__(self, options: options_mod.EmulatorOptions) -> None:
        problem = _unknown_model(options)
        if problem:
            raise options_mod.OptionError(problem)
        self.options = options
        self.rng = random.Random(options.seed)
        self.jobs: dict[str, Job] = {}
        self.counters: collections.Counter[str] = collections.Counter(
            {k: 0 for k in STATS_COUNTERS}
        )
        self.scored: collections.Counter[str] = collections.Counter()
        self.fifo: collections.deque[str] = collections.deque()
        self.running: set[str] = set()
        self.max_running_seen = 0
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.storage = blobs.Storage(chunk_bytes=options.chunk_bytes)
        self._rate = _Window()
        self._quota = _Window()
        self.batch = batch.BatchEndpoints(lambda: self.options, self.storage, self.rng)

    # -- helpers -----------------------------------------------------------------------------

    def _uniform(self, bounds: tuple[float, float]) -> float:
        lo, hi = bounds
        return lo if hi <= lo else self.rng.uniform(lo, hi)

    def model_for(self, service: str) -> models.Model:
        return models.REGISTRY[self.options.services.get(service, self.options.default_model)]

    def declared_parameters(self, service: str) -> tuple[str, ...]:
        if self.options.global_parameters is not None:
            return self.options.global_parameters
        return self.model_for(service).parameters

    def _job(self, request: web.Request) -> Job:
        job = self.jobs.get(request.match_info["job_id"])
        if (job is None or job.workspace != request.match_info["workspace"]
                or job.service != request.match_info["service"]):
            raise ApiError(404, "NotFound", "The job was not found.",
                           [("JobNotFound", f"No job with id {request.match_info['job_id']!r} "
                                            "in this web service.")])
        return job

    def _set(self, job: Job, **changes: Any) -> Job:
        job = dataclasses.replace(job, **changes)
        self.jobs[job.id] = job
        return job

    # -- middleware: gateway, auth, simulated faults ---------------------------------------

    def _gateway(self) -> None:
        """What API Management answers before the service sees the call (key, rate limit, quota)."""
        opts = self.options
        now = time.monotonic()
        for window, limit, status in ((self._rate, opts.rate_limit, 429),
                                      (self._quota, opts.quota, 403)):
            if limit is None:
                continue
            wait = window.hit(limit, now)
            if wait is not None:
                self.counters[f"http_{status}"] += 1
                message = (APIM_429_MESSAGE.format(s=wait) if status == 429 else
                           APIM_403_MESSAGE.format(s=time.strftime("%H:%M:%S", time.gmtime(wait))))
                raise _ApimError(status, message, retry_after=wait)

    def _subscription(self, request: web.Request) -> None:
        key = self.options.secret("apim_key")
        if key is not None and request.headers.get("Ocp-Apim-Subscription-Key") != key:
            self.counters["http_401"] += 1
            raise _ApimError(401, APIM_401_MESSAGE)

    def _service_checks(self, request: web.Request) -> None:
        opts = self.options
        version = request.query.get("api-version")
        if version != API_VERSION:
            raise bad_argument("InvalidApiVersion",
                               f"api-version must be {API_VERSION}, got {version!r}.")
        if opts.api_key is not None:
            auth = request.headers.get("Authorization", "")
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or key.strip() != opts.api_key.get_secret_value():
                self.counters["http_401"] += 1
                raise ApiError(401, "Unauthorized",
                               "Authorization header missing or invalid: send "
                               "'Authorization: Bearer <api key>'.")
        if opts.error_503_rate and self.rng.random() < opts.error_503_rate:
            self.counters["http_503"] += 1
            code = self.rng.choice(["TooManyConcurrentRequests", "RequestThrottled"])
            raise ApiError(503, "ServiceUnavailable", "Service is temporarily unavailable.",
                           [(code, "The service is busy; retry after a while.")],
                           headers={"Retry-After": str(opts.retry_after_s)})

    @web.middleware
    async def middleware(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.path.startswith("/_emulator/batch/"):
            return await self.batch.middleware(request, handler)
        if request.path.startswith("/_emulator/"):
            return await self._plain(request, handler)
        if self.batch.handles(request.path):
            return await self.batch.middleware(request, handler)
        opts = self.options
        if opts.slow_response_s[1] > 0:
            await asyncio.sleep(self._uniform(opts.slow_response_s))
        drop = bool(opts.drop_rate) and self.rng.random() < opts.drop_rate
        # Half the drops happen after the action took effect: its response is what gets lost.
        drop_after = drop and self.rng.random() < 0.5
        if drop and not drop_after:
            return self._drop(request)
        try:
            self._subscription(request)
            self._gateway()
            self._service_checks(request)
            response = await self._plain(request, handler)
        except _ApimError as exc:
            response = exc.response()
        except ApiError as exc:
            response = exc.response()
        if drop_after:
            return self._drop(request)
        return response

    async def _plain(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPNotFound:
            return ApiError(404, "NotFound", f"No such resource: {request.path}").response()
        except web.HTTPMethodNotAllowed:
            return ApiError(405, "MethodNotAllowed",
                            f"{request.method} is not allowed on {request.path}").response()

    def _drop(self, request: web.Request) -> web.StreamResponse:
        self.counters["dropped"] += 1
        if request.transport is not None:
            request.transport.abort()
        # The connection is gone; aiohttp notices and writes nothing.
        return web.Response(status=499)

    # -- BES operations ----------------------------------------------------------------------

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError):
            raise bad_argument("InvalidJson", "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise bad_argument("InvalidJson", "The request body must be a JSON object.")
        return body

    def _parse_inputs(self, body: Mapping[str, Any]) -> dict[str, blobs.BlobRef]:
        declared = self.options.inputs
        if "Input" in body and "Inputs" in body:
            raise bad_argument("DuplicateInputInBatchCall",
                               "Give either 'Input' or 'Inputs', not both.")
        if body.get("Input") is not None:
            raw_inputs: Any = {declared[0]: body["Input"]}
        else:
            raw_inputs = body.get("Inputs")
        if not isinstance(raw_inputs, dict) or not raw_inputs:
            raise bad_argument("MissingInputBlobInformation",
                               f"No input blob given; this service takes: {', '.join(declared)}.")
        unknown = [n for n in raw_inputs if n not in declared]
        if unknown:
            raise bad_argument("InvalidInputNames",
                               f"Unknown input name(s): {', '.join(unknown)}; this service "
                               f"takes: {', '.join(declared)}.")
        missing = [n for n in declared if n not in raw_inputs]
        if missing:
            raise bad_argument("MissingInputBlobInformation",
                               f"No blob given for input(s): {', '.join(missing)}.")
        refs: dict[str, blobs.BlobRef] = {}
        for name in declared:
            try:
                refs[name] = blobs.parse_reference(raw_inputs[name])
            except blobs.ReferenceError_ as exc:
                raise bad_argument("MissingInputBlobInformation", f"{name}: {exc}") from None
        return refs

    def _parse_outputs(self, body: Mapping[str, Any], job_id: str,
                       first_input: blobs.BlobRef) -> dict[str, blobs.BlobRef]:
        declared = self.options.outputs
        raw = body.get("Outputs") or {}
        if not isinstance(raw, dict):
            raise bad_argument("MissingOutputBlobInformation", "'Outputs' must be an object.")
        unknown = [n for n in raw if n not in declared]
        if unknown:
            raise bad_argument("InvalidOutputOverrideName",
                               f"Unknown output name(s): {', '.join(unknown)}; this service "
                               f"has: {', '.join(declared)}.")
        refs: dict[str, blobs.BlobRef] = {}
        for name in declared:
            if name not in raw:
                # Where the real service puts an output nobody placed: beside the input.
                refs[name] = first_input.sibling(f"{job_id}/{name}.csv")
                continue
            try:
                ref = blobs.parse_reference(raw[name])
            except blobs.ReferenceError_ as exc:
                raise bad_argument("MissingOutputBlobInformation", f"{name}: {exc}") from None
            if ref.extension not in naming.OUTPUT_EXTENSIONS:
                raise bad_argument("InvalidBlobExtension",
                                   f"{name}: output blob {ref.blob!r} must end in one of "
                                   f"{', '.join(naming.OUTPUT_EXTENSIONS)}.")
            refs[name] = ref
        return refs

    def _parse_parameters(self, body: Mapping[str, Any], service: str) -> dict[str, str]:
        raw = body.get("GlobalParameters") or {}
        if not isinstance(raw, dict):
            raise bad_argument("InvalidGlobalParameters", "'GlobalParameters' must be an object.")
        declared = self.declared_parameters(service)
        unknown = [n for n in raw if n not in declared]
        if unknown:
            raise bad_argument("InvalidGlobalParameterName",
                               f"Unknown global parameter(s): {', '.join(unknown)}; this "
                               f"service has: {', '.join(declared) or '(none)'}.")
        params = {str(k): "" if v is None else str(v) for k, v in raw.items()}
        problem = self.model_for(service).check_parameters(params)
        if problem:
            raise bad_argument("InvalidGlobalParameterValue", problem)
        return params

    async def submit(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        service = request.match_info["service"]
        job_id = uuid.uuid4().hex
        inputs = self._parse_inputs(body)
        outputs = self._parse_outputs(body, job_id, next(iter(inputs.values())))
        params = self._parse_parameters(body, service)
        submitted: dict[str, Any] = {
            k: v for k, v in body.items() if k not in {"Input", "Inputs", "Outputs"}
        }
        for key in ("Input", "Inputs", "Outputs"):
            if key in body:
                value = body[key]
                submitted[key] = (blobs.redact_reference(value) if key == "Input" else
                                  {n: blobs.redact_reference(r) for n, r in value.items()}
                                  if isinstance(value, dict) else value)
        self.jobs[job_id] = Job(
            id=job_id, workspace=request.match_info["workspace"], service=service,
            model=self.model_for(service).name, inputs=inputs, outputs=outputs,
            global_parameters=params, submitted=submitted,
        )
        self.counters["submits"] += 1
        return web.json_response(job_id)

    async def start(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        if job.status is not Status.NOT_STARTED:
            self.counters["start_conflicts"] += 1
            raise ApiError(400, "InvalidOperation", "The job cannot be started.",
                           [("CannotStartJob",
                             f"Job {job.id} is {job.status.value}; only a NotStarted job can "
                             "be started.")])
        self.counters["starts"] += 1
        if job.started:
            # Accepted again while queued: a client that starts blindly would run jobs twice.
            self.counters["double_starts"] += 1
            return web.Response(status=204)
        self._set(job, started=True)
        self.tasks[job.id] = asyncio.create_task(self._queue(job.id))
        return web.Response(status=204)

    def status_body(self, job: Job) -> dict[str, Any]:
        code: str | int = STATUS_INT[job.status] if self.options.int_status else job.status.value
        return {"StatusCode": code, "Results": job.results, "Details": job.details}

    async def status(self, request: web.Request) -> web.StreamResponse:
        self.counters["polls"] += 1
        return web.json_response(self.status_body(self._job(request)))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        job = self._job(request)
        self.counters["deletes"] += 1
        if job.status not in TERMINAL:
            self._set(job, status=Status.CANCELLED, details="Cancelled by a DELETE request.")
            task = self.tasks.pop(job.id, None)
            if task is not None:
                task.cancel()
        return web.Response(status=204)

    async def swagger(self, request: web.Request) -> web.StreamResponse:
        service = request.match_info["service"]
        ref = {"$ref": "#/definitions/BlobReference"}
        base = f"/workspaces/{request.match_info['workspace']}/services/{service}"
        doc = {
            "swagger": "2.0",
            "info": {"title": service, "version": API_VERSION,
                     "description": f"BES emulator, model {self.model_for(service).name}"},
            "basePath": base,
            "paths": {
                "/jobs": {"post": {"operationId": "submit"}},
                "/jobs/{jobId}/start": {"post": {"operationId": "start"}},
                "/jobs/{jobId}": {"get": {"operationId": "status"},
                                  "delete": {"operationId": "cancel"}},
                "/execute": {"post": {"operationId": "execute"}},
            },
            "definitions": {
                "BlobReference": {"type": "object", "properties": {
                    k: {"type": "string"} for k in
                    ("ConnectionString", "BaseLocation", "RelativeLocation", "SasBlobToken")}},
                "ExecutionInputs": {"type": "object",
                                    "properties": {n: ref for n in self.options.inputs}},
                "ExecutionOutputs": {"type": "object",
                                     "properties": {n: ref for n in self.options.outputs}},
                "GlobalParameters": {"type": "object", "properties": {
                    n: {"type": "string"} for n in self.declared_parameters(service)}},
            },
        }
        return web.json_response(doc)

    async def execute(self, request: web.Request) -> web.StreamResponse:
        self.counters["executes"] += 1
        body = await self._json_body(request)
        service = request.match_info["service"]
        raw_inputs = body.get("Inputs")
        declared = self.options.inputs
        if not isinstance(raw_inputs, dict) or not raw_inputs:
            raise bad_argument("MissingInputs", f"Give 'Inputs' with: {', '.join(declared)}.")
        unknown = [n for n in raw_inputs if n not in declared]
        if unknown:
            raise bad_argument("InvalidInputNames", f"Unknown input name(s): "
                               f"{', '.join(unknown)}; this service takes: {', '.join(declared)}.")
        name = declared[0]
        table = _rrs_table(raw_inputs.get(name), name)
        params = self._parse_parameters(body, service)
        try:
            out = self.model_for(service).score_table(table, params, input_name=name)
        except models.ModelError as exc:
            raise ApiError(400, "ModuleExecutionError", "Module execution encountered an error.",
                           [("ModuleError", str(exc))]) from None
        value = {"ColumnNames": out.columns, "ColumnTypes": out.types, "Values": out.values}
        return web.json_response({"Results": {o: {"type": "table", "value": value}
                                              for o in self.options.outputs}})

    # -- the job runner ----------------------------------------------------------------------

    async def _queue(self, job_id: str) -> None:
        delay = self._uniform(self.options.queue_delay_s)
        if delay:
            await asyncio.sleep(delay)
        self.tasks.pop(job_id, None)
        self.fifo.append(job_id)
        self._admit()

    def _admit(self) -> None:
        while self.fifo:
            limit = self.options.max_running
            if limit and len(self.running) >= limit:
                return
            job_id = self.fifo.popleft()
            job = self.jobs[job_id]
            if job.status is not Status.NOT_STARTED:
                continue  # cancelled while it waited
            self._set(job, status=Status.RUNNING)
            self.running.add(job_id)
            self.max_running_seen = max(self.max_running_seen, len(self.running))
            self.tasks[job_id] = asyncio.create_task(self._run(job_id))

    async def _run(self, job_id: str) -> None:
        try:
            changes = await self._outcome(self.jobs[job_id])
            if self.jobs[job_id].status is Status.RUNNING:
                self._set(self.jobs[job_id], **changes)
        finally:
            self.running.discard(job_id)
            self.tasks.pop(job_id, None)
            self._admit()

    async def _outcome(self, job: Job) -> dict[str, Any]:
        opts = self.options
        began = time.monotonic()
        run_time = self._uniform(opts.run_time_s)
        if opts.failure_rate and self.rng.random() < opts.failure_rate:
            self.counters["failures_injected"] += 1
            await asyncio.sleep(run_time)
            return {"status": Status.FAILED, "details": opts.failure_details}
        try:
            results = await self._score(job)
        except (models.ModelError, blobs.StorageError) as exc:
            outcome: dict[str, Any] = {"status": Status.FAILED, "details": str(exc)}
        except Exception as exc:  # a job must fail, never the server
            _log.exception("emulator_job_crashed", bes_job_id=job.id)
            outcome = {"status": Status.FAILED,
                       "details": logs.scrub(f"Internal error while scoring: "
                                             f"{type(exc).__name__}: {exc}")}
        else:
            outcome = {"status": Status.FINISHED, "results": results}
        remaining = run_time - (time.monotonic() - began)
        if remaining > 0:
            await asyncio.sleep(remaining)
        return outcome

    async def _score(self, job: Job) -> dict[str, Any]:
        model = models.REGISTRY[job.model]
        (first_name, first_ref), *others = job.inputs.items()
        for name, ref in others:
            # Only the first input feeds the model; the others must still exist.
            async for _ in self.storage.read(ref, name=name):
                break
        self.scored[job.id] += 1
        for out_name, out_ref in job.outputs.items():
            chunks = model.transform(
                self.storage.read(first_ref, name=first_name), job.global_parameters,
                input_name=first_name, in_ext=first_ref.extension, out_ext=out_ref.extension,
            )
            await self.storage.write(out_ref, chunks, name=out_name)
        lifetime = self.options.sas_lifetime_s
        results = {name: blobs.result_reference(ref, lifetime_s=lifetime)
                   for name, ref in job.outputs.items()}
        if self.options.results_base_url:  # a trust-boundary test: point somewhere else
            for ref_body in results.values():
                ref_body["BaseLocation"] = self.options.results_base_url.rstrip("/") + "/"
        return results

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        by_state = collections.Counter(job.status.value for job in self.jobs.values())
        return {
            **self.counters,
            "jobs": len(self.jobs),
            "jobs_by_state": {s.value: by_state.get(s.value, 0) for s in Status},
            "max_running_seen": self.max_running_seen,
            "running_now": len(self.running),
            "queued_now": len(self.fifo),
            "inputs_scored": sum(self.scored.values()),
            "max_scored_per_job": max(self.scored.values(), default=0),
            "batch": self.batch.stats(),
        }

    async def stats_handler(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats())

    async def job_handler(self, request: web.Request) -> web.StreamResponse:
        job = self.jobs.get(request.match_info["job_id"])
        if job is None:
            raise ApiError(404, "NotFound", "The job was not found.")
        return web.json_response({
            "id": job.id, "workspace": job.workspace, "service": job.service,
            "model": job.model, "status": job.status.value, "started": job.started,
            "details": job.details, "submitted": job.submitted,
            "global_parameters": dict(job.global_parameters),
            "inputs": {n: f"{r.container}/{r.blob}" for n, r in job.inputs.items()},
            "outputs": {n: f"{r.container}/{r.blob}" for n, r in job.outputs.items()},
            "scored": self.scored.get(job.id, 0),
        })

    async def config_handler(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        try:
            new = options_mod.updated(self.options, body)
        except options_mod.OptionError as exc:
            raise bad_argument("InvalidOption", str(exc)) from None
        problem = _unknown_model(new)
        if problem:
            raise bad_argument("InvalidOption", problem)
        self.options = new
        self._admit()  # a raised max_running frees waiting jobs now
        self.batch.admit()
        return web.json_response({"ok": True, "options": self.options.public()})

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.batch.close()
        await self.storage.close()


def _unknown_model(options: options_mod.EmulatorOptions) -> str | None:
    for model in [options.default_model, *options.services.values(),
                  *options.be_deployments.values()]:
        if model not in models.REGISTRY:
            return f"model {model!r} is unknown; models are: {', '.join(models.REGISTRY)}"
    return None


class _ApimError(Exception):
    """The gateway's own answers: a different body shape from the service's."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else {}
        return web.json_response({"statusCode": self.status, "message": self.message},
                                 status=self.status, headers=headers)


def _rrs_table(raw: object, name: str) -> models.Table:
    if not isinstance(raw, dict):
        raise bad_argument("MissingInputs", f"Input {name!r} is missing.")
    columns, values = raw.get("ColumnNames"), raw.get("Values")
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise bad_argument("InvalidColumnNames", f"{name}: 'ColumnNames' must be a list of "
                                                 "strings.")
    if not isinstance(values, list) or not all(isinstance(r, list) for r in values):
        raise bad_argument("InvalidValues", f"{name}: 'Values' must be a list of rows.")
    rows = [["" if v is None else str(v) for v in row] for row in values]
    return models.Table(columns=columns, types=["String"] * len(columns), values=rows)


EMULATOR_KEY = web.AppKey("emulator", Emulator)


def build_app(options: options_mod.EmulatorOptions) -> web.Application:
    """The emulator as an aiohttp application (`app[EMULATOR_KEY]` is its state)."""
    emulator = Emulator(options)
    app = web.Application(middlewares=[emulator.middleware], client_max_size=64 * 1024 * 1024)
    app[EMULATOR_KEY] = emulator
    svc = "/workspaces/{workspace}/services/{service}"
    app.router.add_post(f"{svc}/jobs", emulator.submit)
    app.router.add_post(f"{svc}/jobs/{{job_id}}/start", emulator.start)
    app.router.add_get(f"{svc}/jobs/{{job_id}}", emulator.status)
    app.router.add_delete(f"{svc}/jobs/{{job_id}}", emulator.cancel)
    app.router.add_get(f"{svc}/swagger.json", emulator.swagger)
    app.router.add_post(f"{svc}/execute", emulator.execute)
    app.router.add_get("/_emulator/stats", emulator.stats_handler)
    app.router.add_get("/_emulator/jobs/{job_id}", emulator.job_handler)
    app.router.add_post("/_emulator/config", emulator.config_handler)
    emulator.batch.add_routes(app.router)

    async def on_startup(_app: web.Application) -> None:
        await emulator.storage.open()

    async def on_cleanup(_app: web.Application) -> None:
        await emulator.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


@contextlib.asynccontextmanager
async def running(options: options_mod.EmulatorOptions) -> AsyncIterator[str]:
    """Serve the emulator in this event loop; yields its base URL, e.g. http://127.0.0.1:PORT."""
    runner = web.AppRunner(build_app(options), access_log=None, handle_signals=False,
                           shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host, options.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()
