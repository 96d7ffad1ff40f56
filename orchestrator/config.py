"""Settings: one TOML file plus secrets from the environment or files, validated by pydantic.

Every problem raises `errors.ConfigError(key, problem)` naming the dotted key, so the CLI can
print one line and exit 78. Secrets are never accepted inline: a key `api_key` is given as
`api_key_env` (an environment variable), `api_key_file` (a file) or `api_key_credential`
(a systemd `LoadCredential=` name, read from `$CREDENTIALS_DIRECTORY`). Every key is documented
in config/example.toml.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
import typing
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pydantic
import pydantic_core
import sqlalchemy.engine
import sqlalchemy.exc
from pydantic_core import core_schema

from orchestrator import errors
from orchestrator.storage import naming

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///state.db"
DEFAULT_CONTAINER = "bes-orchestrator"
DEFAULT_SETTLE_S = 2.0
DEFAULT_LEASE_S = 30.0
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_MAX_IN_FLIGHT = 20
DEFAULT_JOB_TIMEOUT_S = 24 * 3600.0
DEFAULT_OUTPUT_EXTENSION = ".csv"
DEFAULT_HTTP_LISTEN = "127.0.0.1:9464"
#: Text in a failed BES job's Details that means the environment failed, not the input: such
#: a job is submitted again (up to max_resubmits) instead of failing. Case-insensitive.
DEFAULT_RESUBMIT_ON = (
    "cannot reach storage",  # the emulator, storage unreachable while the job ran
    "Unable to connect to the remote server",  # Azure ML classic, storage or network down
    "The remote server returned an error: (503)",
    "The remote server returned an error: (500)",
    "Operation could not be completed within the specified time",  # storage timeout
)
DEFAULT_MAX_RESUBMITS = 3
KINDS = ("bes", "rrs", "batch_endpoint")


class Secret:
    """A string that never shows itself in repr/str, so it cannot leak into a log by accident.

    A secret left unread (`load(..., secrets=False)`, for commands that only read the database)
    raises a ConfigError naming its key when something asks for its value."""

    __slots__ = ("_absent", "_unread_key", "_value")

    def __init__(self, value: str) -> None:
        self._value = value
        self._unread_key = ""
        self._absent = ""

    @classmethod
    def unread(cls, key: str) -> Secret:
        s = cls("")
        s._unread_key = key
        return s

    @classmethod
    def absent(cls, key: str, why: str) -> Secret:
        """Stands for a secret this configuration does without (e.g. no storage key with
        Entra ID): asking for its value is a bug that names the key."""
        s = cls.unread(key)
        s._absent = why
        return s

    @property
    def is_read(self) -> bool:
        return not self._unread_key

    @property
    def is_absent(self) -> bool:
        return bool(self._absent)

    def get(self) -> str:
        if self._unread_key:
            raise errors.ConfigError(self._unread_key, self._absent or
                                     "was not read (this command runs without secrets)")
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (other._value, other._unread_key) == (
            self._value, self._unread_key)

    def __hash__(self) -> int:
        return hash(self._value)

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: pydantic.GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        # Only ever built by the secret-forms validator (or by code): never from file text.
        return core_schema.is_instance_schema(cls)


# --------------------------------------------------------------------------------------------
# Field types and the shared machinery


def _key_error(key: str, problem: str) -> pydantic_core.PydanticCustomError:
    """An error about `key` below the model being validated (turned into `a.b.key: problem`)."""
    return pydantic_core.PydanticCustomError("config_key", "{problem}", {"key": key,
                                                                         "problem": problem})


def _resolve(value: Any, base: Path | None) -> Any:
    """A path from the file: ~ expanded, relative to the file's folder. Non-paths pass through
    unchanged, for the field's own validation to refuse."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        return value
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() or base is None else base / p


def _base(info: pydantic.ValidationInfo) -> Path | None:
    ctx = info.context or {}
    base = ctx.get("base")
    return base if isinstance(base, Path) else None


