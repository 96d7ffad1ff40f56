"""Azure ML batch endpoints in the emulator: a managed-identity token endpoint, the scoring plane
and the ARM plane, served by the same aiohttp app as BES (docs/emulator.md lists the URLs).

- `GET /msi/token`: App Service's managed-identity endpoint (`IDENTITY_ENDPOINT` /
  `IDENTITY_HEADER`), so azure-identity's own ManagedIdentityCredential gets tokens here.
  Tokens are opaque random strings the emulator remembers with their audience and expiry;
  those for `https://storage.azure.com` are unsigned JWTs, which Azurite's `--oauth basic` takes.
- `POST /endpoints/{endpoint}/jobs`: the scoring URI. Needs an `https://ml.azure.com` token.
- `/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.MachineLearningServices/
  workspaces/{ws}/...`: batchEndpoints, jobs (get, list by tag with nextLink, cancel),
  datastores. Needs an `https://management.azure.com` token, `?api-version=`, and spends a
  token bucket per subscription (429 + Retry-After when empty), as ARM does.

Jobs really run: Preparing, Queued (FIFO for a running slot), Running (reads the input blob
through the emulator's own storage access, runs the deployment's model, writes the output where
OutputData says, refusing an existing blob), Finalizing, then Completed or Failed.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import datetime as dt
import enum
import json
import math
import random
import re
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from orchestrator import logs
from orchestrator.emulator import blobs, models
from orchestrator.emulator import options as options_mod

MSI_API_VERSION = "2019-08-01"
#: Tokens for this resource are JWT-shaped, so Azurite (`--oauth basic`) takes them.
STORAGE_AUDIENCE = "https://storage.azure.com"
#: A tenant-shaped issuer: Azurite checks the `iss` prefix, not the tenant.
_ISSUER = "https://sts.windows.net/00000000-0000-0000-0000-0000000e0e0e/"
ML_AUDIENCES = ("https://ml.azure.com",)
ARM_AUDIENCES = ("https://management.azure.com", "https://management.core.windows.net")
PROVIDER = "Microsoft.MachineLearningServices"
WORKSPACE = "/subscriptions/{sub}/resourceGroups/{rg}/providers/" + PROVIDER + "/workspaces/{ws}"
#: The workspace named in invoke answers when the emulator serves any workspace path.
DEFAULT_WORKSPACE_ID = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/"
                        f"emulator/providers/{PROVIDER}/workspaces/emulator")
LOCATION = "emulator"
DEPLOYMENT_HEADER = "azureml-model-deployment"
JOB_TAG = "bes-orchestrator.job"
ATTEMPT_TAG = "bes-orchestrator.attempt"
NO_DEPLOYMENT_MESSAGE = (
    "No valid deployments to route to. Please check that the endpoint has at least one "
    "deployment with positive weight values or use a deployment specific header to route."
)
DENIED_BY_POLICY = "Token denied by policy."
_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}(-preview)?$")
_DATASTORE_URI = re.compile(
    r"^azureml://(?:subscriptions/[^/]+/resource[gG]roups/[^/]+/workspaces/[^/]+/)?"
    r"datastores/(?P<ds>[^/]+)/paths/(?P<path>.+)$")
_LOGGING_LEVELS = ("Debug", "Info", "Warning")
_TOKEN_CACHE_MAX = 10_000
#: request key: the rate-limit headers every ARM answer carries.
_ARM_HEADERS = web.RequestKey("arm_headers", dict[str, str])

_log = logs.get("emulator")


class JobStatus(enum.StrEnum):
    NOT_STARTED = "NotStarted"
    PREPARING = "Preparing"
    QUEUED = "Queued"
    RUNNING = "Running"
    NOT_RESPONDING = "NotResponding"
    FINALIZING = "Finalizing"
    CANCEL_REQUESTED = "CancelRequested"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELED = "Canceled"


FINAL: frozenset[JobStatus] = frozenset({JobStatus.COMPLETED, JobStatus.FAILED,
                                         JobStatus.CANCELED})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Token:
    audience: str
    expires_at: float  #: epoch seconds


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchJob:
    name: str
    seq: int  #: creation order: the list cursor
    workspace_id: str
    endpoint: str
    deployment: str
    model: str
    input_name: str
    input_path: str  #: blob path in the datastore's container
    output_name: str
    output_path: str
    tags: Mapping[str, str]
    overrides: Mapping[str, Any]
    created_at: float
    status: JobStatus = JobStatus.PREPARING
    #: Why it failed: kept for /_emulator/batch/jobs only (the job resource has no failure
    #: text, as in the real service).
    reason: str | None = None
    history: tuple[str, ...] = ()


class BatchError(Exception):
    """An ARM-style error answer: {"error": {"code", "message", "details", "additionalInfo"}}."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": {
            "code": self.code, "message": self.message, "target": None, "details": [],
            "additionalInfo": []}}
        return web.json_response(body, status=self.status, headers=self.headers)


