"""HTTP client for one batch endpoint: invoke on the scoring host, everything else through ARM.

Tokens come from an azure-identity async credential (it caches and refreshes them), one scope
per plane: invoke needs `https://ml.azure.com/.default`, ARM `https://management.azure.com/.default`.
A token is only ever put in an Authorization header: never in a message, a log line or the
database. Failures become `errors` exceptions the worker's retry logic understands, as for BES:
429 → ThrottledError (and the subscription's read budget pauses), 408/5xx/connection trouble →
TransientError, anything else → PermanentError with the service's code and message.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.parse
import uuid
from typing import Any, Protocol

import aiohttp

from orchestrator import backoff, errors, metrics, redact
from orchestrator.backends.batch_endpoint import budget as budget_mod
from orchestrator.backends.batch_endpoint import protocol

INVOKE_SCOPE = "https://ml.azure.com/.default"
ARM_SCOPE = "https://management.azure.com/.default"
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Responses larger than this are refused (a job resource or a page is a few KB to a few MB).
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_ERROR_BODY_BYTES = 64 * 1024
#: Pages of `jobs?tag=` followed at most when looking a job up (each page is one ARM read).
MAX_PAGES = 200
REMAINING_READS_HEADER = "x-ms-ratelimit-remaining-subscription-reads"


class AccessTokenLike(Protocol):
    @property
    def token(self) -> str: ...


class AsyncCredential(Protocol):
    """What azure-identity's aio credentials provide (azure.core's AsyncTokenCredential)."""

    async def get_token(self, *scopes: str) -> AccessTokenLike: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Datastore:
    account_name: str
    container_name: str
    endpoint: str


class BatchEndpointClient:
    """invoke / job / find by tags / cancel / datastore for one configured endpoint."""

    def __init__(
        self,
        *,
        service: str,
        session: aiohttp.ClientSession,
        credential: AsyncCredential,
        scoring_uri: str,
        deployment: str | None,
        workspace_id: str,
        arm_url: str,
        api_version: str,
        budget: budget_mod.ReadBudget,
        request_timeout_s: float = 60.0,
        monotonic: Any = time.monotonic,
    ) -> None:
        self.service = service
        self.session = session
        self.credential = credential
        self.scoring_uri = scoring_uri
        self.deployment = deployment
        self.arm_url = arm_url.rstrip("/")
        self.workspace_url = self.arm_url + "/" + workspace_id.strip("/")
        self.api_version = api_version
        self.budget = budget
        self.request_timeout_s = request_timeout_s
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._monotonic = monotonic

    # ---- operations -----------------------------------------------------------------------

    async def invoke(self, body: dict[str, Any], *, request_id: str | None = None
                     ) -> protocol.JobResource:
        """`POST {scoring_uri}`: creates and starts a job. NOT idempotent: a TransientError here
        means the job may or may not exist; the caller looks it up by tags before invoking again.
        """
        headers = {"repeatability_request-id": request_id or str(uuid.uuid4())}
        if self.deployment:
            headers["azureml-model-deployment"] = self.deployment
        result = await self._request("POST", self.scoring_uri, "invoke", INVOKE_SCOPE,
                                     data=json.dumps(body).encode(), headers=headers)
        return self._job(result, "invoke")

    async def get_job(self, name: str) -> protocol.JobResource:
        """ARM `GET jobs/{name}`: one read of the subscription's budget."""
        result = await self._request("GET", self._job_url(name), "status", ARM_SCOPE, arm=True)
        return self._job(result, "status")

    async def find_job(self, job_id: str, attempt: str) -> protocol.JobResource | None:
        """The remote job invoked for our job's attempt, looked up by its tags (all pages of the
        jobs carrying the job's own tag key: its attempts, normally one page)."""
        url: str | None = f"{self.workspace_url}/jobs"
        params: dict[str, str] | None = {"api-version": self.api_version,
                                         "tag": protocol.lookup_tag(job_id)}
        for _ in range(MAX_PAGES):
            if url is None:
                return None
            body = await self._request("GET", url, "lookup", ARM_SCOPE, arm=True, params=params)
            try:
                found, nxt = protocol.parse_job_page(body)
            except ValueError as exc:
                raise errors.TransientError(f"ARM job list: {exc}", code="BadResponse") from None
            for job in found:
                if protocol.matches(job, job_id, attempt):
                    return job
            if nxt is not None and not protocol.same_origin(nxt, self.arm_url):
                raise errors.PermanentError(
                    "ARM job list: nextLink points at another host; not followed",
                    code="BadResponse")
            url, params = nxt, None  # nextLink carries its own query
        raise errors.PermanentError(f"ARM job list: more than {MAX_PAGES} pages",
                                    code="TooManyPages")

    async def cancel(self, name: str) -> None:
        """ARM `POST jobs/{name}/cancel`; a job ARM no longer knows (404) is already gone."""
        try:
            await self._request("POST", self._job_url(name) + "/cancel", "cancel", ARM_SCOPE,
                                arm=True, data=b"")
        except errors.PermanentError as exc:
            if exc.status != 404:
                raise

    async def datastore(self, name: str) -> Datastore:
        """ARM `GET datastores/{name}`: the account and container behind it (no secrets)."""
        url = f"{self.workspace_url}/datastores/{urllib.parse.quote(name, safe='')}"
        body = await self._request("GET", url, "datastore", ARM_SCOPE, arm=True)
        props = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(props, dict):
            raise errors.PermanentError(f"datastore {name!r}: no properties in ARM's answer",
                                        code="BadResponse")
        account, container = props.get("accountName"), props.get("containerName")
        if not isinstance(account, str) or not isinstance(container, str):
            raise errors.PermanentError(
                f"datastore {name!r} is not a Blob datastore (no account or container)",
                code="DatastoreNotBlob")
        return Datastore(account_name=account, container_name=container,
                         endpoint=str(props.get("endpoint") or "core.windows.net"))

    # ---- plumbing -------------------------------------------------------------------------

    def _job_url(self, name: str) -> str:
        quoted = urllib.parse.quote(protocol.check_job_name(name), safe="")
        return f"{self.workspace_url}/jobs/{quoted}"

    def _job(self, body: Any, op: str) -> protocol.JobResource:
        try:
            return protocol.parse_job(body)
        except ValueError as exc:
            raise errors.TransientError(f"batch endpoint {op}: {exc}", code="BadResponse"
                                        ) from None

    async def _token(self, scope: str) -> str:
        try:
            return (await self.credential.get_token(scope)).token
        except Exception as exc:  # azure-identity raises ClientAuthenticationError and others
            # Its messages name the credential chain, never a token.
            raise errors.TransientError(
                f"no token for {scope}: {type(exc).__name__}: {redact.redact(str(exc), [])}"[:600],
                code="NoToken",
            ) from None

    async def _request(
        self, method: str, url: str, op: str, scope: str, *, arm: bool = False,
        data: bytes | None = None, headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        token = await self._token(scope)
        all_headers = {"Authorization": f"Bearer {token}", "Accept": "application/json",
                       **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        if arm and params is None and "api-version=" not in url:
            params = {"api-version": self.api_version}
        started = self._monotonic()
        status: int | None = None
        try:
            async with self.session.request(
                method, url, params=params, data=data, headers=all_headers,
                timeout=self._timeout, allow_redirects=False,
            ) as resp:
                status = resp.status
                if arm:
                    self.budget.on_remaining(_int(resp.headers.get(REMAINING_READS_HEADER)))
                if 200 <= resp.status < 300:
                    body = await resp.content.read(MAX_BODY_BYTES + 1)
                    return self._decode(op, resp.status, body)
                text = (await resp.content.read(MAX_ERROR_BODY_BYTES)).decode("utf-8", "replace")
                raise self._error(op, resp.status, resp.headers.get("Retry-After"), text, arm)
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise errors.TransientError(
                f"batch endpoint {op}: no response within {self.request_timeout_s:g} s",
                code="Timeout") from exc
        except aiohttp.InvalidURL as exc:
            raise errors.PermanentError(f"batch endpoint {op}: invalid URL: {exc}",
                                        code="InvalidURL") from None
        except aiohttp.ClientError as exc:
            raise errors.TransientError(
                f"batch endpoint {op}: connection error: {type(exc).__name__}",
                code="ConnectionError") from exc
        finally:
            metrics.backend_calls.labels(self.service, op, metrics.status_class(status)).inc()
            metrics.backend_call_seconds.labels(self.service, op).observe(
                self._monotonic() - started)

    def _decode(self, op: str, status: int, body: bytes) -> Any:
        if len(body) > MAX_BODY_BYTES:
            raise errors.PermanentError(f"batch endpoint {op}: response too large",
                                        code="BadResponse", status=status)
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise errors.TransientError(
                f"batch endpoint {op}: HTTP {status} response is not JSON", code="BadResponse",
                status=status) from None

    def _error(self, op: str, status: int, retry_after: str | None, text: str, arm: bool
               ) -> errors.OrchestratorError:
        code, message = protocol.parse_error(status, text)
        retry_after_s = backoff.parse_retry_after(retry_after)
        summary = f"HTTP {status} {code}: {message}"
        if status == 429 or (status == 403 and retry_after_s is not None):
            metrics.throttled.labels(self.service).inc()
            if arm:
                self.budget.on_throttled(self._monotonic(), retry_after_s)
            return errors.ThrottledError(f"batch endpoint {op} throttled: {summary}",
                                         retry_after_s=retry_after_s, code=code, status=status)
        if status in TRANSIENT_STATUSES:
            return errors.TransientError(f"batch endpoint {op}: {summary}",
                                         retry_after_s=retry_after_s, code=code, status=status)
        if status == 401 and "expired" in message.lower():
            # The library refreshes a token before it expires; a clock skew can still let one
            # through late. The next try gets a fresh token.
            return errors.TransientError(f"batch endpoint {op}: {summary}", code=code,
                                         status=status)
        hint = protocol.wrong_audience_hint(status, text)
        return errors.PermanentError(f"batch endpoint {op}: {summary}{hint}", code=code,
                                     status=status)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