def _to_path(value: Any, info: pydantic.ValidationInfo) -> Path:
    value = _resolve(value, _base(info))
    if not isinstance(value, Path):
        raise ValueError("must be a path")
    return value


def _check_http_url(value: str) -> str:
    """An http(s) URL with a host: anything else can never be reached, so it is refused here
    instead of being retried forever."""
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError:
        raise ValueError("is not a URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host")
    return value


_CONTAINER_RE = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")


def _check_container(value: str) -> str:
    if not _CONTAINER_RE.fullmatch(value):
        raise ValueError("is not a valid container name: 3-63 characters, lowercase letters, "
                         "digits and single hyphens, starting and ending with a letter or digit")
    return value


def _check_file_name(value: str) -> str:
    if "/" in value or "\\" in value or value.startswith(".") or value in ("", ".."):
        raise ValueError("is not a usable file name")
    return value


_WORKSPACE_ID_RE = re.compile(
    r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/"
    r"Microsoft\.MachineLearningServices/workspaces/[^/]+", re.IGNORECASE)


def _check_workspace_id(value: str) -> str:
    if not _WORKSPACE_ID_RE.fullmatch(value):
        raise ValueError("must be the workspace's ARM id: /subscriptions/<id>/resourceGroups/"
                         "<group>/providers/Microsoft.MachineLearningServices/workspaces/<name>")
    return value


def _str_map(value: Any) -> Any:
    """A table of strings; numbers are accepted and sent as their text."""
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise _key_error(str(k), "must be a string or a number")
        out[str(k)] = str(v)
    return out


ConfigPath = Annotated[Path, pydantic.BeforeValidator(_to_path)]
Text = Annotated[str, pydantic.Field(min_length=1)]
WebUrl = Annotated[str, pydantic.Field(min_length=1), pydantic.AfterValidator(_check_http_url)]
ContainerName = Annotated[str, pydantic.AfterValidator(_check_container)]
FileName = Annotated[str, pydantic.Field(min_length=1), pydantic.AfterValidator(_check_file_name)]
StrMap = Annotated[dict[str, str], pydantic.BeforeValidator(_str_map)]
Positive = Annotated[int, pydantic.Field(ge=1)]


def _is_secret(annotation: Any) -> bool:
    return annotation is Secret or Secret in typing.get_args(annotation)


def _read_env(key: str, var: Any) -> str:
    if not isinstance(var, str) or not var:
        raise _key_error(key, "must name an environment variable")
    value = os.environ.get(var)
    if not value:
        raise _key_error(key, f"environment variable {var} is not set")
    return value.strip()


