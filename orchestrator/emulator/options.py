"""The emulator's knobs: one frozen pydantic model, built from the CLI or changed at run time.

`POST /_emulator/config` validates the live options with the changes applied and swaps the whole
object, so a handler always sees one consistent set. Knob values that arrive as text (the CLI,
or JSON) go through the same validators: `'1,5'` is a range, `'100/1s'` a rate limit,
`'250/25'` a token bucket, `'a,b'` a list of names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr

DEFAULT_PORT = 0
DEFAULT_HOST = "127.0.0.1"
DEFAULT_SAS_LIFETIME_S = 86400.0
DEFAULT_RETRY_AFTER_S = 1
DEFAULT_MODEL = "feature_hashing"
DEFAULT_FAILURE_DETAILS = "Simulated failure: the experiment failed while scoring (emulator)."
#: Batch endpoints: the deployment every endpoint has unless told otherwise.
DEFAULT_DEPLOYMENT = "default"
DEFAULT_DATASTORE = "workspaceblobstore"
DEFAULT_BE_CONTAINER = "azureml-blobstore"
DEFAULT_TOKEN_LIFETIME_S = 3600.0
DEFAULT_ARM_PAGE_SIZE = 100
#: ARM's 2024 token bucket per subscription and principal: reads 250 refilling 25/s,
#: writes 200 refilling 10/s.
DEFAULT_ARM_READS = "250/25"
DEFAULT_ARM_WRITES = "200/10"
#: Knobs fixed at start (the listening socket, the random stream, secrets).
STARTUP_ONLY = frozenset({"host", "port", "seed", "be_storage_connection_string",
                          "identity_header"})
SECRET_KNOBS = frozenset({"api_key", "apim_key", "be_storage_connection_string",
                          "identity_header"})


class OptionError(ValueError):
    """A knob value that cannot be used; the message names the knob."""


class RateLimit(BaseModel):
    """At most `calls` requests per `period_s` window (fixed window, as APIM's rate-limit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    calls: int = Field(ge=1)
    period_s: float = Field(gt=0)


class TokenBucket(BaseModel):
    """ARM's throttle: `capacity` requests, refilled at `refill_per_s`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    capacity: int = Field(ge=1)
    refill_per_s: float = Field(gt=0)


def parse_range(text: str | float | int | list[Any] | tuple[Any, ...], *, name: str
                ) -> tuple[float, float]:
    """'2' -> (2, 2); '1,5' -> (1, 5); also accepts a number or a two-item list."""
    try:
        if isinstance(text, bool):
            raise ValueError
        if isinstance(text, int | float):
            lo = hi = float(text)
        elif isinstance(text, list | tuple):
            lo, hi = (float(text[0]), float(text[-1]))
        else:
            parts = [p.strip() for p in str(text).split(",")]
            if len(parts) not in (1, 2):
                raise ValueError
            lo, hi = float(parts[0]), float(parts[-1])
    except (ValueError, IndexError, TypeError):
        raise OptionError(f"{name}: expected MIN[,MAX] seconds, got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi < lo:
        raise OptionError(f"{name}: need 0 <= MIN <= MAX, got {text!r}")
    return lo, hi


def parse_rate(text: str, *, name: str) -> RateLimit:
    """'100/1s', '5/60s', '10/60' -> RateLimit."""
    try:
        calls_text, period_text = text.split("/", 1)
        calls = int(calls_text)
        period_s = float(period_text.strip().removesuffix("s"))
    except ValueError:
        raise OptionError(f"{name}: expected N/Ss (e.g. 100/1s), got {text!r}") from None
    if calls < 1 or not period_s > 0 or not math.isfinite(period_s):
        raise OptionError(f"{name}: need N >= 1 and S > 0, got {text!r}")
    return RateLimit(calls=calls, period_s=period_s)


def parse_bucket(text: str, *, name: str) -> TokenBucket:
    """'250/25' -> 250 requests, refilled at 25 per second."""
    try:
        capacity_text, refill_text = text.split("/", 1)
        capacity = int(capacity_text)
        refill = float(refill_text.strip().removesuffix("s"))
    except ValueError:
        raise OptionError(f"{name}: expected CAPACITY/REFILL_PER_S (e.g. 250/25) or 'off', "
                          f"got {text!r}") from None
    if capacity < 1 or not refill > 0 or not math.isfinite(refill):
        raise OptionError(f"{name}: need CAPACITY >= 1 and REFILL_PER_S > 0, got {text!r}")
    return TokenBucket(capacity=capacity, refill_per_s=refill)


def parse_services(items: tuple[str, ...] | list[str], *, name: str = "service"
                   ) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, model = str(item).partition("=")
        if not sep or not key.strip() or not model.strip():
            raise OptionError(f"{name}: expected NAME=MODEL, got {item!r}")
        out[key.strip()] = model.strip()
    return out


def parse_names(text: str, *, name: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if len(set(names)) != len(names):
        raise OptionError(f"{name}: duplicate names in {text!r}")
    return names


# -- pydantic glue: one before-validator per kind of textual knob ---------------------------


def _range(value: Any, info: pydantic.ValidationInfo) -> Any:
    return parse_range(value, name=info.field_name or "range")


def _rate(value: Any, info: pydantic.ValidationInfo) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return parse_rate(value, name=info.field_name or "rate")
    return value


def _bucket(value: Any, info: pydantic.ValidationInfo) -> Any:
    if value is None or value == "" or (isinstance(value, str) and value.lower() == "off"):
        return None
    if isinstance(value, str):
        return parse_bucket(value, name=info.field_name or "bucket")
    return value


def _names(value: Any, info: pydantic.ValidationInfo) -> Any:
    if isinstance(value, str):
        return parse_names(value, name=info.field_name or "names")
    return value


def _mapping(value: Any, info: pydantic.ValidationInfo) -> Any:
    """`NAME=MODEL` items (the CLI) or an object (JSON)."""
    if isinstance(value, list | tuple):
        return parse_services(list(value), name=info.field_name or "mapping")
    if value is not None and not isinstance(value, Mapping):
        raise OptionError(f"{info.field_name}: expected an object NAME -> MODEL")
    return value


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


Range = Annotated[tuple[float, float], pydantic.BeforeValidator(_range)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Field(strict=True, ge=0)]
Positive = Annotated[float, Field(gt=0), pydantic.AfterValidator(lambda v: float(v))]
Names = Annotated[tuple[str, ...], pydantic.BeforeValidator(_names)]
ModelMap = Annotated[dict[str, str], pydantic.BeforeValidator(_mapping)]
OptionalRate = Annotated[RateLimit | None, pydantic.BeforeValidator(_rate)]
OptionalBucket = Annotated[TokenBucket | None, pydantic.BeforeValidator(_bucket)]
OptionalText = Annotated[str | None, pydantic.BeforeValidator(_empty_is_none)]
OptionalSecret = Annotated[SecretStr | None, pydantic.BeforeValidator(_empty_is_none)]


class EmulatorOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)

    host: str = DEFAULT_HOST
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    seed: int | None = None
    #: Model for services not named in `services`.
    default_model: str = DEFAULT_MODEL
    #: Service name -> model name.
    services: ModelMap = Field(default_factory=dict)
    inputs: Names = ("input1",)
    outputs: Names = ("output1",)
    #: None: the model's own parameters are declared.
    global_parameters: Names | None = None
    api_key: OptionalSecret = None
    apim_key: OptionalSecret = None
    rate_limit: OptionalRate = None
    quota: OptionalRate = None
    queue_delay_s: Range = (0.0, 0.0)
    run_time_s: Range = (0.0, 0.0)
    failure_rate: Probability = 0.0
    failure_details: str = DEFAULT_FAILURE_DETAILS
    max_running: Count = 0  #: 0: no limit
    error_503_rate: Probability = 0.0
    drop_rate: Probability = 0.0
    retry_after_s: Count = DEFAULT_RETRY_AFTER_S
    int_status: bool = Field(default=False, strict=True)
    sas_lifetime_s: Positive = DEFAULT_SAS_LIFETIME_S
    #: Tests of the client's trust boundary: Results name this base URL instead of the
    #: account the output was written to (POST /_emulator/config only).
    results_base_url: OptionalText = None
    slow_response_s: Range = (0.0, 0.0)
    #: Block size for staged uploads and download chunks: bounds memory per running job.
    #: 1 MiB: aiohttp warns (an error under pytest) about larger bytes bodies, which the SDK
    #: sends.
    chunk_bytes: Count = 1024 * 1024

    # -- Azure ML batch endpoints (docs/emulator.md) ----------------------------------------
    #: The App Service managed-identity secret (`X-IDENTITY-HEADER`); None: any non-empty
    #: header value is accepted.
    identity_header: OptionalSecret = None
    token_lifetime_s: Positive = DEFAULT_TOKEN_LIFETIME_S
    #: Deployment name -> model; every endpoint name has these deployments.
    be_deployments: ModelMap = Field(
        default_factory=lambda: {DEFAULT_DEPLOYMENT: DEFAULT_MODEL})
    #: None: no default deployment (an invoke must name one).
    be_default_deployment: OptionalText = DEFAULT_DEPLOYMENT
    #: None: any subscription / resource group / workspace in an ARM path is this workspace.
    be_workspace_id: OptionalText = None
    be_datastore: str = DEFAULT_DATASTORE
    #: None: the AccountName of `be_storage_connection_string`.
    be_account_name: OptionalText = None
    be_container: str = DEFAULT_BE_CONTAINER
    #: How the emulator itself reads inputs and writes outputs of batch jobs.
    be_storage_connection_string: OptionalSecret = None
    prepare_s: Range = (0.0, 0.0)
    finalize_s: Range = (0.0, 0.0)
    cancel_s: Range = (0.2, 0.2)
    not_responding_rate: Probability = 0.0
    not_responding_s: Range = (1.0, 1.0)
    arm_reads: OptionalBucket = Field(default_factory=lambda: parse_bucket(
        DEFAULT_ARM_READS, name="arm_reads"))
    arm_writes: OptionalBucket = Field(default_factory=lambda: parse_bucket(
        DEFAULT_ARM_WRITES, name="arm_writes"))
    arm_page_size: int = Field(default=DEFAULT_ARM_PAGE_SIZE, strict=True, ge=1)
    #: Answer a successful invoke 201 instead of 200 (the service uses both).
    invoke_201: bool = Field(default=False, strict=True)
    #: Fraction of invokes refused 403 with a plain-text body, as a gateway policy does.
    invoke_denied_rate: Probability = 0.0

    @pydantic.model_validator(mode="after")
    def _default_deployment_exists(self) -> EmulatorOptions:
        if not self.be_deployments:
            raise OptionError("be_deployments: at least one deployment is needed")
        if (self.be_default_deployment is not None
                and self.be_default_deployment not in self.be_deployments):
            raise OptionError(f"be_default_deployment: {self.be_default_deployment!r} is not "
                              f"one of the deployments: {', '.join(self.be_deployments)}")
        for key in ("inputs", "outputs"):
            if not getattr(self, key):
                raise OptionError(f"{key}: at least one name is needed")
        return self

    def secret(self, key: str) -> str | None:
        value = getattr(self, key)
        return value.get_secret_value() if isinstance(value, SecretStr) else None

    def public(self) -> dict[str, Any]:
        """The knobs as JSON values, without the secrets."""
        return self.model_dump(mode="json", exclude=set(SECRET_KNOBS))


def _message(exc: pydantic.ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    key = ".".join(str(p) for p in err["loc"]) or "options"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg if msg.startswith(f"{key.split('.')[0]}:") or not err["loc"] else f"{key}: {msg}"


def build(values: Mapping[str, Any]) -> EmulatorOptions:
    """Options from plain values (the CLI's, or JSON); OptionError names the bad knob."""
    try:
        return EmulatorOptions.model_validate(dict(values))
    except pydantic.ValidationError as exc:
        raise OptionError(_message(exc)) from None


def updated(options: EmulatorOptions, changes: Mapping[str, Any]) -> EmulatorOptions:
    """Options with `changes` (JSON values, as sent to /_emulator/config) applied."""
    fixed = [k for k in changes if k in STARTUP_ONLY or k not in EmulatorOptions.model_fields]
    if fixed:
        raise OptionError(f"{fixed[0]}: not a knob that can change at run time")
    current = {k: getattr(options, k) for k in EmulatorOptions.model_fields}
    return build({**current, **changes})
