"""Settings: one TOML file plus secrets from the environment or files, validated by pydantic.

Every problem raises `errors.ConfigError(key, problem)` naming the dotted key, so the CLI can
print one line and exit 78. Secrets are never accepted inline: a key `api_key` is given as
`api_key_env` (an environment variable), `api_key_file` (a file) or `api_key_credential`
(a systemd `LoadCredential=` name, read from `$CREDENTIALS_DIRECTORY`). Every key is documented
in config/example.toml.

The models live in `core` (shared machinery), `services` (one model per backend kind) and
`tables` (the other tables and Settings); they are all importable from here.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic

from orchestrator import errors
from orchestrator.config import core
from orchestrator.config.core import Secret as Secret
from orchestrator.config.services import DEFAULT_JOB_TIMEOUT_S as DEFAULT_JOB_TIMEOUT_S
from orchestrator.config.services import DEFAULT_MAX_IN_FLIGHT as DEFAULT_MAX_IN_FLIGHT
from orchestrator.config.services import DEFAULT_MAX_RESUBMITS as DEFAULT_MAX_RESUBMITS
from orchestrator.config.services import DEFAULT_OUTPUT_EXTENSION as DEFAULT_OUTPUT_EXTENSION
from orchestrator.config.services import DEFAULT_RESUBMIT_ON as DEFAULT_RESUBMIT_ON
from orchestrator.config.services import KINDS as KINDS
from orchestrator.config.services import BatchEndpointService as BatchEndpointService
from orchestrator.config.services import BesService as BesService
from orchestrator.config.services import CredentialConfig as CredentialConfig
from orchestrator.config.services import CredentialType as CredentialType
from orchestrator.config.services import PollPolicy as PollPolicy
from orchestrator.config.services import RetryPolicy as RetryPolicy
from orchestrator.config.services import RrsService as RrsService
from orchestrator.config.services import ServiceBase as ServiceBase
from orchestrator.config.services import ServiceConfig as ServiceConfig
from orchestrator.config.tables import DEFAULT_CONTAINER as DEFAULT_CONTAINER
from orchestrator.config.tables import DEFAULT_DATABASE_URL as DEFAULT_DATABASE_URL
from orchestrator.config.tables import DEFAULT_HEARTBEAT_S as DEFAULT_HEARTBEAT_S
from orchestrator.config.tables import DEFAULT_HTTP_LISTEN as DEFAULT_HTTP_LISTEN
from orchestrator.config.tables import DEFAULT_LEASE_S as DEFAULT_LEASE_S
from orchestrator.config.tables import DEFAULT_SETTLE_S as DEFAULT_SETTLE_S
from orchestrator.config.tables import DaemonConfig as DaemonConfig
from orchestrator.config.tables import DatabaseConfig as DatabaseConfig
from orchestrator.config.tables import HttpConfig as HttpConfig
from orchestrator.config.tables import Settings as Settings
from orchestrator.config.tables import StorageConfig as StorageConfig
from orchestrator.config.tables import WatchConfig as WatchConfig


def parse(
    data: Mapping[str, Any], *, base: Path, path: Path | None = None, secrets: bool = True
) -> Settings:
    """Build Settings from parsed TOML. `base` resolves relative paths (the file's folder).

    `secrets=False` is for commands that only read the database and so need nothing of the
    daemon's environment: no secret is read (a missing variable or file is no error; each secret
    is a placeholder that refuses to give its value) and the watch folders are not looked at."""
    if "path" in data:
        raise errors.ConfigError("path", "unknown key")
    try:
        settings = Settings.model_validate({**data, "path": path},
                                           context={"base": base, "secrets": secrets})
    except pydantic.ValidationError as exc:
        raise core.to_config_error(exc, union_tags=KINDS) from None
    if secrets:
        _check_watch_folders(settings)
    else:
        _label_unread(settings, "")
    return settings


def _check_watch_folders(settings: Settings) -> None:
    """A watch folder must exist (a typo would watch an empty new folder), unless `create`."""
    for i, w in enumerate(settings.watches):
        key = f"watch[{i}].folder"
        try:
            if w.folder.is_dir():
                continue
            if w.folder.exists():
                raise errors.ConfigError(key, f"{w.folder} is not a folder")
        except OSError as exc:
            raise errors.ConfigError(key, f"cannot check {w.folder}: {exc.strerror}") from None
        if not w.create:
            raise errors.ConfigError(key, f"{w.folder} does not exist (create = true creates it)")


def _label_unread(value: Any, prefix: str) -> None:
    """Give each unread secret its full dotted key, for the error it raises if used."""
    if isinstance(value, core.Secret):
        value.place(prefix.rpartition(".")[0])
    elif isinstance(value, pydantic.BaseModel):
        for name in type(value).model_fields:
            _label_unread(getattr(value, name), f"{prefix}.{name}".lstrip("."))
    elif isinstance(value, dict):
        for k, v in value.items():
            _label_unread(v, f"{prefix}.{k}")
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            _label_unread(v, f"{prefix}[{i}]")


def load(path: Path, *, secrets: bool = True) -> Settings:
    """Read and validate the TOML file at `path` (see `parse` for `secrets`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise errors.ConfigError(str(path), f"not valid TOML: {exc}") from None
    return parse(data, base=path.resolve().parent, path=path, secrets=secrets)


def _plain(value: Any) -> Any:
    if isinstance(value, core.Secret):
        return None if value.is_absent else "***"
    if isinstance(value, pydantic.BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def redacted(settings: Settings) -> dict[str, Any]:
    """The resolved settings as plain data with every secret shown as '***'."""
    out = _plain(settings)
    assert isinstance(out, dict)
    return out


def secret_values(settings: Settings) -> list[str]:
    """Every secret that was read, for the log redactor."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, core.Secret):
            if value.is_read:
                found.append(value.get())
        elif isinstance(value, pydantic.BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, tuple | list):
            for v in value:
                walk(v)

    walk(settings)
    return found
