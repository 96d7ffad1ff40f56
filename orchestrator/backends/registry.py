"""Which backend a service section's `kind` names, and what every backend is built from."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import aiohttp

from orchestrator import config, errors
from orchestrator.backends import base
from orchestrator.backends.bes import backend as bes_backend
from orchestrator.backends.rrs import backend as rrs_backend
from orchestrator.storage import blob


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shared:
    """What the daemon gives every backend: one HTTP session and one blob store for all."""

    settings: config.Settings
    session: aiohttp.ClientSession
    blobs: blob.BlobStore


def _bes(service: Any, shared: Shared) -> base.Backend:
    assert isinstance(service, config.BesService)
    return bes_backend.BesBackend(service, shared.session, shared.blobs)


def _rrs(service: Any, shared: Shared) -> base.Backend:
    assert isinstance(service, config.RrsService)
    return rrs_backend.RrsBackend(service, shared.session)


#: kind -> constructor. A new backend adds one line here.
BUILDERS: dict[str, Callable[[Any, Shared], base.Backend]] = {
    "bes": _bes,
    "rrs": _rrs,
}


def kind_of(service: object) -> str:
    kind = getattr(service, "kind", base.DEFAULT_KIND)
    assert isinstance(kind, str)
    return kind


def build(service: Any, shared: Shared) -> base.Backend:
    """The backend for one service section."""
    kind = kind_of(service)
    try:
        builder = BUILDERS[kind]
    except KeyError:
        raise errors.ConfigError(f"services.{service.name}.kind",
                                 f"unknown kind {kind!r}; use one of {', '.join(BUILDERS)}"
                                 ) from None
    return builder(service, shared)