def _read_file(key: str, path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise _key_error(key, "must name a file")
    try:
        value = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise _key_error(key, f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise _key_error(key, f"{path} is empty")
    return value


def _read_credential(key: str, name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise _key_error(key, "must name a credential")
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not creds:
        raise _key_error(key, "CREDENTIALS_DIRECTORY is not set")
    return _read_file(key, str(Path(creds) / name))


_READERS = {"env": _read_env, "file": _read_file, "credential": _read_credential}


class _Model(pydantic.BaseModel):
    """A config table: unknown keys refused, numbers not taken from strings, frozen."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _secret_forms(cls, data: Any, info: pydantic.ValidationInfo) -> Any:
        """The one reader of secrets: each field typed Secret is given in the file as exactly one
        of NAME_env / NAME_file / NAME_credential, never as NAME itself."""
        if not isinstance(data, dict):
            return data
        read = (info.context or {}).get("secrets", True)
        data = dict(data)
        for name, field in cls.model_fields.items():
            if not _is_secret(field.annotation):
                continue
            forms = [f for f in _READERS if f"{name}_{f}" in data]
            if name in data and not isinstance(data[name], Secret):
                raise _key_error(name, f"secrets are not allowed in the file; use {name}_env,"
                                       f" {name}_file or {name}_credential")
            if len(forms) > 1:
                given = ", ".join(f"{name}_{f}" for f in forms)
                raise _key_error(f"{name}_{forms[1]}", f"give only one of {given}")
            if not forms:
                if field.is_required() and name not in data:
                    raise _key_error(f"{name}_env", "is required (or _file/_credential)")
                continue
            key = f"{name}_{forms[0]}"
            raw = data.pop(key)
            # An unread secret knows its key; `parse` prefixes it with the table's.
            data[name] = Secret(_READERS[forms[0]](key, raw)) if read else Secret.unread(key)
        return data


# --------------------------------------------------------------------------------------------
# Sections


class PollPolicy(_Model):
    """Exponential backoff for status polls: initial, ×multiplier each poll, capped, jittered.

    The defaults poll a 120 s job 14 times and see its end within 3 % of its run time
    (bench/polls.py); a steeper multiplier saves calls but sees long jobs' ends later."""

    initial_s: float = pydantic.Field(default=5.0, ge=0.01)
    multiplier: float = pydantic.Field(default=1.1, ge=1.0)
    max_s: float = pydantic.Field(default=30.0, ge=0.01)
    #: ± fraction of the delay, so thousands of jobs do not poll in step
    jitter: float = pydantic.Field(default=0.1, ge=0.0, lt=1.0)


class RetryPolicy(_Model):
    """Backoff for transient errors (5xx, timeouts, dropped connections, storage down)."""

    initial_s: float = pydantic.Field(default=1.0, ge=0.01)
    multiplier: float = pydantic.Field(default=2.0, ge=1.0)
    max_s: float = pydantic.Field(default=60.0, ge=0.01)
    max_attempts: int = pydantic.Field(default=0, ge=0)  #: 0: retry transient errors forever


CredentialType = Literal["default", "managed_identity", "client_secret", "azure_cli",
                         "workload_identity", "environment"]


class CredentialConfig(_Model):
    """Which azure-identity credential gets Entra ID tokens, and its options."""

    type: CredentialType = "default"
    client_id: Text | None = None  #: a user-assigned identity's or an app registration's id
    tenant_id: Text | None = None
    client_secret: Secret | None = None  #: type "client_secret" only
    token_file_path: ConfigPath | None = None  #: type "workload_identity" only
    authority: Text | None = None  #: e.g. login.microsoftonline.us; default: public cloud

    @pydantic.model_validator(mode="after")
    def _options_fit_type(self) -> CredentialConfig:
        if self.type == "client_secret":
            for key in ("tenant_id", "client_id"):
                if getattr(self, key) is None:
                    raise _key_error(key, 'is required with type = "client_secret"')
            if self.client_secret is None:
                raise _key_error("client_secret_env", 'is required with type = "client_secret"'
                                                      " (or _file/_credential)")
        elif self.client_secret is not None:
            raise _key_error("client_secret", 'is only used with type = "client_secret"')
        if self.token_file_path is not None and self.type != "workload_identity":
            raise _key_error("token_file_path", 'is only used with type = "workload_identity"')
        if self.type in ("environment", "azure_cli") and self.client_id is not None:
            raise _key_error("client_id", f'is not used with type = "{self.type}"')
        return self


class ServiceBase(_Model):
    """What every backend has: limits, timeouts, poll and retry policies, result folders."""

    name: Text
    kind: str
    max_in_flight: Positive = DEFAULT_MAX_IN_FLIGHT  #: remote jobs submitted and not yet ended
    job_timeout_s: float = pydantic.Field(default=DEFAULT_JOB_TIMEOUT_S, ge=1.0)
    request_timeout_s: float = pydantic.Field(default=60.0, ge=0.1)  #: one HTTP call
    poll: PollPolicy = PollPolicy()
    retry: RetryPolicy = RetryPolicy()
    #: A remote job that fails with one of these in its details failed because of its
    #: environment, not its input: it is submitted again, up to max_resubmits times.
    resubmit_on: Annotated[tuple[Text, ...], pydantic.Field(strict=False)] = DEFAULT_RESUBMIT_ON
    max_resubmits: int = pydantic.Field(default=DEFAULT_MAX_RESUBMITS, ge=0)
    #: Where results of queue-table jobs for this service go (watches name their own).
    output_dir: ConfigPath
    archive_dir: ConfigPath
    failed_dir: ConfigPath


def _outputs(value: Any) -> Any:
    if isinstance(value, list):
        value = {str(n): DEFAULT_OUTPUT_EXTENSION for n in value}
    if not isinstance(value, dict) or not value:
        raise ValueError("must be a table of output name = extension")
    out: dict[str, str] = {}
    for n, ext in value.items():
        if not isinstance(ext, str) or ext.lower() not in naming.OUTPUT_EXTENSIONS:
            raise _key_error(str(n), f"extension must be one of {naming.OUTPUT_EXTENSIONS}")
        if not str(n) or "/" in str(n) or "\\" in str(n) or str(n).startswith("."):
            raise _key_error(str(n), "is not a usable output name")
        out[str(n)] = ext.lower()
    return out


class BesService(ServiceBase):
    """A classic Azure ML web service driven through its batch execution service (BES)."""

    kind: Literal["bes"] = "bes"
    base_url: WebUrl  #: up to and excluding /workspaces/…, or an APIM gateway base
    workspace: Text
    service: Text
    api_key: Secret
    apim_key: Secret | None = None
    input_name: Text = "input1"
    #: Other inputs the service needs, bound to fixed blobs: name -> "container/blob.csv".
    extra_inputs: StrMap = {}
    #: Output name -> extension of the result file and blob.
    outputs: Annotated[dict[str, str], pydantic.BeforeValidator(_outputs)] = {
        "output1": DEFAULT_OUTPUT_EXTENSION}
    global_parameters: StrMap = {}

    @property
    def jobs_url(self) -> str:
        return (
            f"{self.base_url.rstrip('/')}/workspaces/{self.workspace}/services/{self.service}/jobs"
        )


class RrsService(ServiceBase):
    """The same web service's request-response endpoint: small files only, no blob storage."""

    kind: Literal["rrs"] = "rrs"
    #: Either base_url + workspace + service (as for BES), or url: the full execute URL.
    base_url: WebUrl | None = None
    workspace: Text | None = None
    service: Text | None = None
    url: WebUrl | None = None
    api_key: Secret
    apim_key: Secret | None = None
    input_name: Text = "input1"
    output_name: FileName = "output1"
    global_parameters: StrMap = {}
    #: A file over either limit fails, telling the user to use kind = "bes".
    max_rows: Positive = 1000
    max_bytes: Positive = 1024 * 1024

    @pydantic.model_validator(mode="after")
    def _one_address(self) -> RrsService:
        parts = {"base_url": self.base_url, "workspace": self.workspace, "service": self.service}
        if self.url is not None:
            for key, value in parts.items():
                if value is not None:
                    raise _key_error(key, "give either url or base_url, workspace and service")
        else:
            for key, value in parts.items():
                if value is None:
                    raise _key_error(key, "is required (or url: the full execute URL)")
        return self

    @property
    def execute_url(self) -> str:
        """Without its query: the client adds api-version=2.0&details=true."""
        if self.url is not None:
            return self.url.split("?", 1)[0]
        assert self.base_url is not None
        return (f"{self.base_url.rstrip('/')}/workspaces/{self.workspace}/services/"
                f"{self.service}/execute")

    @property
    def outputs(self) -> dict[str, str]:
        return {self.output_name: DEFAULT_OUTPUT_EXTENSION}


class BatchEndpointService(ServiceBase):
    """An Azure Machine Learning batch endpoint: invoke on its scoring URI, control via ARM."""

    kind: Literal["batch_endpoint"] = "batch_endpoint"
    scoring_uri: WebUrl
    deployment: Text | None = None  #: default: the endpoint's default deployment
    workspace_id: Annotated[str, pydantic.AfterValidator(_check_workspace_id)]
    arm_url: WebUrl = "https://management.azure.com"
    api_version: Text = "2024-04-01"
    datastore: Text = "workspaceblobstore"  #: a Blob datastore on the [storage] account
    path_prefix: Text = "bes-orchestrator"  #: <prefix>/<job id>/<attempt>/in|out/ in it
    input_name: Text = "input_data"
    output_name: FileName = "score"
    output_file: FileName = "predictions.csv"
    mini_batch_size: Positive | None = None
    instance_count: Positive | None = None
    #: Failed mini-batches tolerated; -1: any number.
    error_threshold: int | None = pydantic.Field(default=None, ge=-1)
    max_retries: int | None = pydantic.Field(default=None, ge=0)
    retry_timeout_s: Positive | None = None
    #: ARM reads per second shared by every batch-endpoint service of one subscription.
    arm_reads_per_s: float = pydantic.Field(default=20.0, gt=0.0)
    credential: CredentialConfig = CredentialConfig()

    @property
    def subscription_id(self) -> str:
        return self.workspace_id.split("/")[2]

    @property
    def workspace_url(self) -> str:
        """The workspace on ARM, without a query: `{workspace_url}/jobs/{name}?api-version=…`."""
        return f"{self.arm_url.rstrip('/')}{self.workspace_id}"

    @property
    def outputs(self) -> dict[str, str]:
        return {self.output_name: Path(self.output_file).suffix.lower()}


def _service_kind(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("kind", "bes")
    return getattr(value, "kind", None)


ServiceConfig = Annotated[
    Annotated[BesService, pydantic.Tag("bes")]
    | Annotated[RrsService, pydantic.Tag("rrs")]
    | Annotated[BatchEndpointService, pydantic.Tag("batch_endpoint")],
    pydantic.Discriminator(_service_kind),
]


class WatchConfig(_Model):
    name: Text
    folder: ConfigPath
    pattern: Text = "*.csv"
    case_sensitive: bool = False  #: whether pattern tells *.csv from *.CSV
    service: Text
    output_dir: ConfigPath
    archive_dir: ConfigPath
    failed_dir: ConfigPath
    settle_s: float = pydantic.Field(default=DEFAULT_SETTLE_S, ge=0.0)
    follow_symlinks: bool = False
    create: bool = False  #: create a missing folder instead of refusing the configuration

    @pydantic.model_validator(mode="before")
    @classmethod
    def _default_dirs(cls, data: Any, info: pydantic.ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        folder = _resolve(data.get("folder"), _base(info))
        if isinstance(folder, Path):
            data = dict(data)
            for key, sub in (("output_dir", "results"), ("archive_dir", "archive"),
                             ("failed_dir", "failed")):
                data.setdefault(key, folder.parent / sub)
        return data


class StorageConfig(_Model):
    """The blob account inputs and outputs go through: a connection string, or Entra ID."""

    #: Absent (a placeholder whose value is refused) when account_url is used.
    connection_string: Secret = Secret.absent(
        "storage.connection_string", "is not set: [storage] uses account_url (Entra ID)")
    account_url: WebUrl | None = None  #: https://<account>.blob.core.windows.net
    credential: CredentialConfig = CredentialConfig()  #: with account_url
    container: ContainerName = DEFAULT_CONTAINER
    #: How blobs are referenced in the submit body: "connection_string" or "sas".
    reference: Literal["connection_string", "sas"] = "connection_string"
    sas_lifetime_s: float = pydantic.Field(default=24 * 3600.0, ge=60.0)
    delete_blobs_after_success: bool = False
    upload_chunk_bytes: int = pydantic.Field(default=4 * 1024 * 1024, ge=64 * 1024)
    upload_parallelism: Positive = 4
    #: Hosts besides the storage account's own that `Results` may point at.
    allowed_result_hosts: Annotated[tuple[Text, ...], pydantic.Field(strict=False)] = ()

    @pydantic.model_validator(mode="after")
    def _one_way_in(self) -> StorageConfig:
        absent = self.connection_string.is_absent
        if absent and self.account_url is None:
            raise _key_error("connection_string_env",
                             "is required (or _file/_credential), or account_url with Entra ID")
        if not absent and self.account_url is not None:
            raise _key_error("account_url", "give either a connection string or account_url")
        if self.account_url is None and "credential" in self.model_fields_set:
            raise _key_error("credential", "is only used with account_url")
        return self


_PASSWORD_PARAMS = ("password", "passwd", "pwd", "pass")


def _database_url(value: str, info: pydantic.ValidationInfo) -> str:
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
    base = _base(info)
    if url.drivername.startswith("sqlite") and url.database and url.database != ":memory:":
        db = Path(url.database)
        if not db.is_absolute() and base is not None:
            url = url.set(database=str((base / db).resolve()))
    return url.render_as_string(hide_password=False)


class DatabaseConfig(_Model):
    url: Annotated[str, pydantic.AfterValidator(_database_url)] = pydantic.Field(
        default=DEFAULT_DATABASE_URL, validate_default=True)
    password: Secret | None = None


class HttpConfig(_Model):
    """The metrics, health and status endpoint."""

    listen: str = DEFAULT_HTTP_LISTEN  #: host:port; "" turns the endpoint off
    token: Secret | None = None  #: required unless listen is a loopback address
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
            raise _key_error("listen", f"{self.host or '*'} is not a loopback address: give "
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


class DaemonConfig(_Model):
    state_dir: ConfigPath
    spool_dir: ConfigPath
    worker_id: Text = pydantic.Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    lease_s: float = pydantic.Field(default=DEFAULT_LEASE_S, ge=1.0)
    heartbeat_s: float = pydantic.Field(default=DEFAULT_HEARTBEAT_S, ge=0.1)
    executors: Positive = 100  #: step executors; a waiting job holds none
    max_jobs_held: Positive = 20_000  #: jobs one daemon keeps leased at once
    uploads: Positive = 16  #: concurrent uploads
    downloads: Positive = 16  #: concurrent downloads
    http_connections: Positive = 200  #: open HTTP connections, all services together
    max_claims: Positive = 25  #: crash-loop guard: claims of one job without progress
    rescan_s: float = pydantic.Field(default=30.0, ge=0.5)  #: periodic rescan, the safety net

    @pydantic.model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any, info: pydantic.ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        if "workers" in data:
            raise _key_error("workers", "was renamed: use daemon.executors")
        data = dict(data)
        base = _base(info)
        if base is not None:
            data.setdefault("state_dir", base / "state")
        state_dir = _resolve(data.get("state_dir"), base)
        if isinstance(state_dir, Path):
            data.setdefault("spool_dir", state_dir / "spool")
        return data

    @pydantic.model_validator(mode="after")
    def _heartbeat_inside_lease(self) -> DaemonConfig:
        if self.heartbeat_s >= self.lease_s:
            raise _key_error("heartbeat_s", "must be shorter than lease_s")
        return self


class Settings(_Model):
    path: Path | None = None
    daemon: DaemonConfig
    database: DatabaseConfig = DatabaseConfig()
    storage: StorageConfig
    http: HttpConfig = HttpConfig()
    services: dict[str, ServiceConfig]
    watches: Annotated[tuple[WatchConfig, ...], pydantic.Field(strict=False, alias="watch")] = ()

    _DIRS: ClassVar[tuple[str, ...]] = ("output_dir", "archive_dir", "failed_dir")

    def service(self, name: str) -> ServiceConfig:
        try:
            return self.services[name]
        except KeyError:
            raise errors.ConfigError("services", f"no service named {name!r}") from None

    def bes_service(self, name: str) -> BesService:
        svc = self.service(name)
        if not isinstance(svc, BesService):
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
        for table in ("daemon", "database", "storage"):  # validated, so their defaults resolve
            data.setdefault(table, {})
        services = data.get("services")
        if not services:
            raise _key_error("services", "at least one [services.NAME] table is required")
        base = _base(info)
        daemon = data.get("daemon", {})
        state_dir = _resolve(daemon.get("state_dir", "state"), base) if isinstance(
            daemon, dict) else None
        if isinstance(services, dict):
            filled: dict[Any, Any] = {}
            for name, raw in services.items():
                if isinstance(raw, dict):
                    if "name" in raw:
                        raise _key_error(f"services.{name}.name", "unknown key")
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
                if isinstance(w, dict) and "name" not in w and isinstance(w.get("folder"), str):
                    w = {**w, "name": Path(w["folder"]).name or f"watch{i}"}
                named.append(w)
            data["watch"] = named
        return data

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Settings:
        for i, w in enumerate(self.watches):
            if w.service not in self.services:
                raise _key_error(f"watch[{i}].service", f"no service named {w.service!r}")
        names = [w.name for w in self.watches]
        for n in names:
            if names.count(n) > 1:
                raise _key_error("watch.name", f"{n!r} is used twice")
        folders = [w.folder.resolve() for w in self.watches]
        for j, folder in enumerate(folders):
            if folder in folders[:j]:
                raise _key_error(f"watch[{j}].folder", f"{folder} is already watched by "
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
                    raise _key_error(key, f"{d} is inside the watched folder {folder} "
                                          f"(watch[{i}]): its files would be taken as inputs")
        if self.storage.account_url is not None and self.storage.reference == "connection_string":
            for n, s in self.services.items():
                if s.kind == "bes":
                    raise _key_error("storage.reference", f'must be "sas" with account_url: '
                                                          f"services.{n} is a BES service")
        return self


# --------------------------------------------------------------------------------------------
# Loading


_MESSAGES = {
    "missing": "is required",
    "extra_forbidden": "unknown key",
    "float_type": "must be a number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must be a non-empty string",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "union_tag_not_found": "must be a table",
    "is_instance_of": "must be given as a secret (NAME_env, NAME_file or NAME_credential)",
}


def _error(exc: pydantic.ValidationError) -> errors.ConfigError:
    """The first problem, as `dotted.key: problem`. Never the offending value: it may be a
    secret."""
    err = exc.errors(include_url=False, include_input=False)[0]
    loc: list[str | int] = list(err["loc"])
    if len(loc) > 2 and loc[0] == "services" and loc[2] in KINDS:
        del loc[2]  # the union's tag, not a key in the file
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind == "config_key":
        loc.append(str(ctx["key"]))
        problem = str(ctx["problem"])
    elif kind == "union_tag_invalid":
        loc.append("kind")
        problem = "must be one of " + ", ".join(f'"{k}"' for k in KINDS)
    elif kind == "value_error":
        problem = str(ctx.get("error", err["msg"]))
    elif kind == "literal_error":
        problem = "must be " + str(ctx.get("expected", "")).replace("'", '"')
    elif kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        words = {"greater_than_equal": "at least", "greater_than": "more than",
                 "less_than": "below", "less_than_equal": "at most"}[kind]
        bound = next(iter(ctx.values()))
        problem = f"must be {words} {bound:g}" if isinstance(bound, float) else (
            f"must be {words} {bound}")
    elif loc == ["watch"] and kind in ("tuple_type", "list_type"):
        problem = "must be an array of tables: [[watch]]"
    else:
        problem = _MESSAGES.get(kind, err["msg"])
    return errors.ConfigError(_dotted(loc), problem)


def _dotted(loc: list[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def parse(
    data: dict[str, Any], *, base: Path, path: Path | None = None, secrets: bool = True
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
        raise _error(exc) from None
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
    if isinstance(value, Secret) and not value.is_read and not value.is_absent:
        value._unread_key = f"{prefix.rpartition('.')[0]}.{value._unread_key}".lstrip(".")
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
    if isinstance(value, Secret):
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
        if isinstance(value, Secret):
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