class _MsiError(Exception):
    """App Service's token endpoint answers errors in its own shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Bucket:
    """ARM's token bucket: `capacity` requests, refilled continuously."""

    def __init__(self) -> None:
        self.tokens: float | None = None  # full on first use
        self.last = 0.0

    def take(self, limit: options_mod.TokenBucket, now: float) -> tuple[bool, int, int]:
        """(allowed, remaining, retry_after_s)."""
        if self.tokens is None:
            self.tokens = float(limit.capacity)
        else:
            self.tokens = min(float(limit.capacity),
                              self.tokens + (now - self.last) * limit.refill_per_s)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True, int(self.tokens), 0
        return False, 0, max(1, math.ceil((1.0 - self.tokens) / limit.refill_per_s))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _storage_jwt(resource: str, now: int, expires_at: int) -> str:
    """An unsigned JWT (`alg: none`) for the storage audience: Azurite's basic OAuth reads its
    `aud`, `iss`, `nbf`/`iat`/`exp` and does not check a signature. A random `jti` keeps each
    token unique, and nothing in it is a secret of the emulator."""
    header = {"typ": "JWT", "alg": "none"}
    claims = {"aud": resource.rstrip("/"), "iss": _ISSUER, "iat": now, "nbf": now - 60,
              "exp": expires_at, "oid": "00000000-0000-0000-0000-0000000e0e0e",
              "jti": secrets.token_urlsafe(16)}
    parts = (json.dumps(p, separators=(",", ":")).encode() for p in (header, claims))
    return ".".join(_b64url(p) for p in parts) + "."


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pick(obj: Mapping[str, Any], key: str) -> Any:
    """`InputData` or `inputData`: the documentation's PascalCase or the SDK's camelCase."""
    if key in obj:
        return obj[key]
    return obj.get(key[0].lower() + key[1:])


def _duration(prop: str, value: Any, out: dict[str, Any], failures: list[dict[str, Any]]
              ) -> None:
    """An ISO 8601 duration such as PT30S."""
    if value is None:
        return
    if (isinstance(value, str) and value not in ("P", "PT")
            and re.fullmatch(r"P(T(\d+H)?(\d+M)?(\d+(\.\d+)?S)?)?", value)):
        out[prop] = value
    else:
        failures.append(_failure(prop, f"'{prop}' must be an ISO 8601 duration such as PT30S.",
                                 value))


def _whole(prop: str, value: Any, low: int, out: dict[str, Any],
           failures: list[dict[str, Any]]) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        failures.append(_failure(prop, f"'{prop}' must be a whole number >= {low}.", value,
                                 "GreaterThanOrEqualValidator"))
    else:
        out[prop] = value


def _failure(prop: str, message: str, attempted: Any, code: str = "PredicateValidator"
             ) -> dict[str, Any]:
    return {"PropertyName": prop, "ErrorMessage": message, "AttemptedValue": attempted,
            "ErrorCode": code}


STATS_COUNTERS = (
    "tokens_issued", "msi_errors", "invokes", "invoke_rejected", "invoke_denied",
    "duplicate_invokes",
    "http_401", "http_503", "dropped", "arm_reads", "arm_writes", "arm_throttled",
    "list_pages", "cancels", "failures_injected", "not_responding_detours",
)


