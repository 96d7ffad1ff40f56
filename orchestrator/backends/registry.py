"""Which backend a service section's `kind` names, and what every backend is built from."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import aiohttp

from orchestrator import config, errors
from orchestrator.backends import base
from orchestrator.backends.batch_endpoint import backend as batch_backend
from orchestrator.backends.batch_endpoint import budget as batch_budget
from orchestrator.backends.bes import backend as bes_backend
from orchestrator.backends.rrs import backend as rrs_backend
from orchestrator.storage import blob


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shared:
    """What the daemon gives every backend: one HTTP session, and one blob store and one
    storage credential for all that need them."""

    settings: config.Settings
    session: aiohttp.ClientSession
    #: The classic BES blob store (connection string): None when no service is of kind "bes".
    blobs: blob.BlobStore | None = None
    #: `[storage.credential]` when `[storage]` has account_url (batch endpoints only).
    storage_credential: Any = None
    #: Subscription id -> its ARM read budget, shared by every batch endpoint polled through it.
    arm_budgets: dict[str, batch_budget.ReadBudget] = dataclasses.field(default_factory=dict)


def _bes(service: Any, shared: Shared) -> base.Backend:
    assert isinstance(service, config.BesService)
    assert shared.blobs is not None, "open_context builds the blob store when a BES service exists"
    return bes_backend.BesBackend(service, shared.session, shared.blobs)


def _rrs(service: Any, shared: Shared) -> base.Backend:
    assert isinstance(service, config.RrsService)
    return rrs_backend.RrsBackend(service, shared.session)


def _credential(cred: config.CredentialConfig) -> Any:
    # azure-identity (with msal and cryptography) is imported only by a daemon that has a
    # batch endpoint: about 1.3 s of start-up a BES-only daemon does not pay.
    from orchestrator import identity

    return identity.build(cred)


def subscription_of(workspace_id: str) -> str:
    """`/subscriptions/{sub}/resourceGroups/…` -> `sub` (ARM counts reads per subscription)."""
    parts = workspace_id.strip("/").split("/")
    return parts[1].lower() if len(parts) > 1 else workspace_id


def _batch_endpoint(service: Any, shared: Shared) -> base.Backend:
    assert isinstance(service, config.BatchEndpointService)
    # One budget per subscription: the first service of a subscription sets its rate.
    budget = shared.arm_budgets.setdefault(
        subscription_of(service.workspace_id),
        batch_budget.ReadBudget(service.arm_reads_per_s))
    return batch_backend.BatchEndpointBackend(
        service, session=shared.session, storage=shared.settings.storage,
        credential=_credential(service.credential), budget=budget,
        storage_credential=shared.storage_credential)


#: kind -> constructor. A new backend adds one line here.
BUILDERS: dict[str, Callable[[Any, Shared], base.Backend]] = {
    "bes": _bes,
    "rrs": _rrs,
    "batch_endpoint": _batch_endpoint,
}


def kind_of(service: object) -> str:
    kind = getattr(service, "kind", base.DEFAULT_KIND)
    assert isinstance(kind, str)
    return kind


def needs_blob_store(settings: config.Settings) -> bool:
    """The classic BES backend references its blobs through the daemon's blob store (a key or
    SAS); the other kinds do not use it. BES with keyless storage is a config error: the
    service is handed a key or SAS for every blob, which Entra ID cannot give."""
    bes = [name for name, svc in settings.services.items() if kind_of(svc) == "bes"]
    if bes and settings.storage.account_url is not None:
        raise errors.ConfigError(
            "storage.account_url", f"services.{bes[0]} is a classic BES service, which needs "
            "a storage connection string (it is handed a key or SAS per blob); account_url "
            "with Entra ID serves batch endpoints only")
    return bool(bes)


def storage_credential(settings: config.Settings) -> Any:
    """The Entra ID credential for `[storage]` (scope https://storage.azure.com/.default) when it
    has account_url and a batch endpoint will use it; else None. The caller closes it."""
    if settings.storage.account_url is None or not any(
            kind_of(svc) == "batch_endpoint" for svc in settings.services.values()):
        return None
    return _credential(settings.storage.credential)


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
