"""Microsoft Entra credentials from the config, through azure-identity's async credentials.

The library caches each token until shortly before it expires and refreshes it; the daemon only
asks for a token per call with the plane's scope. A credential is built from the config's
`credential` table: `type = "default"` is DefaultAzureCredential (environment service
principal, workload identity, managed identity, Azure CLI, in that order), the others name one
credential type with its options. Secrets (a client secret) come from the config's secret forms
and are handed to the library only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from azure.identity import aio as identity_aio

from orchestrator import config


def _options(cred: config.CredentialConfig, *names: tuple[str, str]) -> dict[str, Any]:
    """The library's keyword arguments for the config's options that are set."""
    out: dict[str, Any] = {"authority": cred.authority} if cred.authority else {}
    for ours, theirs in names:
        value = getattr(cred, ours)
        if value is not None:
            out[theirs] = str(value)
    return out


def _client_secret(cred: config.CredentialConfig) -> Any:
    assert cred.client_secret is not None and cred.tenant_id and cred.client_id
    return identity_aio.ClientSecretCredential(
        cred.tenant_id, cred.client_id, cred.client_secret.get(), **_options(cred))


_BUILDERS: dict[str, Callable[[config.CredentialConfig], Any]] = {
    "default": lambda c: identity_aio.DefaultAzureCredential(**_options(
        c, ("client_id", "managed_identity_client_id"), ("tenant_id", "tenant_id"))),
    "managed_identity": lambda c: identity_aio.ManagedIdentityCredential(**_options(
        c, ("client_id", "client_id"))),
    "client_secret": _client_secret,
    "azure_cli": lambda c: identity_aio.AzureCliCredential(**_options(
        c, ("tenant_id", "tenant_id"))),
    "workload_identity": lambda c: identity_aio.WorkloadIdentityCredential(**_options(
        c, ("tenant_id", "tenant_id"), ("client_id", "client_id"),
        ("token_file_path", "token_file_path"))),
    "environment": lambda c: identity_aio.EnvironmentCredential(**_options(c)),
}


def build(cred: config.CredentialConfig) -> Any:
    """An azure-identity aio credential (an AsyncTokenCredential) for the config's choice.
    The caller closes it (`await credential.close()`)."""
    return _BUILDERS[cred.type](cred)
