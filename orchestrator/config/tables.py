"""The tables besides services (`[daemon]`, `[database]`, `[storage]`, `[http]`, `[[watch]]`) and
`Settings`, which holds them all and checks what spans tables."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pydantic

from orchestrator import errors
from orchestrator.config import core
from orchestrator.config import services as kinds
from orchestrator.db import urls

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///state.db"
DEFAULT_CONTAINER = "bes-orchestrator"
DEFAULT_SETTLE_S = 2.0
DEFAULT_LEASE_S = 30.0
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_HTTP_LISTEN = "127.0.0.1:9464"

_CONTAINER_RE = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")


def _check_container(value: str) -> str:
    if not _CONTAINER_RE.fullmatch(value):
        raise ValueError("is not a valid container name: 3-63 characters, lowercase letters, "
                         "digits and single hyphens, starting and ending with a letter or digit")
    return value


ContainerName = Annotated[str, pydantic.AfterValidator(_check_container)]


class WatchConfig(core.Model):
    name: core.Text
    folder: core.ConfigPath
    pattern: core.Text = "*.csv"
    case_sensitive: bool = False  #: whether pattern tells *.csv from *.CSV
    service: core.Text
    output_dir: core.ConfigPath
    archive_dir: core.ConfigPath
    failed_dir: core.ConfigPath
    settle_s: float = pydantic.Field(default=DEFAULT_SETTLE_S, ge=0.0)
    follow_symlinks: bool = False
    create: bool = False  #: create a missing folder instead of refusing the configuration

    @pydantic.model_validator(mode="before")
    @classmethod
    def _default_dirs(cls, data: Any, info: pydantic.ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        folder = core.resolve(data.get("folder"), core.base_path(info))
        if isinstance(folder, Path):
            data = dict(data)
            for key, sub in (("output_dir", "results"), ("archive_dir", "archive"),
                             ("failed_dir", "failed")):
                data.setdefault(key, folder.parent / sub)
        return data


class StorageConfig(core.Model):
    """The blob account inputs and outputs go through: a connection string, or Entra ID."""

    #: Absent (a placeholder whose value is refused) when account_url is used.
    connection_string: core.Secret = core.Secret.absent(
        "storage.connection_string", "is not set: [storage] uses account_url (Entra ID)")
    account_url: core.WebUrl | None = None  #: https://<account>.blob.core.windows.net
    credential: kinds.CredentialConfig = kinds.CredentialConfig()  #: with account_url
    container: ContainerName = DEFAULT_CONTAINER
    #: How blobs are referenced in the submit body: "connection_string" or "sas".
    reference: Literal["connection_string", "sas"] = "connection_string"
    sas_lifetime_s: float = pydantic.Field(default=24 * 3600.0, ge=60.0)
    delete_blobs_after_success: bool = False
    upload_chunk_bytes: int = pydantic.Field(default=4 * 1024 * 1024, ge=64 * 1024)
    upload_parallelism: core.Positive = 4
    #: Hosts besides the storage account's own that `Results` may point at.
    allowed_result_hosts: Annotated[tuple[core.Text, ...], pydantic.Field(strict=False)] = ()

    @pydantic.model_validator(mode="after")
    def _one_way_in(self) -> StorageConfig:
        absent = self.connection_string.is_absent
        if absent and self.account_url is None:
            raise core.key_error("connection_string_env",
                             "is required (or _file/_credential), or account_url with Entra ID")
        if not absent and self.account_url is not None:
            raise core.key_error("account_url", "give either a connection string or account_url")
        if self.account_url is None and "credential" in self.model_fields_set:
            raise core.key_error("credential", "is only used with account_url")
        return self


_PASSWORD_PARAMS = ("password", "passwd", "pwd", "pass")


def _database_url(value: str, info: pydantic.ValidationInfo) -> str:
    database = urls.plain_sqlite_database(value)
    if database is not None and value.startswith("sqlite+aiosqlite:"):
        # The usual SQLite URL, without importing SQLAlchemy (the database-only commands).
        db = Path(database)
        base = core.base_path(info)
        if database not in ("", ":memory:") and not db.is_absolute() and base is not None:
            database = str((base / db).resolve())
        return urls.render_sqlite(database)
    import sqlalchemy.engine
    import sqlalchemy.exc

    try:
        url = sqlalchemy.engine.make_url(value)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        # The parser's message repeats the URL, and so a password: never shown.
        raise ValueError("is not a database URL") from None
    if url.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
    if url.password is not None or any(
        k.lower() in _PASSWORD_PARAMS or "password" in k.lower() for k in url.query
    ):
        raise ValueError("must not hold a password; use database.password_env")
    base = core.base_path(info)
    if url.drivername.startswith("sqlite") and url.database and url.database != ":memory:":
        db = Path(url.database)
        if not db.is_absolute() and base is not None:
            url = url.set(database=str((base / db).resolve()))
    return url.render_as_string(hide_password=False)


class DatabaseConfig(core.Model):
    url: Annotated[str, pydantic.AfterValidator(_database_url)] = pydantic.Field(
        default=DEFAULT_DATABASE_URL, validate_default=True)
    password: core.Secret | None = None


class HttpConfig(core.Model):
    """The metrics, health and status endpoint."""

    listen: str = DEFAULT_HTTP_LISTEN  #: host:port; "" turns the endpoint off
    token: core.Secret | None = None  #: required unless listen is a loopback address
    #: A job waiting longer than this is shown as stuck.
    stuck_after_s: float = pydantic.Field(default=3600.0, gt=0.0)

    @pydantic.field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value:
            _split_listen(value)
        return value

    @pydantic.model_validator(mode="after")
    def _token_off_loopback(self) -> HttpConfig:
        if self.enabled and self.token is None and not _is_loopback(self.host):
            raise core.key_error("listen", f"{self.host or '*'} is not a loopback address: give "
                                       "http.token_env, token_file or token_credential")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.listen)

    @property
    def host(self) -> str:
        return _split_listen(self.listen)[0] if self.listen else ""

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1] if self.listen else 0


def _split_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('must be "host:port" (e.g. "127.0.0.1:9464"), or "" for off')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DaemonConfig(core.Model):
    state_dir: core.ConfigPath
    spool_dir: core.ConfigPath
    worker_id: core.Text = pydantic.Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    lease_s: float = pydantic.Field(default=DEFAULT_LEASE_S, ge=1.0)
    heartbeat_s: float = pydantic.Field(default=DEFAULT_HEARTBEAT_S, ge=0.1)
    executors: core.Positive = 100  #: step executors; a waiting job holds none
    max_jobs_held: core.Positive = 20_000  #: jobs one daemon keeps leased at once
    uploads: core.Positive = 16  #: concurrent uploads
    downloads: core.Positive = 16  #: concurrent downloads
    http_connections: core.Positive = 200  #: open HTTP connections, all services together
    max_claims: core.Positive = 25  #: crash-loop guard: claims of one job without progress
    rescan_s: float = pydantic.Field(default=30.0, ge=0.5)  #: periodic rescan, the safety net

    @pydantic.model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any, info: pydantic.ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        if "workers" in data:
            raise core.key_error("workers", "was renamed: use daemon.executors")
        data = dict(data)
        base = core.base_path(info)
        if base is not None:
            data.setdefault("state_dir", base / "state")
        state_dir = core.resolve(data.get("state_dir"), base)
        if isinstance(state_dir, Path):
            data.setdefault("spool_dir", state_dir / "spool")
        return data

    @pydantic.model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> DaemonConfig:
        if self.heartbeat_s >= self.lease_s:
            raise core.key_error("heartbeat_s", "must be shorter than lease_s")
        return self


class Settings(core.Model):
    path: Path | None = None
    daemon: DaemonConfig
    database: DatabaseConfig = DatabaseConfig()
    storage: StorageConfig
    http: HttpConfig = HttpConfig()
    services: dict[str, kinds.ServiceConfig]
    watches: Annotated[tuple[WatchConfig, ...], pydantic.Field(strict=False, alias="watch")] = ()

    _DIRS: ClassVar[tuple[str, ...]] = ("output_dir", "archive_dir", "failed_dir")

    def service(self, name: str) -> kinds.ServiceConfig:
        try:
            return self.services[name]
        except KeyError:
            raise errors.ConfigError("services", f"no service named {name!r}") from None

    def bes_service(self, name: str) -> kinds.BesService:
        svc = self.service(name)
        if not isinstance(svc, kinds.BesService):
            raise errors.ConfigError(f"services.{name}.kind", f'is "{svc.kind}", not "bes"')
        return svc

    @pydantic.model_validator(mode="before")
    @classmethod
    def _fill_in(cls, data: Any, info: pydantic.ValidationInfo) -> Any:
        """Defaults that depend on other tables: a service's folders live under the daemon's
        state_dir, a watch is named after its folder."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for table in ("daemon", "database", "storage"):  # validated, so their defaults core.resolve
            data.setdefault(table, {})
        services = data.get("services")
        if not services:
            raise core.key_error("services", "at least one [services.NAME] table is required")
        base = core.base_path(info)
        daemon = data.get("daemon", {})
        state_dir = core.resolve(daemon.get("state_dir", "state"), base) if isinstance(
            daemon, dict) else None
        if isinstance(services, dict):
            filled: dict[Any, Any] = {}
            for name, raw in services.items():
                if isinstance(raw, dict):
                    if "name" in raw:
                        raise core.key_error(f"services.{name}.name", "unknown key")
                    raw = {"name": str(name), **raw}
                    if isinstance(state_dir, Path):
                        for key, sub in (("output_dir", "results"), ("archive_dir", "archive"),
                                         ("failed_dir", "failed")):
                            raw.setdefault(key, state_dir / sub / str(name))
                filled[name] = raw
            data["services"] = filled
        watches = data.get("watch")
        if isinstance(watches, list):
            named = []
            for i, w in enumerate(watches):
                if isinstance(w, dict) and "name" not in w:
                    folder = w.get("folder")
                    name = Path(folder).name if isinstance(folder, str) else ""
                    w = {**w, "name": name or f"watch{i}"}
                named.append(w)
            data["watch"] = named
        return data

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Settings:
        for i, w in enumerate(self.watches):
            if w.service not in self.services:
                raise core.key_error(f"watch[{i}].service", f"no service named {w.service!r}")
        names = [w.name for w in self.watches]
        for n in names:
            if names.count(n) > 1:
                raise core.key_error("watch.name", f"{n!r} is used twice")
        folders = [w.folder.resolve() for w in self.watches]
        for j, folder in enumerate(folders):
            if folder in folders[:j]:
                raise core.key_error(f"watch[{j}].folder", f"{folder} is already watched by "
                                                       f"watch[{folders.index(folder)}]")
        dirs = [(f"daemon.{k}", getattr(self.daemon, k)) for k in ("state_dir", "spool_dir")]
        dirs += [(f"services.{n}.{k}", getattr(s, k)) for n, s in self.services.items()
                 for k in self._DIRS]
        dirs += [(f"watch[{i}].{k}", getattr(w, k)) for i, w in enumerate(self.watches)
                 for k in self._DIRS]
        for key, d in dirs:
            resolved = d.resolve()
            for i, folder in enumerate(folders):
                if resolved == folder or resolved.is_relative_to(folder):
                    raise core.key_error(key, f"{d} is inside the watched folder {folder} "
                                          f"(watch[{i}]): its files would be taken as inputs")
        if self.storage.account_url is not None:
            for n, s in self.services.items():
                if s.kind == "bes":
                    raise core.key_error(
                        "storage.account_url", f"services.{n} is a classic BES service, which "
                        "needs a storage connection string (Entra ID storage is for batch "
                        "endpoints)")
        return self
