"""Settings: one TOML file plus secrets from the environment or files.

Every problem raises `errors.ConfigError(key, problem)` naming the dotted key, so the CLI can
print one line and exit 78. Secrets are never accepted inline: a key `api_key` is given as
`api_key_env` (an environment variable), `api_key_file` (a file) or `api_key_credential`
(a systemd `LoadCredential=` name, read from `$CREDENTIALS_DIRECTORY`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator import errors

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///state.db"
DEFAULT_CONTAINER = "bes-orchestrator"
DEFAULT_SETTLE_S = 2.0
DEFAULT_LEASE_S = 30.0
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_MAX_IN_FLIGHT = 20
DEFAULT_JOB_TIMEOUT_S = 24 * 3600.0
DEFAULT_OUTPUT_EXTENSION = ".csv"
OUTPUT_EXTENSIONS = (".csv", ".tsv", ".arff", ".ilearner")
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


class Secret:
    """A string that never shows itself in repr/str, so it cannot leak into a log by accident."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PollPolicy:
    """Exponential backoff for status polls: initial, ×multiplier each poll, capped, jittered.

    The defaults poll a 120 s job 14 times and see its end within 3 % of its run time
    (bench/polls.py); a steeper multiplier saves calls but sees long jobs' ends later."""

    initial_s: float = 5.0
    multiplier: float = 1.1
    max_s: float = 30.0
    jitter: float = 0.1  #: ± fraction of the delay, so thousands of jobs do not poll in step


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Backoff for transient errors (5xx, timeouts, dropped connections, storage down)."""

    initial_s: float = 1.0
    multiplier: float = 2.0
    max_s: float = 60.0
    max_attempts: int = 0  #: 0: retry transient errors forever (they never fail a job)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServiceConfig:
    name: str
    base_url: str  #: up to and excluding /workspaces/…, or an APIM gateway base
    workspace: str
    service: str
    api_key: Secret
    apim_key: Secret | None = None
    input_name: str = "input1"
    #: Other inputs the service needs, bound to fixed blobs: name -> "container/blob.csv".
    extra_inputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Output name -> extension of the result file and blob.
    outputs: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"output1": DEFAULT_OUTPUT_EXTENSION}
    )
    global_parameters: Mapping[str, str] = dataclasses.field(default_factory=dict)
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    job_timeout_s: float = DEFAULT_JOB_TIMEOUT_S
    request_timeout_s: float = 60.0
    resubmit_on: tuple[str, ...] = DEFAULT_RESUBMIT_ON
    max_resubmits: int = DEFAULT_MAX_RESUBMITS
    poll: PollPolicy = dataclasses.field(default_factory=PollPolicy)
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    #: Where results of queue-table jobs for this service go (watches name their own).
    output_dir: Path
    archive_dir: Path
    failed_dir: Path

    @property
    def jobs_url(self) -> str:
        return (
            f"{self.base_url.rstrip('/')}/workspaces/{self.workspace}/services/{self.service}/jobs"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class WatchConfig:
    name: str
    folder: Path
    pattern: str = "*.csv"
    service: str
    output_dir: Path
    archive_dir: Path
    failed_dir: Path
    settle_s: float = DEFAULT_SETTLE_S
    follow_symlinks: bool = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class StorageConfig:
    connection_string: Secret
    container: str = DEFAULT_CONTAINER
    #: How blobs are referenced in the submit body: "connection_string" or "sas".
    reference: str = "connection_string"
    sas_lifetime_s: float = 24 * 3600.0
    delete_blobs_after_success: bool = False
    upload_chunk_bytes: int = 4 * 1024 * 1024
    upload_parallelism: int = 4
    #: Hosts besides the storage account's own that `Results` may point at.
    allowed_result_hosts: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatabaseConfig:
    url: str = DEFAULT_DATABASE_URL
    password: Secret | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    state_dir: Path
    spool_dir: Path
    worker_id: str
    lease_s: float = DEFAULT_LEASE_S
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    executors: int = 100  #: step executors; a waiting job holds none
    max_jobs_held: int = 20_000  #: jobs one daemon keeps leased at once
    uploads: int = 16  #: concurrent uploads
    downloads: int = 16  #: concurrent downloads
    http_connections: int = 200  #: open HTTP connections, all services together
    max_claims: int = 25  #: crash-loop guard: claims of one job without progress
    rescan_s: float = 30.0  #: periodic folder rescan, the safety net for missed events


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    path: Path | None
    daemon: DaemonConfig
    database: DatabaseConfig
    storage: StorageConfig
    services: Mapping[str, ServiceConfig]
    watches: tuple[WatchConfig, ...]

    def service(self, name: str) -> ServiceConfig:
        try:
            return self.services[name]
        except KeyError:
            raise errors.ConfigError("services", f"no service named {name!r}") from None


# --------------------------------------------------------------------------------------------
# Loading


class _Table:
    """A TOML table being read: tracks which keys were used so unknown keys are reported."""

    def __init__(self, data: Mapping[str, Any], prefix: str) -> None:
        if not isinstance(data, Mapping):
            raise errors.ConfigError(prefix, "must be a table")
        self.data = data
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def raw(self, name: str) -> Any:
        self.used.add(name)
        return self.data.get(name)

    def text(self, name: str, default: str | None = None) -> str:
        value = self.raw(name)
        if value is None:
            if default is None:
                raise errors.ConfigError(self.key(name), "is required")
            return default
        if not isinstance(value, str) or not value:
            raise errors.ConfigError(self.key(name), "must be a non-empty string")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise errors.ConfigError(self.key(name), "must be a number")
        if value < minimum:
            raise errors.ConfigError(self.key(name), f"must be at least {minimum:g}")
        return float(value)

    def whole(self, name: str, default: int, *, minimum: int = 1) -> int:
        value = self.raw(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise errors.ConfigError(self.key(name), "must be a whole number")
        if value < minimum:
            raise errors.ConfigError(self.key(name), f"must be at least {minimum}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise errors.ConfigError(self.key(name), "must be true or false")
        return value

    def table(self, name: str) -> _Table:
        value = self.raw(name)
        return _Table(value if value is not None else {}, self.key(name))

    def str_map(self, name: str) -> dict[str, str]:
        sub = self.table(name)
        out: dict[str, str] = {}
        for k, v in sub.data.items():
            if isinstance(v, bool) or not isinstance(v, str | int | float):
                raise errors.ConfigError(sub.key(k), "must be a string or a number")
            out[str(k)] = str(v)
        return out

    def path(self, name: str, base: Path, default: Path | None = None) -> Path:
        value = self.raw(name)
        if value is None:
            if default is None:
                raise errors.ConfigError(self.key(name), "is required")
            return default
        if not isinstance(value, str) or not value:
            raise errors.ConfigError(self.key(name), "must be a path")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else (base / p)

    def secret(self, name: str, *, required: bool = True) -> Secret | None:
        """`name_env`, `name_file` or `name_credential`; never `name` itself."""
        if self.raw(name) is not None:
            raise errors.ConfigError(
                self.key(name),
                f"secrets are not allowed in the file; use {name}_env, {name}_file"
                f" or {name}_credential",
            )
        env, file, cred = self.raw(f"{name}_env"), self.raw(f"{name}_file"), self.raw(
            f"{name}_credential"
        )
        given = [k for k, v in ((f"{name}_env", env), (f"{name}_file", file),
                                (f"{name}_credential", cred)) if v is not None]
        if len(given) > 1:
            raise errors.ConfigError(self.key(given[1]), f"give only one of {', '.join(given)}")
        if env is not None:
            return Secret(_read_env(self.key(f"{name}_env"), env))
        if file is not None:
            return Secret(_read_file(self.key(f"{name}_file"), file))
        if cred is not None:
            creds = os.environ.get("CREDENTIALS_DIRECTORY")
            if not creds:
                raise errors.ConfigError(
                    self.key(f"{name}_credential"), "CREDENTIALS_DIRECTORY is not set"
                )
            return Secret(_read_file(self.key(f"{name}_credential"), str(Path(creds) / str(cred))))
        if required:
            raise errors.ConfigError(self.key(f"{name}_env"), "is required (or _file/_credential)")
        return None

    def check_unknown(self) -> None:
        for k in self.data:
            if k not in self.used:
                raise errors.ConfigError(self.key(str(k)), "unknown key")


def _read_env(key: str, var: Any) -> str:
    if not isinstance(var, str) or not var:
        raise errors.ConfigError(key, "must name an environment variable")
    value = os.environ.get(var)
    if not value:
        raise errors.ConfigError(key, f"environment variable {var} is not set")
    return value.strip()


def _read_file(key: str, path: Any) -> str:
    if not isinstance(path, str) or not path:
        raise errors.ConfigError(key, "must name a file")
    try:
        value = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise errors.ConfigError(key, f"cannot read {path}: {exc.strerror}") from None
    if not value:
        raise errors.ConfigError(key, f"{path} is empty")
    return value


def _poll_policy(t: _Table) -> PollPolicy:
    d = PollPolicy()
    p = PollPolicy(
        initial_s=t.number("initial_s", d.initial_s, minimum=0.01),
        multiplier=t.number("multiplier", d.multiplier, minimum=1.0),
        max_s=t.number("max_s", d.max_s, minimum=0.01),
        jitter=t.number("jitter", d.jitter),
    )
    if p.jitter >= 1:
        raise errors.ConfigError(t.key("jitter"), "must be below 1")
    t.check_unknown()
    return p


def _retry_policy(t: _Table) -> RetryPolicy:
    d = RetryPolicy()
    p = RetryPolicy(
        initial_s=t.number("initial_s", d.initial_s, minimum=0.01),
        multiplier=t.number("multiplier", d.multiplier, minimum=1.0),
        max_s=t.number("max_s", d.max_s, minimum=0.01),
        max_attempts=t.whole("max_attempts", d.max_attempts, minimum=0),
    )
    t.check_unknown()
    return p


def _outputs(t: _Table, name: str) -> dict[str, str]:
    raw = t.raw(name)
    key = t.key(name)
    if raw is None:
        return {"output1": DEFAULT_OUTPUT_EXTENSION}
    if isinstance(raw, list):
        raw = {str(n): DEFAULT_OUTPUT_EXTENSION for n in raw}
    if not isinstance(raw, Mapping) or not raw:
        raise errors.ConfigError(key, "must be a table of output name = extension")
    out: dict[str, str] = {}
    for n, ext in raw.items():
        if not isinstance(ext, str) or ext.lower() not in OUTPUT_EXTENSIONS:
            raise errors.ConfigError(f"{key}.{n}", f"extension must be one of {OUTPUT_EXTENSIONS}")
        if not str(n) or "/" in str(n) or "\\" in str(n) or str(n).startswith("."):
            raise errors.ConfigError(f"{key}.{n}", "is not a usable output name")
        out[str(n)] = ext.lower()
    return out


def _str_list(t: _Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = t.raw(name)
    if raw is None:
        return default
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise errors.ConfigError(t.key(name), "must be a list of non-empty strings")
    return tuple(raw)


def _service(name: str, t: _Table, base: Path, state_dir: Path) -> ServiceConfig:
    base_url = t.text("base_url")
    if not base_url.startswith(("http://", "https://")):
        raise errors.ConfigError(t.key("base_url"), "must start with http:// or https://")
    api_key = t.secret("api_key")
    assert api_key is not None
    svc = ServiceConfig(
        name=name,
        base_url=base_url,
        workspace=t.text("workspace"),
        service=t.text("service"),
        api_key=api_key,
        apim_key=t.secret("apim_key", required=False),
        input_name=t.text("input_name", "input1"),
        extra_inputs=t.str_map("extra_inputs"),
        outputs=_outputs(t, "outputs"),
        global_parameters=t.str_map("global_parameters"),
        max_in_flight=t.whole("max_in_flight", DEFAULT_MAX_IN_FLIGHT),
        job_timeout_s=t.number("job_timeout_s", DEFAULT_JOB_TIMEOUT_S, minimum=1.0),
        request_timeout_s=t.number("request_timeout_s", 60.0, minimum=0.1),
        resubmit_on=_str_list(t, "resubmit_on", DEFAULT_RESUBMIT_ON),
        max_resubmits=t.whole("max_resubmits", DEFAULT_MAX_RESUBMITS, minimum=0),
        poll=_poll_policy(t.table("poll")),
        retry=_retry_policy(t.table("retry")),
        output_dir=t.path("output_dir", base, state_dir / "results" / name),
        archive_dir=t.path("archive_dir", base, state_dir / "archive" / name),
        failed_dir=t.path("failed_dir", base, state_dir / "failed" / name),
    )
    t.check_unknown()
    return svc


def _watch(index: int, t: _Table, base: Path, services: Mapping[str, ServiceConfig]) -> WatchConfig:
    folder = t.path("folder", base)
    service = t.text("service")
    if service not in services:
        raise errors.ConfigError(t.key("service"), f"no service named {service!r}")
    parent = folder.parent
    w = WatchConfig(
        name=t.text("name", folder.name or f"watch{index}"),
        folder=folder,
        pattern=t.text("pattern", "*.csv"),
        service=service,
        output_dir=t.path("output_dir", base, parent / "results"),
        archive_dir=t.path("archive_dir", base, parent / "archive"),
        failed_dir=t.path("failed_dir", base, parent / "failed"),
        settle_s=t.number("settle_s", DEFAULT_SETTLE_S),
        follow_symlinks=t.flag("follow_symlinks", False),
    )
    t.check_unknown()
    return w


def _storage(t: _Table) -> StorageConfig:
    cs = t.secret("connection_string")
    assert cs is not None
    d = StorageConfig(connection_string=cs)
    reference = t.text("reference", d.reference)
    if reference not in ("connection_string", "sas"):
        raise errors.ConfigError(t.key("reference"), 'must be "connection_string" or "sas"')
    hosts = t.raw("allowed_result_hosts") or []
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise errors.ConfigError(t.key("allowed_result_hosts"), "must be a list of host names")
    s = StorageConfig(
        connection_string=cs,
        container=t.text("container", DEFAULT_CONTAINER),
        reference=reference,
        sas_lifetime_s=t.number("sas_lifetime_s", d.sas_lifetime_s, minimum=60.0),
        delete_blobs_after_success=t.flag("delete_blobs_after_success", False),
        upload_chunk_bytes=t.whole("upload_chunk_bytes", d.upload_chunk_bytes, minimum=64 * 1024),
        upload_parallelism=t.whole("upload_parallelism", d.upload_parallelism),
        allowed_result_hosts=tuple(hosts),
    )
    t.check_unknown()
    return s


def _database(t: _Table, base: Path) -> DatabaseConfig:
    url = t.text("url", DEFAULT_DATABASE_URL)
    if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        raise errors.ConfigError(
            t.key("url"), "must start with sqlite+aiosqlite:// or postgresql+asyncpg://"
        )
    if url.startswith("sqlite+aiosqlite:///") and not url.startswith("sqlite+aiosqlite:////"):
        rel = url.removeprefix("sqlite+aiosqlite:///")
        if rel and rel != ":memory:":
            url = f"sqlite+aiosqlite:///{(base / rel).resolve()}"
    if "@" in url.split("//", 1)[1].split("/", 1)[0] and ":" in url.split("//", 1)[1].split("@")[0]:
        raise errors.ConfigError(t.key("url"), "must not hold a password; use password_env")
    db = DatabaseConfig(url=url, password=t.secret("password", required=False))
    t.check_unknown()
    return db


def _daemon(t: _Table, base: Path) -> DaemonConfig:
    state_dir = t.path("state_dir", base, base / "state")
    d = DaemonConfig(state_dir=state_dir, spool_dir=state_dir, worker_id="")
    if "workers" in t.data:
        raise errors.ConfigError(t.key("workers"), "was renamed: use daemon.executors")
    worker_id = t.raw("worker_id") or f"{socket.gethostname()}-{os.getpid()}"
    daemon = DaemonConfig(
        state_dir=state_dir,
        spool_dir=t.path("spool_dir", base, state_dir / "spool"),
        worker_id=str(worker_id),
        lease_s=t.number("lease_s", d.lease_s, minimum=1.0),
        heartbeat_s=t.number("heartbeat_s", d.heartbeat_s, minimum=0.1),
        executors=t.whole("executors", d.executors),
        max_jobs_held=t.whole("max_jobs_held", d.max_jobs_held),
        uploads=t.whole("uploads", d.uploads),
        downloads=t.whole("downloads", d.downloads),
        http_connections=t.whole("http_connections", d.http_connections),
        max_claims=t.whole("max_claims", d.max_claims),
        rescan_s=t.number("rescan_s", d.rescan_s, minimum=0.5),
    )
    if daemon.heartbeat_s >= daemon.lease_s:
        raise errors.ConfigError(t.key("heartbeat_s"), "must be shorter than lease_s")
    t.check_unknown()
    return daemon


def parse(data: Mapping[str, Any], *, base: Path, path: Path | None = None) -> Settings:
    """Build Settings from parsed TOML. `base` resolves relative paths (the file's folder)."""
    root = _Table(data, "")
    daemon = _daemon(root.table("daemon"), base)
    database = _database(root.table("database"), base)
    storage = _storage(root.table("storage"))
    services_t = root.table("services")
    if not services_t.data:
        raise errors.ConfigError("services", "at least one [services.NAME] table is required")
    services = {
        str(n): _service(str(n), _Table(v, services_t.key(str(n))), base, daemon.state_dir)
        for n, v in services_t.data.items()
    }
    services_t.used.update(str(n) for n in services_t.data)
    raw_watches = root.raw("watch") or []
    if not isinstance(raw_watches, list):
        raise errors.ConfigError("watch", "must be an array of tables: [[watch]]")
    watches = tuple(
        _watch(i, _Table(w, f"watch[{i}]"), base, services) for i, w in enumerate(raw_watches)
    )
    names = [w.name for w in watches]
    for n in names:
        if names.count(n) > 1:
            raise errors.ConfigError("watch.name", f"{n!r} is used twice")
    root.check_unknown()
    return Settings(
        path=path, daemon=daemon, database=database, storage=storage,
        services=services, watches=watches,
    )


def load(path: Path) -> Settings:
    """Read and validate the TOML file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise errors.ConfigError(str(path), f"not valid TOML: {exc}") from None
    return parse(data, base=path.resolve().parent, path=path)


def redacted(settings: Settings) -> dict[str, Any]:
    """The resolved settings as plain data with every secret shown as '***'."""

    def conv(value: Any) -> Any:
        if isinstance(value, Secret):
            return "***"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: conv(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {str(k): conv(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [conv(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    out = conv(settings)
    assert isinstance(out, dict)
    return out
