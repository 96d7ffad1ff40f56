"""The batch-endpoint wire format: invoke bodies, job resources, ARM errors and paging. Pure.

Facts this module relies on (Microsoft's REST reference and the azure-ai-ml SDK):
- Invoke (`POST {scoring_uri}`) creates AND starts a job; it is not idempotent. The id to keep
  is the top-level `name` (`batchjob-…`); `properties.name` is only a display name.
- Keys are documented in PascalCase and sent in camelCase by the SDK; the service accepts both.
  We send PascalCase, as the REST reference writes them, and read both.
- Only `Completed`, `Failed` and `Canceled` are final. `NotResponding`, `Paused` and `Unknown`
  can change again, so they are polled like running states until the job's timeout.
- The job resource carries no failure text: a failed job is reported with its status and its
  page in the studio.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

#: Tags that name our submission on the remote job: an uncertain invoke is resolved by them.
TAG_JOB = "bes-orchestrator.job"
TAG_ATTEMPT = "bes-orchestrator.attempt"
#: ARM filters the job list by tag *key* only (`jobs?tag=<key>`). Asked for TAG_JOB, it answers
#: every job the daemon ever invoked in the workspace, page after page, finished ones included.
#: So each job also carries a tag whose key names it, and a lookup asks for that key: one page.
TAG_LOOKUP_PREFIX = "bes-orchestrator.job."
#: Server messages are cut to this length before they go into an error.
MAX_MESSAGE_CHARS = 800
_JOB_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")
_DATASTORE_URI = "azureml://datastores/{datastore}/paths/{path}"


class RemoteState(enum.StrEnum):
    """What a batch job's status means to the daemon."""

    #: Not running yet: provisioning compute, queued, preparing (minutes here are normal).
    QUEUED = "queued"
    #: Running, finalizing, or in a state that may still change (NotResponding, Paused, Unknown).
    RUNNING = "running"
    #: `Completed`: the output file is where we asked for it.
    FINISHED = "finished"
    #: `Failed`.
    FAILED = "failed"
    #: `Canceled` (by us, a person in the studio, or the service).
    CANCELLED = "cancelled"


_STATES: Mapping[str, RemoteState] = {
    "notstarted": RemoteState.QUEUED,
    "starting": RemoteState.QUEUED,
    "provisioning": RemoteState.QUEUED,
    "preparing": RemoteState.QUEUED,
    "queued": RemoteState.QUEUED,
    "scheduled": RemoteState.QUEUED,
    "running": RemoteState.RUNNING,
    "finalizing": RemoteState.RUNNING,
    "cancelrequested": RemoteState.RUNNING,
    "notresponding": RemoteState.RUNNING,
    "paused": RemoteState.RUNNING,
    "unknown": RemoteState.RUNNING,
    "completed": RemoteState.FINISHED,
    "failed": RemoteState.FAILED,
    "canceled": RemoteState.CANCELLED,
    "cancelled": RemoteState.CANCELLED,
}


def remote_state(status: str) -> RemoteState:
    """Any status word, known or new: an unknown word is treated as still running (not final)."""
    return _STATES.get(status.strip().lower(), RemoteState.RUNNING)


@dataclasses.dataclass(frozen=True, kw_only=True)
class JobResource:
    """The parts of a batch job resource the daemon uses."""

    name: str
    status: str
    tags: Mapping[str, str]
    studio_url: str

    @property
    def state(self) -> RemoteState:
        return remote_state(self.status)


def _get(body: Mapping[str, Any], *keys: str) -> Any:
    """A key in PascalCase or camelCase (the service answers either)."""
    for key in keys:
        for variant in (key, key[:1].lower() + key[1:], key[:1].upper() + key[1:]):
            if variant in body:
                return body[variant]
    return None


def check_job_name(name: str) -> str:
    """A job name goes into an ARM URL path: only a plain token is accepted."""
    if not _JOB_NAME.match(name) or name in {".", ".."}:
        raise ValueError(f"not a batch job name: {name[:80]!r}")
    return name


def parse_job(body: Any) -> JobResource:
    """A job resource from invoke or ARM `GET jobs/{name}` (raises ValueError if malformed)."""
    if not isinstance(body, Mapping):
        raise ValueError("the job resource is not a JSON object")
    name = body.get("name")
    if not isinstance(name, str):
        raise ValueError("the job resource has no name")
    props = _get(body, "Properties") or {}
    if not isinstance(props, Mapping):
        props = {}
    status = _get(props, "Status")
    tags = _get(props, "Tags") or body.get("tags") or {}
    endpoints = _get(props, "InteractionEndpoints") or {}
    studio = _get(endpoints, "Studio") if isinstance(endpoints, Mapping) else None
    studio_url = _get(studio, "Endpoint") if isinstance(studio, Mapping) else None
    return JobResource(
        name=check_job_name(name),
        status=str(status) if status is not None else "Unknown",
        tags={str(k): str(v) for k, v in tags.items()} if isinstance(tags, Mapping) else {},
        studio_url=str(studio_url) if studio_url else "",
    )


