"""The BES wire format (Azure ML Studio classic Batch Execution Service, api-version 2.0):
request bodies, status parsing, error bodies. Pure, no I/O.

Parsers are tolerant where real services differ (status as name or integer, `Results: null`,
missing `Details`, `details` nested or top-level, APIM's own error bodies) and strict where a
mistake would be dangerous (a job id that is not a plain token never reaches a URL path).
"""

from __future__ import annotations

import dataclasses
import enum
import http
import json
import re
from collections.abc import Mapping
from typing import Any

from orchestrator import backoff, errors
from orchestrator.storage import naming

#: Statuses retried with backoff; every other 4xx fails the job: 400 (bad request), 401/403
#: (key refused), 404 (no such job or service) and 409 (conflict) cannot change on a retry.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Server messages are cut to this length before they go into an error.
MAX_MESSAGE_CHARS = 500
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class BesStatus(enum.StrEnum):
    #: Queued: the service may keep a job here for a long time (FIFO).
    NOT_STARTED = "NotStarted"
    #: Executing.
    RUNNING = "Running"
    #: Ended with an error; `Details` says why.
    FAILED = "Failed"
    #: Deleted before it finished.
    CANCELLED = "Cancelled"
    #: Ended well; `Results` names every output blob.
    FINISHED = "Finished"


#: Statuses after which the job never changes again.
TERMINAL_STATUSES: frozenset[BesStatus] = frozenset(
    {BesStatus.FAILED, BesStatus.CANCELLED, BesStatus.FINISHED}
)
#: The integer encoding some services return: NotStarted, Running, Failed, Cancelled, Finished.
_BY_INDEX: tuple[BesStatus, ...] = (
    BesStatus.NOT_STARTED,
    BesStatus.RUNNING,
    BesStatus.FAILED,
    BesStatus.CANCELLED,
    BesStatus.FINISHED,
)
_BY_NAME = {s.value.lower(): s for s in BesStatus}


def parse_status_code(value: str | int) -> BesStatus:
    """A `StatusCode` given as a name (any case) or as an integer 0..4 (also as digits)."""
    if isinstance(value, bool):
        raise errors.PermanentError(f"unknown BES status code {value!r}", code="BadStatus")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if 0 <= value < len(_BY_INDEX):
            return _BY_INDEX[value]
    elif isinstance(value, str):
        found = _BY_NAME.get(value.strip().lower())
        if found is not None:
            return found
    raise errors.PermanentError(f"unknown BES status code {value!r:.40}", code="BadStatus")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResultRef:
    """Where BES put one output. `url` carries the SAS token: never log or store it."""

    base_location: str
    relative_location: str
    sas_token: str = ""
    connection_string: str | None = None

    @property
    def public_url(self) -> str:
        """The blob URL without any token: safe to log and store."""
        base = self.base_location
        rel = self.relative_location
        if base and rel:
            return base.rstrip("/") + "/" + rel.lstrip("/")
        return base + rel

    @property
    def url(self) -> str:
        """BaseLocation + RelativeLocation + SasBlobToken: secret-bearing."""
        token = self.sas_token
        if token and not token.startswith("?"):
            token = "?" + token
        return self.public_url + token

    def __repr__(self) -> str:
        # The dataclass repr would print the token and connection string.
        return f"ResultRef(public_url={self.public_url!r})"

    __str__ = __repr__


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatusReport:
    status: BesStatus
    results: Mapping[str, ResultRef]
    details: str


def _get(body: Mapping[str, Any], key: str) -> Any:
    """Case-insensitive key lookup: services differ in casing (StatusCode / statusCode)."""
    if key in body:
        return body[key]
    lowered = key.lower()
    for k, v in body.items():
        if isinstance(k, str) and k.lower() == lowered:
            return v
    return None


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def parse_result_ref(value: Mapping[str, Any]) -> ResultRef:
    cs = _get(value, "ConnectionString")
    return ResultRef(
        base_location=_str(_get(value, "BaseLocation")),
        relative_location=_str(_get(value, "RelativeLocation")),
        sas_token=_str(_get(value, "SasBlobToken")),
        connection_string=cs if isinstance(cs, str) and cs else None,
    )


def parse_status(body: Any) -> StatusReport:
    """The status object of `GET /jobs/{id}`."""
    if not isinstance(body, Mapping):
        raise errors.PermanentError("BES status response is not an object", code="BadResponse")
    code = _get(body, "StatusCode")
    if code is None:
        raise errors.PermanentError("BES status response has no StatusCode", code="BadResponse")
    status = parse_status_code(code)
    raw_results = _get(body, "Results")
    results: dict[str, ResultRef] = {}
    if isinstance(raw_results, Mapping):
        for name, value in raw_results.items():
            if isinstance(value, Mapping):
                results[str(name)] = parse_result_ref(value)
    details = _get(body, "Details")
    return StatusReport(
        status=status,
        results=results,
        details=details if isinstance(details, str) else ("" if details is None else str(details)),
    )