class BatchEndpoints:
    """State and handlers of the batch-endpoint planes inside one emulator app."""

    def __init__(self, options: Callable[[], options_mod.EmulatorOptions],
                 storage: blobs.Storage, rng: random.Random) -> None:
        self._options = options
        self.storage = storage
        self.rng = rng
        self.tokens: dict[str, Token] = {}
        self.tokens_by_audience: collections.Counter[str] = collections.Counter()
        self.jobs: dict[str, BatchJob] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.running: set[str] = set()
        self.waiting: collections.deque[tuple[str, asyncio.Future[None]]] = collections.deque()
        self.max_running_seen = 0
        self.counters: collections.Counter[str] = collections.Counter(
            {k: 0 for k in STATS_COUNTERS})
        #: (job tag, attempt tag) -> invokes carrying them.
        self.submissions: collections.Counter[tuple[str, str]] = collections.Counter()
        self.reads_by_second: collections.Counter[int] = collections.Counter()
        self.read_buckets: dict[str, Bucket] = collections.defaultdict(Bucket)
        self.write_buckets: dict[str, Bucket] = collections.defaultdict(Bucket)
        self._seq = 0
        #: Containers this emulator made sure exist (a workspace's datastore container does).
        self._containers_ready: set[str] = set()

    @property
    def options(self) -> options_mod.EmulatorOptions:
        return self._options()

    def _uniform(self, bounds: tuple[float, float]) -> float:
        lo, hi = bounds
        return lo if hi <= lo else self.rng.uniform(lo, hi)

    def _set(self, name: str, **changes: Any) -> BatchJob:
        job = self.jobs[name]
        if "status" in changes and changes["status"] is not job.status:
            changes["history"] = (*job.history, str(changes["status"]))
        job = dataclasses.replace(job, **changes)
        self.jobs[name] = job
        return job

    # -- routing and faults ------------------------------------------------------------------

    @staticmethod
    def handles(path: str) -> bool:
        return path.startswith(("/msi/", "/endpoints/", "/subscriptions/"))

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/msi/token", self.msi_token)
        router.add_post("/endpoints/{endpoint}/jobs", self.invoke)
        router.add_get(WORKSPACE + "/batchEndpoints/{endpoint}", self.get_endpoint)
        router.add_get(WORKSPACE + "/jobs", self.list_jobs)
        router.add_get(WORKSPACE + "/jobs/{name}", self.get_job)
        router.add_post(WORKSPACE + "/jobs/{name}/cancel", self.cancel_job)
        router.add_get(WORKSPACE + "/datastores/{name}", self.get_datastore)
        router.add_get("/subscriptions/{sub}/providers/" + PROVIDER
                       + "/locations/{loc}/mfeOperationResults/{op}", self.operation_result)
        router.add_get("/_emulator/batch/jobs/{name}", self.introspect_job)

    async def middleware(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.path.startswith("/msi/"):
            return await self._answer(request, handler)
        opts = self.options
        if opts.slow_response_s[1] > 0:
            await asyncio.sleep(self._uniform(opts.slow_response_s))
        drop = bool(opts.drop_rate) and self.rng.random() < opts.drop_rate
        # Half the drops happen after the call took effect (an invoke whose answer is lost).
        drop_after = drop and self.rng.random() < 0.5
        if drop and not drop_after:
            return self._drop(request)
        response = await self._answer(request, handler)
        if drop_after:
            return self._drop(request)
        return response

    async def _answer(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except BatchError as exc:
            # An ARM error after the throttle check still says what is left of the budget.
            exc.headers = {**request.get(_ARM_HEADERS, {}), **exc.headers}
            return exc.response()
        except _MsiError as exc:
            self.counters["msi_errors"] += 1
            return web.json_response({"statusCode": exc.status, "message": exc.message},
                                     status=exc.status)
        except web.HTTPNotFound:
            return BatchError(404, "NotFound", f"No such resource: {request.path}").response()
        except web.HTTPMethodNotAllowed:
            return BatchError(405, "MethodNotAllowed",
                              f"{request.method} is not allowed on {request.path}").response()

    def _drop(self, request: web.Request) -> web.StreamResponse:
        self.counters["dropped"] += 1
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=499)

    def _maybe_503(self) -> None:
        opts = self.options
        if opts.error_503_rate and self.rng.random() < opts.error_503_rate:
            self.counters["http_503"] += 1
            raise BatchError(503, "ServiceUnavailable",
                             "The service is temporarily unavailable; retry after a while.",
                             {"Retry-After": str(opts.retry_after_s)})

    # -- tokens --------------------------------------------------------------------------------

    async def msi_token(self, request: web.Request) -> web.StreamResponse:
        opts = self.options
        secret = request.headers.get("X-IDENTITY-HEADER")
        if not secret:
            raise _MsiError(400, "The request is missing the X-IDENTITY-HEADER header.")
        expected = opts.secret("identity_header")
        if expected is not None and not secrets.compare_digest(secret, expected):
            raise _MsiError(401, "The X-IDENTITY-HEADER value is not valid.")
        if request.query.get("api-version") != MSI_API_VERSION:
            raise _MsiError(400, f"api-version must be {MSI_API_VERSION}, got "
                                 f"{request.query.get('api-version')!r}.")
        resource = request.query.get("resource", "").strip()
        if not resource:
            raise _MsiError(400, "The 'resource' query parameter is required.")
        now = time.time()
        if len(self.tokens) >= _TOKEN_CACHE_MAX:
            self.tokens = {k: t for k, t in self.tokens.items() if t.expires_at > now}
        expires_at = int(now + opts.token_lifetime_s)
        value = (_storage_jwt(resource, int(now), expires_at)
                 if resource.rstrip("/") == STORAGE_AUDIENCE else secrets.token_urlsafe(48))
        self.tokens[value] = Token(audience=resource, expires_at=expires_at)
        self.counters["tokens_issued"] += 1
        self.tokens_by_audience[resource] += 1
        return web.json_response({
            "access_token": value, "expires_on": str(expires_at), "resource": resource,
            "token_type": "Bearer", "client_id": "00000000-0000-0000-0000-0000000e0e0e",
        })

    def _authorize(self, request: web.Request, audiences: tuple[str, ...]) -> None:
        def deny(code: str, message: str, description: str) -> BatchError:
            self.counters["http_401"] += 1
            return BatchError(401, code, message, {
                "WWW-Authenticate": f'Bearer error="invalid_token", '
                                    f'error_description="{description}"'})

        auth = request.headers.get("Authorization")
        if not auth:
            raise deny("AuthenticationFailed",
                       "Authentication failed. The 'Authorization' header is missing.",
                       "The authentication header is missing")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise deny("AuthenticationFailed", "Authentication failed. The 'Authorization' "
                       "header is provided in an invalid format.", "Invalid authorization")
        token = self.tokens.get(value.strip())
        if token is None:
            raise deny("InvalidAuthenticationToken", "The access token is invalid.",
                       "The access token is invalid")
        if token.audience.rstrip("/") not in audiences:
            allowed = ",".join(f"'{a}'" for a in audiences)
            raise deny("InvalidAuthenticationTokenAudience",
                       f"The access token has been obtained for wrong audience or resource "
                       f"'{token.audience}'. It should exactly match with one of the allowed "
                       f"audiences {allowed}.",
                       "The access token is from the wrong audience or resource.")
        now = time.time()
        if token.expires_at <= now:
            raise deny("ExpiredAuthenticationToken",
                       f"The access token expiry UTC time '{_iso(token.expires_at)}' is earlier "
                       f"than current UTC time '{_iso(now)}'.", "The access token expired")

    # -- ARM plumbing ----------------------------------------------------------------------------

    def _arm(self, request: web.Request, *, write: bool = False) -> dict[str, str]:
        """Auth, api-version, workspace and throttle checks; the rate-limit headers to send."""
        self._authorize(request, ARM_AUDIENCES)
        version = request.query.get("api-version")
        if not version:
            raise BatchError(400, "MissingApiVersionParameter",
                             "The api-version query parameter (?api-version=) is required for "
                             "all requests.")
        if not _API_VERSION.match(version):
            raise BatchError(400, "InvalidApiVersionParameter",
                             f"The api-version '{version}' is invalid. The supported versions "
                             "are of the form 'yyyy-mm-dd' or 'yyyy-mm-dd-preview'.")
        sub = request.match_info.get("sub", "")
        limit = self.options.arm_writes if write else self.options.arm_reads
        header = ("x-ms-ratelimit-remaining-subscription-writes" if write else
                  "x-ms-ratelimit-remaining-subscription-reads")
        headers = {"x-ms-request-id": str(uuid.uuid4())}
        if limit is not None:
            buckets = self.write_buckets if write else self.read_buckets
            allowed, remaining, retry_after = buckets[sub.lower()].take(limit, time.monotonic())
            headers[header] = str(remaining)
            if not allowed:
                self.counters["arm_throttled"] += 1
                raise BatchError(
                    429, "TooManyRequests",
                    f"The request is being throttled as the limit has been reached for "
                    f"operation type - {'Write' if write else 'Read'}. Please retry after "
                    f"{retry_after} seconds.", {**headers, "Retry-After": str(retry_after)})
        else:
            headers[header] = "11999"
        request[_ARM_HEADERS] = headers
        self.counters["arm_writes" if write else "arm_reads"] += 1
        if not write:
            self.reads_by_second[int(time.time())] += 1
            if len(self.reads_by_second) > 120:
                for second in sorted(self.reads_by_second)[:-60]:
                    del self.reads_by_second[second]
        self._check_workspace(request)
        self._maybe_503()
        return headers

    def _workspace_path(self, request: web.Request) -> str:
        m = request.match_info
        return WORKSPACE.format(sub=m["sub"], rg=m["rg"], ws=m["ws"])

    def _check_workspace(self, request: web.Request) -> None:
        wanted = self.options.be_workspace_id
        m = request.match_info
        if (wanted and "ws" in m
                and self._workspace_path(request).lower() != wanted.rstrip("/").lower()):
            raise BatchError(404, "ResourceNotFound",
                             f"The Resource '{PROVIDER}/workspaces/{m['ws']}' under resource "
                             f"group '{m['rg']}' was not found.")

    def _job_in(self, request: web.Request) -> BatchJob:
        name = request.match_info["name"]
        job = self.jobs.get(name)
        if job is None:
            raise BatchError(404, "UserError", f"Job {name} was not found in this workspace.")
        return job

    # -- the scoring plane -------------------------------------------------------------------

    def _deployment(self, request: web.Request) -> str:
        opts = self.options
        wanted = request.headers.get(DEPLOYMENT_HEADER, "").strip()
        if wanted:
            if wanted not in opts.be_deployments:
                raise BatchError(400, "BadRequest",
                                 f"{NO_DEPLOYMENT_MESSAGE} Deployment '{wanted}' does not "
                                 f"exist; the endpoint has: {', '.join(opts.be_deployments)}.")
            return wanted
        if opts.be_default_deployment is None:
            raise BatchError(400, "BadRequest", NO_DEPLOYMENT_MESSAGE)
        return opts.be_default_deployment

    def _path_on_datastore(self, prop: str, uri: Any, failures: list[dict[str, Any]]
                           ) -> str | None:
        if not isinstance(uri, str) or not uri.strip():
            failures.append(_failure(prop, f"'{prop}' must not be empty.", uri,
                                     "NotEmptyValidator"))
            return None
        m = _DATASTORE_URI.match(uri.strip())
        if m is None:
            failures.append(_failure(
                prop, "The emulator takes datastore URIs only: "
                      "azureml://datastores/<datastore>/paths/<path>.", uri))
            return None
        if m["ds"] != self.options.be_datastore:
            failures.append(_failure(
                prop, f"Datastore '{m['ds']}' was not found in the workspace; it has: "
                      f"{self.options.be_datastore}.", uri))
            return None
        return m["path"].strip("/")

    def _parse_one(self, props: Mapping[str, Any], key: str, type_key: str,
                   allowed: tuple[str, ...], failures: list[dict[str, Any]]
                   ) -> tuple[str, str] | None:
        data = _pick(props, key)
        if not isinstance(data, Mapping) or not data:
            failures.append(_failure(key, f"'{key}' must not be empty.", data,
                                     "NotEmptyValidator"))
            return None
        if len(data) != 1:
            failures.append(_failure(key, f"A model deployment takes exactly one entry in "
                                          f"'{key}'; got {len(data)}.", list(data)))
            return None
        (name, entry), = data.items()
        prop = f"{key}.{name}"
        if not isinstance(entry, Mapping):
            failures.append(_failure(prop, f"'{prop}' must be an object.", entry))
            return None
        kind = _pick(entry, type_key)
        if kind not in allowed:
            failures.append(_failure(
                f"{prop}.{type_key}", f"'{type_key}' must be {' or '.join(allowed)} for a "
                                      f"model deployment (the emulator reads single files).",
                kind))
            return None
        path = self._path_on_datastore(f"{prop}.Uri", _pick(entry, "Uri"), failures)
        if path is None:
            return None
        if not path or path.endswith("/"):
            failures.append(_failure(f"{prop}.Uri", "The Uri must name a file.", entry))
            return None
        return str(name), path

    @staticmethod
    def _overrides(props: Mapping[str, Any], failures: list[dict[str, Any]]) -> dict[str, Any]:
        """The optional per-job settings, checked as the service checks them."""
        out: dict[str, Any] = {}
        for key, low in (("miniBatchSize", 1), ("errorThreshold", -1),
                         ("maxConcurrencyPerInstance", 1)):
            _whole(key, _pick(props, key[0].upper() + key[1:]), low, out, failures)
        for key, inner, low in (("retrySettings", "MaxRetries", 0),
                                ("compute", "InstanceCount", 1)):
            section = _pick(props, key[0].upper() + key[1:])
            if section is None:
                continue
            if not isinstance(section, Mapping):
                failures.append(_failure(key, f"'{key}' must be an object.", section))
                continue
            _whole(f"{key}.{inner[0].lower()}{inner[1:]}", _pick(section, inner), low, out,
                   failures)
            if key == "retrySettings":
                _duration("retrySettings.timeout", _pick(section, "Timeout"), out, failures)
        level = _pick(props, "LoggingLevel")
        if level is not None and level not in _LOGGING_LEVELS:
            failures.append(_failure("loggingLevel", "'loggingLevel' must be one of "
                                     + ", ".join(_LOGGING_LEVELS) + ".", level, "EnumValidator"))
        elif level is not None:
            out["loggingLevel"] = level
        file_name = _pick(props, "OutputFileName")
        if file_name is not None and (not isinstance(file_name, str) or not file_name.strip()):
            failures.append(_failure("outputFileName", "'outputFileName' must be a file name.",
                                     file_name))
        elif file_name is not None:
            out["outputFileName"] = file_name
        return out

    async def invoke(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request, ML_AUDIENCES)
        self._maybe_503()
        opts = self.options
        if opts.invoke_denied_rate and self.rng.random() < opts.invoke_denied_rate:
            # A policy in front of the endpoint: not the ARM envelope, not even JSON.
            self.counters["invoke_denied"] += 1
            return web.Response(status=403, text=DENIED_BY_POLICY)
        deployment = self._deployment(request)
        try:
            body = json.loads(await request.read() or b"null")
        except (ValueError, UnicodeDecodeError):
            body = None
        failures: list[dict[str, Any]] = []
        props = _pick(body, "Properties") if isinstance(body, Mapping) else None
        if not isinstance(props, Mapping):
            failures.append(_failure("properties", "'properties' must not be empty.", None,
                                     "NotEmptyValidator"))
            props = {}
        name = f"batchjob-{uuid.uuid4()}"
        inp = self._parse_one(props, "InputData", "JobInputType", ("UriFile",), failures)
        out: tuple[str, str] | None
        if _pick(props, "OutputData") is None:
            # Left out, the service writes the default place on the workspace's datastore.
            out = ("score", f"azureml/{name}/score/predictions.csv")
        else:
            out = self._parse_one(props, "OutputData", "JobOutputType", ("UriFile",), failures)
        raw_tags = _pick(props, "Tags") or {}
        if not isinstance(raw_tags, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in raw_tags.items()):
            failures.append(_failure("tags", "'tags' must map strings to strings.", raw_tags))
            raw_tags = {}
        overrides = self._overrides(props, failures)
        if failures or inp is None or out is None:
            self.counters["invoke_rejected"] += 1
            raise BatchError(400, "UserError", json.dumps(failures))
        tags = dict(raw_tags)
        self.counters["invokes"] += 1
        if JOB_TAG in tags:
            key = (tags[JOB_TAG], tags.get(ATTEMPT_TAG, ""))
            if self.submissions[key]:
                self.counters["duplicate_invokes"] += 1
            self.submissions[key] += 1
        self._seq += 1
        self.jobs[name] = BatchJob(
            name=name, seq=self._seq,
            workspace_id=(opts.be_workspace_id or DEFAULT_WORKSPACE_ID).rstrip("/"),
            endpoint=request.match_info["endpoint"], deployment=deployment,
            model=opts.be_deployments[deployment], input_name=inp[0], input_path=inp[1],
            output_name=out[0], output_path=out[1], tags=tags, overrides=overrides,
            created_at=time.time(), history=(str(JobStatus.PREPARING),),
        )
        self.tasks[name] = asyncio.create_task(self._life(name))
        return web.json_response(self.resource(self.jobs[name]),
                                 status=201 if opts.invoke_201 else 200)

    # -- the ARM plane -------------------------------------------------------------------------

    def resource(self, job: BatchJob, workspace: str | None = None) -> dict[str, Any]:
        ws = workspace or job.workspace_id
        return {
            "id": f"{ws}/jobs/{job.name}",
            "name": job.name,
            "type": f"{PROVIDER}/workspaces/jobs",
            "properties": {
                "jobType": "Pipeline",
                "displayName": job.name,
                "experimentName": job.endpoint,
                "status": job.status.value,
                "tags": dict(job.tags),
                "properties": {"azureml.batchrun": "true",
                               "azureml.endpointname": job.endpoint,
                               "azureml.deploymentname": job.deployment},
                "interactionEndpoints": {"Studio": {
                    "endpoint": f"https://ml.azure.com/runs/{job.name}?wsid={ws}"}},
                "isArchived": False,
            },
            "systemData": {"createdAt": _iso(job.created_at), "createdByType": "Application"},
        }

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        headers = self._arm(request)
        job = self._job_in(request)
        return web.json_response(self.resource(job, self._workspace_path(request)),
                                 headers=headers)

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        headers = self._arm(request)
        self.counters["list_pages"] += 1
        tag = request.query.get("tag")
        if tag and "=" in tag:
            # Whether the service filters on values is not on record: refuse rather than
            # answer an empty list a client would take for "no such job".
            raise BatchError(400, "BadRequest", f"The emulator filters jobs by tag name only "
                                                f"(tag=<name>), got tag={tag!r}.")
        try:
            after = int(request.query.get("$skipToken", "0"))
        except ValueError:
            raise BatchError(400, "BadRequest", "$skipToken is not valid.") from None
        size = self.options.arm_page_size
        page: list[BatchJob] = []
        more = False
        # Creation order with the last seq as cursor: jobs created meanwhile never shift a page.
        for job in self.jobs.values():
            if job.seq <= after or (tag and tag not in job.tags):
                continue
            if len(page) == size:
                more = True
                break
            page.append(job)
        ws = self._workspace_path(request)
        body: dict[str, Any] = {"value": [self.resource(j, ws) for j in page]}
        if more:
            body["nextLink"] = str(request.url.update_query({"$skipToken": str(page[-1].seq)}))
        return web.json_response(body, headers=headers)

    async def cancel_job(self, request: web.Request) -> web.StreamResponse:
        headers = self._arm(request, write=True)
        job = self._job_in(request)
        self.counters["cancels"] += 1
        if job.status in FINAL:
            return web.Response(status=200, headers=headers)
        if job.status is not JobStatus.CANCEL_REQUESTED:
            self._set(job.name, status=JobStatus.CANCEL_REQUESTED)
            task = self.tasks.pop(job.name, None)
            if task is not None:
                task.cancel()
            self.tasks[job.name] = asyncio.create_task(self._finish_cancel(job.name))
        m = request.match_info
        location = (f"{request.scheme}://{request.host}/subscriptions/{m['sub']}/providers/"
                    f"{PROVIDER}/locations/{LOCATION}/mfeOperationResults/jc:{job.name}"
                    f"?api-version={request.query['api-version']}")
        retry = max(1, math.ceil(self.options.cancel_s[1]))
        return web.Response(status=202, headers={**headers, "Location": location,
                                                 "Retry-After": str(retry)})

    async def operation_result(self, request: web.Request) -> web.StreamResponse:
        headers = self._arm(request)
        op = request.match_info["op"]
        job = self.jobs.get(op.removeprefix("jc:"))
        if job is None:
            raise BatchError(404, "NotFound", f"Operation {op} was not found.")
        if job.status is JobStatus.CANCEL_REQUESTED:
            return web.Response(status=202, headers={**headers, "Location": str(request.url),
                                                     "Retry-After": "1"})
        return web.Response(status=200, headers=headers)

    async def get_endpoint(self, request: web.Request) -> web.StreamResponse:
        headers = self._arm(request)
        name = request.match_info["endpoint"]
        ws = self._workspace_path(request)
        opts = self.options
        return web.json_response({
            "id": f"{ws}/batchEndpoints/{name}", "name": name,
            "type": f"{PROVIDER}/workspaces/batchEndpoints", "location": LOCATION,
            "properties": {
                "authMode": "AADToken",
                "scoringUri": f"{request.scheme}://{request.host}/endpoints/{name}/jobs",
                "defaults": {"deploymentName": opts.be_default_deployment},
                "provisioningState": "Succeeded",
                "description": "Batch endpoint (emulator); deployments: "
                               + ", ".join(opts.be_deployments),
            },
        }, headers=headers)

    def _account_name(self) -> str:
        opts = self.options
        if opts.be_account_name:
            return opts.be_account_name
        conn = opts.secret("be_storage_connection_string")
        if conn:
            with contextlib.suppress(blobs.ReferenceError_):
                ref = blobs.from_connection_string(conn, opts.be_container, "x")
                if ref.account_name:
                    return ref.account_name
        return blobs.DEV_STORAGE_ACCOUNT

    async def get_datastore(self, request: web.Request) -> web.StreamResponse:
        headers = self._arm(request)
        name = request.match_info["name"]
        opts = self.options
        if name != opts.be_datastore:
            raise BatchError(404, "UserError", f"Datastore {name} was not found in this "
                                               "workspace.")
        ws = self._workspace_path(request)
        await self._ensure_container()
        return web.json_response({
            "id": f"{ws}/datastores/{name}", "name": name,
            "type": f"{PROVIDER}/workspaces/datastores",
            "properties": {
                "datastoreType": "AzureBlob", "accountName": self._account_name(),
                "containerName": opts.be_container, "endpoint": "core.windows.net",
                "protocol": "https", "credentials": {"credentialsType": "AccountKey"},
                "isDefault": name == options_mod.DEFAULT_DATASTORE,
                "serviceDataAccessAuthIdentity": "None", "tags": {},
            },
        }, headers=headers)

    async def _ensure_container(self) -> None:
        """A real workspace's datastore container exists before anyone resolves it: create the
        emulated one on first use (once; a failure is left to the job that reads or writes)."""
        opts = self.options
        conn = opts.secret("be_storage_connection_string")
        if not conn or opts.be_container in self._containers_ready:
            return
        with contextlib.suppress(blobs.ReferenceError_, blobs.StorageError):
            ref = blobs.from_connection_string(conn, opts.be_container, "x")
            await self.storage.ensure_container(ref)
            self._containers_ready.add(opts.be_container)

    # -- the job runner ------------------------------------------------------------------------

    async def _slot(self, name: str) -> None:
        limit = self.options.max_running
        if not self.waiting and (not limit or len(self.running) < limit):
            self._occupy(name)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((name, future))
        await future

    def _occupy(self, name: str) -> None:
        self.running.add(name)
        self.max_running_seen = max(self.max_running_seen, len(self.running))

    def admit(self) -> None:
        """Hand free running slots to waiting jobs, first come first served."""
        while self.waiting:
            limit = self.options.max_running
            if limit and len(self.running) >= limit:
                return
            name, future = self.waiting.popleft()
            if future.done():
                continue  # cancelled while it waited
            self._occupy(name)
            future.set_result(None)

    def _release(self, name: str) -> None:
        self.running.discard(name)
        self.admit()

    async def _life(self, name: str) -> None:
        opts = self.options
        delay = self._uniform(opts.prepare_s)
        if delay:
            await asyncio.sleep(delay)
        self._set(name, status=JobStatus.QUEUED)
        occupied = False
        try:
            await self._slot(name)
            occupied = True
            self._set(name, status=JobStatus.RUNNING)
            status, reason = await self._execute(self.jobs[name])
            self._set(name, status=JobStatus.FINALIZING)
            finalize = self._uniform(self.options.finalize_s)
            if finalize:
                await asyncio.sleep(finalize)
        finally:
            if occupied:
                self._release(name)
            else:
                self.running.discard(name)
        self._set(name, status=status, reason=reason)
        self.tasks.pop(name, None)

    async def _execute(self, job: BatchJob) -> tuple[JobStatus, str | None]:
        opts = self.options
        began = time.monotonic()
        run_time = self._uniform(opts.run_time_s)
        if opts.not_responding_rate and self.rng.random() < opts.not_responding_rate:
            # A node stops reporting for a while, then the job carries on.
            self.counters["not_responding_detours"] += 1
            self._set(job.name, status=JobStatus.NOT_RESPONDING)
            await asyncio.sleep(self._uniform(opts.not_responding_s))
            self._set(job.name, status=JobStatus.RUNNING)
        if opts.failure_rate and self.rng.random() < opts.failure_rate:
            self.counters["failures_injected"] += 1
            outcome: tuple[JobStatus, str | None] = (
                JobStatus.FAILED, "Simulated failure (emulator --failure-rate).")
        else:
            try:
                await self._score(job)
            except (models.ModelError, blobs.StorageError, blobs.ReferenceError_) as exc:
                outcome = (JobStatus.FAILED, str(exc))
            except Exception as exc:  # a job must fail, never the server
                _log.exception("emulator_batch_job_crashed", batch_job=job.name)
                outcome = (JobStatus.FAILED, logs.scrub(
                    f"Internal error while scoring: {type(exc).__name__}: {exc}"))
            else:
                outcome = (JobStatus.COMPLETED, None)
        remaining = run_time - (time.monotonic() - began)
        if remaining > 0:
            await asyncio.sleep(remaining)
        return outcome

    async def _score(self, job: BatchJob) -> None:
        opts = self.options
        conn = opts.secret("be_storage_connection_string")
        if not conn:
            raise blobs.StorageError("the emulator has no access to the datastore's storage "
                                     "(--be-storage-connection-string / "
                                     "BES_EMULATOR_BE_STORAGE)")
        in_ref = blobs.from_connection_string(conn, opts.be_container, job.input_path)
        out_ref = in_ref.sibling(job.output_path)
        model = models.REGISTRY[job.model]
        chunks = model.transform(self.storage.read(in_ref, name=job.input_name), {},
                                 input_name=job.input_name, in_ext=in_ref.extension,
                                 out_ext=out_ref.extension or ".csv")
        # Conditional (If-None-Match: *): an output file that exists fails the job, as in the
        # service, and is left as it was.
        await self.storage.write(out_ref, chunks, name=job.output_name, overwrite=False)

    async def _finish_cancel(self, name: str) -> None:
        delay = self._uniform(self.options.cancel_s)
        if delay:
            await asyncio.sleep(delay)
        self._set(name, status=JobStatus.CANCELED, reason="Canceled through ARM.")
        self.tasks.pop(name, None)

    # -- introspection -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        by_state = collections.Counter(job.status.value for job in self.jobs.values())
        now = int(time.time())
        last_10 = sum(self.reads_by_second.get(s, 0) for s in range(now - 10, now))
        return {
            **self.counters,
            "jobs": len(self.jobs),
            "jobs_by_state": {s.value: by_state.get(s.value, 0) for s in JobStatus},
            "running_now": len(self.running),
            "queued_now": sum(1 for _, f in self.waiting if not f.done()),
            "max_running_seen": self.max_running_seen,
            "submissions_invoked_twice": sum(1 for n in self.submissions.values() if n > 1),
            "arm_reads_per_s_last_10s": last_10 / 10,
            "arm_reads_peak_per_s": max(self.reads_by_second.values(), default=0),
            "tokens_by_audience": dict(self.tokens_by_audience),
        }

    async def introspect_job(self, request: web.Request) -> web.StreamResponse:
        job = self.jobs.get(request.match_info["name"])
        if job is None:
            raise BatchError(404, "NotFound", "The job was not found.")
        return web.json_response({
            "name": job.name, "endpoint": job.endpoint, "deployment": job.deployment,
            "model": job.model, "status": job.status.value, "history": list(job.history),
            "reason": job.reason, "tags": dict(job.tags), "overrides": dict(job.overrides),
            "input": {job.input_name: f"{self.options.be_container}/{job.input_path}"},
            "output": {job.output_name: f"{self.options.be_container}/{job.output_path}"},
        })

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