def datastore_uri(datastore: str, path: str) -> str:
    return _DATASTORE_URI.format(datastore=datastore, path=path.lstrip("/"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Overrides:
    """Per-job settings; None leaves the deployment's own value."""

    mini_batch_size: int | None = None
    instance_count: int | None = None
    error_threshold: int | None = None
    max_retries: int | None = None
    retry_timeout_s: int | None = None


def build_invoke_body(
    *,
    input_name: str,
    input_uri: str,
    output_name: str,
    output_uri: str,
    job_id: str,
    attempt: str,
    overrides: Overrides,
) -> dict[str, Any]:
    """The invoke request: one UriFile input, one UriFile output at a path of our own (the job
    fails if the output exists, so every submission gets a fresh one), and our tags."""
    props: dict[str, Any] = {
        "InputData": {input_name: {"JobInputType": "UriFile", "Uri": input_uri}},
        "OutputData": {output_name: {"JobOutputType": "UriFile", "Uri": output_uri}},
        "Tags": {TAG_JOB: job_id, TAG_ATTEMPT: attempt, lookup_tag(job_id): attempt},
    }
    if overrides.mini_batch_size is not None:
        props["MiniBatchSize"] = overrides.mini_batch_size
    if overrides.error_threshold is not None:
        props["ErrorThreshold"] = overrides.error_threshold
    if overrides.instance_count is not None:
        props["Compute"] = {"InstanceCount": overrides.instance_count}
    retry: dict[str, Any] = {}
    if overrides.max_retries is not None:
        retry["MaxRetries"] = overrides.max_retries
    if overrides.retry_timeout_s is not None:
        retry["Timeout"] = f"PT{overrides.retry_timeout_s}S"
    if retry:
        props["RetrySettings"] = retry
    return {"properties": props}


def lookup_tag(job_id: str) -> str:
    """The tag key only this job's remote jobs carry (its value is the attempt)."""
    return f"{TAG_LOOKUP_PREFIX}{job_id}"


def matches(job: JobResource, job_id: str, attempt: str) -> bool:
    """Is this remote job the one invoked for our job's `attempt`?"""
    return job.tags.get(TAG_JOB) == job_id and job.tags.get(TAG_ATTEMPT) == attempt


def parse_job_page(body: Any) -> tuple[list[JobResource], str | None]:
    """One page of ARM `GET jobs?tag=…`: the jobs that parse, and the next page's URL."""
    if not isinstance(body, Mapping):
        raise ValueError("the job list is not a JSON object")
    items = body.get("value") or []
    out: list[JobResource] = []
    for item in items if isinstance(items, list) else []:
        try:
            out.append(parse_job(item))
        except ValueError:
            continue  # a job of another kind or shape: not ours
    nxt = body.get("nextLink")
    return out, nxt if isinstance(nxt, str) and nxt else None


def same_origin(url: str, base: str) -> bool:
    """A `nextLink` or `Location` must stay on the ARM host we were configured with: a token
    is sent to it."""
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(base)
    return (a.scheme, a.netloc.lower()) == (b.scheme, b.netloc.lower())


def _clean(text: str) -> str:
    return " ".join(text.split())[:MAX_MESSAGE_CHARS]


def parse_error(status: int, text: str) -> tuple[str, str]:
    """(code, message) from an ARM or invoke error: the `{"error": {...}}` envelope, a
    validation list embedded in the message, or a non-JSON body kept as text."""
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping):
            code = str(err.get("code") or err.get("Code") or f"HTTP{status}")
            message = str(err.get("message") or err.get("Message") or "")
            return code, _clean(_validation_text(message) or message or f"HTTP {status}")
    return f"HTTP{status}", _clean(text) or f"HTTP {status}"


def _validation_text(message: str) -> str | None:
    """Invoke validation errors embed a JSON list of {PropertyName, ErrorMessage, …}: say each
    one plainly."""
    start = message.find("[")
    if start < 0:
        return None
    try:
        items = json.loads(message[start:message.rfind("]") + 1])
    except ValueError:
        return None
    parts = [
        f"{item.get('PropertyName', '?')}: {item.get('ErrorMessage', '?')}"
        for item in items if isinstance(item, Mapping)
    ]
    return (message[:start].strip() + " " + "; ".join(parts)).strip() if parts else None


def wrong_audience_hint(status: int, text: str) -> str:
    """401s are most often a token for the wrong audience: say so in the message."""
    if status != 401:
        return ""
    return (" (batch endpoints accept only Microsoft Entra tokens: invoke needs the audience "
            "https://ml.azure.com, ARM needs https://management.azure.com; check the identity "
            "and its role assignments)")