def parse_job_id(body: Any) -> str:
    """The submit response: a JSON string holding the job id."""
    if isinstance(body, str) and _JOB_ID.match(body):
        return body
    raise errors.PermanentError("BES submit response is not a job id", code="BadResponse")


def check_job_id(job_id: str) -> str:
    """Job ids go into URL paths: only plain tokens are accepted."""
    if not _JOB_ID.match(job_id):
        raise errors.PermanentError("not a BES job id", code="BadJobId")
    return job_id


# --------------------------------------------------------------------------------------------
# Request bodies


def blob_reference_connection_string(connection_string: str, container: str, blob: str
                                     ) -> dict[str, Any]:
    """A blob reference in connection-string form: the service reads with the account key."""
    return {"ConnectionString": connection_string,
            "RelativeLocation": f"/{container}/{blob.lstrip('/')}"}


def blob_reference_sas(base_location: str, container: str, blob: str, sas_token: str
                       ) -> dict[str, Any]:
    """A blob reference in SAS form: BaseLocation + RelativeLocation + SasBlobToken is the URL."""
    token = sas_token if not sas_token or sas_token.startswith("?") else "?" + sas_token
    return {
        "BaseLocation": base_location.rstrip("/") + "/",
        "RelativeLocation": f"{container}/{blob.lstrip('/')}",
        "SasBlobToken": token,
    }


def _relative_location(ref: Mapping[str, Any]) -> str:
    value = ref.get("RelativeLocation")
    return value if isinstance(value, str) else ""


def build_submit_body(
    *,
    inputs: Mapping[str, dict[str, Any]],
    outputs: Mapping[str, dict[str, Any]],
    global_parameters: Mapping[str, str],
) -> dict[str, Any]:
    """The `POST /jobs` body, always in the multi-input `Inputs` form (never also `Input`)."""
    if not inputs:
        raise errors.PermanentError("a BES job needs at least one input", code="BadRequest")
    for name, ref in outputs.items():
        if not _relative_location(ref).lower().endswith(naming.OUTPUT_EXTENSIONS):
            raise errors.PermanentError(
                f"output {name!r}: blob name must end in one of"
                f" {', '.join(naming.OUTPUT_EXTENSIONS)}",
                code="BadRequest",
            )
    return {
        "Inputs": {str(k): dict(v) for k, v in inputs.items()},
        "Outputs": {str(k): dict(v) for k, v in outputs.items()},
        "GlobalParameters": {str(k): str(v) for k, v in global_parameters.items()},
    }


# --------------------------------------------------------------------------------------------
# Errors


def is_transient(status: int) -> bool:
    """Whether an HTTP status is worth retrying (408, 429, 5xx); unknown 5xx are transient."""
    return status in TRANSIENT_STATUSES or status >= 500


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase.replace(" ", "").replace("-", "")
    except ValueError:
        return f"HTTP{status}"


def _clean(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text


def _first_detail(details: Any) -> tuple[str, str]:
    """The first detail that carries a code: it names the precise cause."""
    if isinstance(details, Mapping):
        details = [details]
    if not isinstance(details, list):
        return "", ""
    for d in details:
        if isinstance(d, Mapping):
            code, message = _str(_get(d, "code")), _str(_get(d, "message"))
            if code or message:
                return code, message
    return "", ""


def parse_error(status: int, text: str) -> tuple[str, str]:
    """(code, message) of an error response, whatever its shape; the code is never empty."""
    try:
        body = json.loads(text) if text.strip() else None
    except ValueError:
        body = None
    if not isinstance(body, Mapping):
        return _phrase(status), _clean(text) or _phrase(status)
    err = _get(body, "error")
    outer_code, outer_msg, details = "", "", None
    if isinstance(err, Mapping):
        outer_code, outer_msg = _str(_get(err, "code")), _str(_get(err, "message"))
        details = _get(err, "details")
    elif isinstance(err, str):
        outer_msg = err
    else:  # APIM: {"statusCode": 429, "message": "..."}; or a bare {"code", "message"}
        outer_code, outer_msg = _str(_get(body, "code")), _str(_get(body, "message"))
    if not details:
        details = _get(body, "details")
    detail_code, detail_msg = _first_detail(details)
    code = detail_code or outer_code or _phrase(status)
    message = outer_msg or detail_msg
    if detail_msg and outer_msg and detail_msg not in outer_msg:
        message = f"{outer_msg} ({detail_msg})"
    return code, _clean(message) or _phrase(status)


#: Shared with the other backends (one parser for every service's `Retry-After`).
parse_retry_after = backoff.parse_retry_after
