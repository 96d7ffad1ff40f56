"""HTTP client for one Azure ML Studio (classic) web service, on the daemon's shared aiohttp
session: the BES job operations and the RRS `execute` call (same URL base, key and errors).

Every failure becomes an `errors` exception the retry logic understands: throttling
(`ThrottledError`, and the service's gate pauses), transient trouble (`TransientError`: 5xx,
timeouts, dropped connections) or a permanent refusal (`PermanentError` with the service's most
specific error code; also for a URL no retry can fix). Messages hold the status, code and the
service's message, scrubbed of secrets; request bodies (they carry the storage connection
string) are never echoed. Every call updates the backend metrics (calls by status class,
latency, throttling).
"""

from __future__ import annotations

import json
import time
import urllib.parse
from typing import Any

import aiohttp

from orchestrator import config, errors, metrics, redact
from orchestrator.backends.bes import protocol, throttle

API_VERSION = "2.0"
#: 2xx responses larger than this are refused (a status object is a few KB).
MAX_BODY_BYTES = 8 * 1024 * 1024
#: Error responses are read up to this many bytes only.
MAX_ERROR_BODY_BYTES = 64 * 1024
#: Error code of BES for `start` on a job that is not in NotStarted.
CANNOT_START_JOB = "CannotStartJob"


#: The query every call carries (read-only: aiohttp copies it into the URL).
_API = {"api-version": API_VERSION}


class StartConflict(errors.PermanentError):
    """`start` refused with CannotStartJob: the caller checks status (Running/Finished: started)."""


def web_service_url(base_url: str, workspace: str, service: str) -> str:
    """`{base}/workspaces/{ws}/services/{id}`: the web service's root (jobs, execute)."""
    return f"{base_url.rstrip('/')}/workspaces/{workspace}/services/{service}"


