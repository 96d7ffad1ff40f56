"""The emulator's knobs: one frozen dataclass, parsed from the CLI or changed at run time.

`POST /_emulator/config` replaces the live options with `dataclasses.replace`, so a handler
always sees one consistent set.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

DEFAULT_PORT = 0
DEFAULT_HOST = "127.0.0.1"
DEFAULT_SAS_LIFETIME_S = 86400.0
DEFAULT_RETRY_AFTER_S = 1
DEFAULT_MODEL = "feature_hashing"
DEFAULT_FAILURE_DETAILS = "Simulated failure: the experiment failed while scoring (emulator)."


class OptionError(ValueError):
    """A knob value that cannot be used; the message names the knob."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RateLimit:
    """At most `calls` requests per `period_s` window (fixed window, as APIM's rate-limit)."""

    calls: int
    period_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class EmulatorOptions:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    seed: int | None = None
    #: Model for services not named in `services`.
    default_model: str = DEFAULT_MODEL
    #: Service name -> model name.
    services: Mapping[str, str] = dataclasses.field(default_factory=dict)
    inputs: tuple[str, ...] = ("input1",)
    outputs: tuple[str, ...] = ("output1",)
    #: None: the model's own parameters are declared.
    global_parameters: tuple[str, ...] | None = None
    api_key: str | None = None
    apim_key: str | None = None
    rate_limit: RateLimit | None = None
    quota: RateLimit | None = None
    queue_delay_s: tuple[float, float] = (0.0, 0.0)
    run_time_s: tuple[float, float] = (0.0, 0.0)
    failure_rate: float = 0.0
    failure_details: str = DEFAULT_FAILURE_DETAILS
    max_running: int = 0  #: 0: no limit
    error_503_rate: float = 0.0
    drop_rate: float = 0.0
    retry_after_s: int = DEFAULT_RETRY_AFTER_S
    int_status: bool = False
    sas_lifetime_s: float = DEFAULT_SAS_LIFETIME_S
    #: Tests of the client's trust boundary: Results name this base URL instead of the
    #: account the output was written to (POST /_emulator/config only).
    results_base_url: str | None = None
    slow_response_s: tuple[float, float] = (0.0, 0.0)
    #: Block size for staged uploads and download chunks: bounds memory per running job.
    #: 1 MiB: aiohttp warns (an error under pytest) about larger bytes bodies, which the SDK
    #: sends.
    chunk_bytes: int = 1024 * 1024

    def __repr__(self) -> str:
        # Keys must never reach a log line.
        fields = {
            f.name: ("***" if f.name in {"api_key", "apim_key"} and getattr(self, f.name)
                     else getattr(self, f.name))
            for f in dataclasses.fields(self)
        }
        return "EmulatorOptions(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def parse_range(text: str | float | int | list[Any] | tuple[Any, ...], *, name: str
                ) -> tuple[float, float]:
    """'2' -> (2, 2); '1,5' -> (1, 5); also accepts a number or a two-item list."""
    try:
        if isinstance(text, int | float):
            lo = hi = float(text)
        elif isinstance(text, list | tuple):
            lo, hi = (float(text[0]), float(text[-1]))
        else:
            parts = [p.strip() for p in str(text).split(",")]
            if len(parts) not in (1, 2):
                raise ValueError
            lo, hi = float(parts[0]), float(parts[-1])
    except (ValueError, IndexError):
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
    if calls < 1 or not period_s > 0:
        raise OptionError(f"{name}: need N >= 1 and S > 0, got {text!r}")
    return RateLimit(calls=calls, period_s=period_s)


def parse_probability(value: object, *, name: str) -> float:
    try:
        p = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise OptionError(f"{name}: expected a probability 0..1, got {value!r}") from None
    if not 0.0 <= p <= 1.0:
        raise OptionError(f"{name}: expected a probability 0..1, got {value!r}")
    return p


def parse_services(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, model = item.partition("=")
        if not sep or not name.strip() or not model.strip():
            raise OptionError(f"service: expected NAME=MODEL, got {item!r}")
        out[name.strip()] = model.strip()
    return out


def parse_names(text: str, *, name: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if len(set(names)) != len(names):
        raise OptionError(f"{name}: duplicate names in {text!r}")
    return names


_PROBABILITIES = {"failure_rate", "error_503_rate", "drop_rate"}
_RANGES = {"queue_delay_s", "run_time_s", "slow_response_s"}
_RATES = {"rate_limit", "quota"}
_INTS = {"max_running", "retry_after_s", "chunk_bytes"}
_FLOATS = {"sas_lifetime_s"}
_BOOLS = {"int_status"}
_STRINGS = {"failure_details", "default_model"}
_OPTIONAL_STRINGS = {"api_key", "apim_key", "results_base_url"}
_NAME_LISTS = {"inputs", "outputs"}


def _coerce(key: str, value: Any) -> Any:  # noqa: C901 - one branch per kind of knob
    if key in _PROBABILITIES:
        return parse_probability(value, name=key)
    if key in _RANGES:
        return parse_range(value, name=key)
    if key in _RATES:
        return None if value in (None, "") else parse_rate(str(value), name=key)
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise OptionError(f"{key}: expected an integer >= 0, got {value!r}")
        return value
    if key in _FLOATS:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise OptionError(f"{key}: expected a number > 0, got {value!r}")
        return float(value)
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise OptionError(f"{key}: expected true or false, got {value!r}")
        return value
    if key in _STRINGS:
        if not isinstance(value, str):
            raise OptionError(f"{key}: expected a string")
        return value
    if key in _OPTIONAL_STRINGS:
        if value is not None and not isinstance(value, str):
            raise OptionError(f"{key}: expected a string or null")
        return value or None
    if key in _NAME_LISTS:
        names = parse_names(value, name=key) if isinstance(value, str) else tuple(value)
        if not names:
            raise OptionError(f"{key}: at least one name is needed")
        return names
    if key == "global_parameters":
        if value is None:
            return None
        return parse_names(value, name=key) if isinstance(value, str) else tuple(value)
    if key == "services":
        if not isinstance(value, dict):
            raise OptionError("services: expected an object NAME -> MODEL")
        return {str(k): str(v) for k, v in value.items()}
    raise OptionError(f"{key}: not a knob that can change at run time")


def updated(options: EmulatorOptions, changes: Mapping[str, Any]) -> EmulatorOptions:
    """Options with `changes` (JSON values, as sent to /_emulator/config) applied."""
    return dataclasses.replace(options, **{k: _coerce(k, v) for k, v in changes.items()})
