"""structlog setup: JSON lines when not on a terminal, every secret redacted on the way out.

Every line has a stable snake_case event name; job context (job_id, service, state) is bound by
the worker. Redaction happens in one processor, so no call site can forget it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

from orchestrator import redact

_known_secrets: set[str] = set()
#: What `configure` was asked for, applied when the first logger is made: structlog (which pulls
#: in rich and pygments, ~0.1 s) is imported only by a command that logs, not by `status`.
_pending: tuple[bool, str, TextIO] | None = None
_structlog_ready = False


def register_secrets(values: Iterable[str]) -> None:
    """Exact secret values (API keys, storage keys, passwords) to scrub from every log line."""
    for v in values:
        if v and len(v) >= 6:
            _known_secrets.add(v)


def scrub(text: str) -> str:
    """Registered secrets, SAS signatures, account keys and bearer tokens become ***."""
    return redact.redact(text, _known_secrets)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return scrub(f"{type(value).__name__}: {value}")
    return value


def redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    for key in list(event_dict):
        event_dict[key] = _redact_value(event_dict[key])
    return event_dict


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """Call once at start-up. `json=None`: JSON unless stderr is a terminal. Takes effect at
    once if a logger was made already, else when the first one is (`get`)."""
    global _pending
    if json is None:
        json = not sys.stderr.isatty()
    _pending = (json, level, sys.stderr)
    if _structlog_ready:
        _apply_pending()


def _apply_pending() -> None:
    global _pending
    if _pending is None:
        return
    json, level, stream = _pending
    _pending = None
    import structlog

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get(name: str = "bes") -> Any:
    global _structlog_ready
    import structlog

    _structlog_ready = True
    _apply_pending()
    return structlog.get_logger(name)