class BesClient:
    """submit / start / status / cancel / execute / describe against one web service.

    `service` is a BES or RRS service section: both reach the same web service with the same
    keys. Its root is `service_url` (default: from `base_url`, `workspace` and `service`);
    RRS may name its full `execute_url` instead."""

    def __init__(
        self,
        service: config.BesService | config.RrsService,
        session: aiohttp.ClientSession,
        *,
        gate: throttle.ServiceGate | None = None,
        service_url: str | None = None,
        execute_url: str | None = None,
    ) -> None:
        self.service = service
        self.session = session
        self.gate = gate
        if service_url is None:
            assert service.base_url and service.workspace and service.service
            service_url = web_service_url(service.base_url, service.workspace, service.service)
        self._service_url = service_url
        self._jobs_url = f"{service_url}/jobs"
        self._execute_url = execute_url or f"{service_url}/execute"
        self._timeout = aiohttp.ClientTimeout(total=service.request_timeout_s)
        api_key = service.api_key.get()
        self._secrets = [api_key]
        headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        if service.apim_key is not None:
            headers["Ocp-Apim-Subscription-Key"] = service.apim_key.get()
            self._secrets.append(service.apim_key.get())
        self._headers = headers
        self._json_headers = {**headers, "Content-Type": "application/json"}
        #: The metric children, looked up once per (operation, status class): `labels()` takes
        #: a lock and builds a key on every call (measured on the 333 polls/s bench).
        self._calls: dict[tuple[str, str], Any] = {}
        self._seconds: dict[str, Any] = {}

    # ---- operations -------------------------------------------------------------------------

    async def submit(self, body: dict[str, Any]) -> str:
        """`POST /jobs`: the new job's id. Not idempotent; the caller stores the id first."""
        data = json.dumps(body).encode()
        result = await self._request("POST", self._jobs_url, "submit", data=data)
        return protocol.parse_job_id(result)

    async def start(self, job_id: str) -> None:
        """`POST /jobs/{id}/start`. CannotStartJob raises StartConflict."""
        try:
            await self._request("POST", f"{self._job_url(job_id)}/start", "start", data=b"")
        except errors.PermanentError as exc:
            if exc.code == CANNOT_START_JOB:
                raise StartConflict(str(exc), code=exc.code, status=exc.status) from None
            raise

    async def status(self, job_id: str) -> protocol.StatusReport:
        """`GET /jobs/{id}`."""
        result = await self._request("GET", self._job_url(job_id), "status")
        return protocol.parse_status(result)

    async def cancel(self, job_id: str) -> None:
        """`DELETE /jobs/{id}`; a job the service no longer knows (404) is already gone."""
        try:
            await self._request("DELETE", self._job_url(job_id), "cancel")
        except errors.PermanentError as exc:
            if exc.status != 404:
                raise

    async def execute(self, body: dict[str, Any]) -> Any:
        """RRS `POST /execute?details=true`: the scored tables, synchronously."""
        return await self._request("POST", self._execute_url, "execute",
                                   data=json.dumps(body).encode(), params={"details": "true"})

    async def describe(self) -> dict[str, Any]:
        """`GET /swagger.json`: the service's input, output and global-parameter names."""
        result = await self._request("GET", f"{self._service_url}/swagger.json", "describe")
        if not isinstance(result, dict):
            raise errors.PermanentError("swagger.json is not an object", code="BadResponse")
        return result

    # ---- plumbing ---------------------------------------------------------------------------

    def _job_url(self, job_id: str) -> str:
        return f"{self._jobs_url}/{urllib.parse.quote(protocol.check_job_id(job_id), safe='')}"

    def _scrub(self, text: str) -> str:
        return redact.redact(text, self._secrets)

    async def _request(self, method: str, url: str, op: str, *, data: bytes | None = None,
                       params: dict[str, str] | None = None) -> Any:
        if self.gate is not None:
            await self.gate.wait()
        headers = self._headers if data is None else self._json_headers
        status: int | None = None
        began = time.monotonic()
        try:
            async with self.session.request(
                method, url, params={"api-version": API_VERSION, **params} if params else _API,
                data=data, headers=headers, timeout=self._timeout, allow_redirects=False,
            ) as resp:
                status = resp.status
                if 200 <= resp.status < 300:
                    body = await resp.content.read(MAX_BODY_BYTES + 1)
                    if self.gate is not None:
                        self.gate.on_success()
                    return self._decode(op, resp.status, body)
                text = (await resp.content.read(MAX_ERROR_BODY_BYTES)).decode("utf-8", "replace")
                raise self._error(op, resp.status, resp.headers.get("Retry-After"), text)
        except aiohttp.InvalidURL:
            # A URL without a host, or not a URL at all: no retry can fix it.
            raise errors.PermanentError(
                f"BES {op}: the service URL is not usable (check base_url)", code="BadUrl",
            ) from None
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise errors.TransientError(
                f"BES {op}: no response within {self.service.request_timeout_s:g} s",
                code="Timeout",
            ) from exc
        except aiohttp.ClientError as exc:
            # Connection refused/reset, dropped response, bad payload: worth another try.
            raise errors.TransientError(
                f"BES {op}: connection error: {type(exc).__name__}: {self._scrub(str(exc))}",
                code="ConnectionError",
            ) from exc
        finally:
            self._observe(op, status, time.monotonic() - began)

    def _observe(self, op: str, status: int | None, seconds: float) -> None:
        key = (op, metrics.status_class(status))
        calls = self._calls.get(key)
        if calls is None:
            calls = self._calls[key] = metrics.backend_calls.labels(self.service.name, *key)
        calls.inc()
        latency = self._seconds.get(op)
        if latency is None:
            latency = self._seconds[op] = metrics.backend_call_seconds.labels(
                self.service.name, op)
        latency.observe(seconds)

    def _decode(self, op: str, status: int, body: bytes) -> Any:
        if len(body) > MAX_BODY_BYTES:
            raise errors.PermanentError(f"BES {op}: response too large", code="BadResponse",
                                        status=status)
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError:
            # A 2xx that is not JSON is a gateway's page, not the service's answer.
            raise errors.TransientError(
                f"BES {op}: HTTP {status} response is not JSON", code="BadResponse",
                status=status,
            ) from None

    def _error(self, op: str, status: int, retry_after: str | None, text: str
               ) -> errors.OrchestratorError:
        code, message = protocol.parse_error(status, text)
        message = self._scrub(message)
        retry_after_s = protocol.parse_retry_after(retry_after)
        summary = f"HTTP {status} {code}: {message}"
        if status == 429 or (status == 403 and retry_after_s is not None):
            metrics.throttled.labels(self.service.name).inc()
            if self.gate is not None:
                self.gate.on_throttled(retry_after_s, self.gate.now())
            return errors.ThrottledError(
                f"BES {op} throttled: {summary}", retry_after_s=retry_after_s, code=code,
                status=status,
            )
        if protocol.is_transient(status):
            return errors.TransientError(
                f"BES {op}: {summary}", retry_after_s=retry_after_s, code=code, status=status
            )
        return errors.PermanentError(summary, code=code, status=status)
