"""The daemon's HTTP endpoint: `GET /metrics`, `/healthz`, `/readyz`, the status page at `/`,
a job's timeline at `/jobs/{id}`. Start it with `await web.start(settings, repo, live=…,
ready=…)` on the daemon's loop; `await server.stop()` closes it.

The server (aiohttp, prometheus-client) is imported on first use of `start` or `Server`:
`bes-orchestrator status` imports `orchestrator.web.probe` and must not pay for it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.web.server import Server, start

__all__ = ["Server", "start"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("orchestrator.web.server"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
