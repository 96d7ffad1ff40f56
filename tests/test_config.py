"""The configuration: every problem is one line `config error: dotted.key: problem` (exit 78 at
the CLI), secrets come only from the environment, files or systemd credentials, and configs
that would loop at run time are refused before anything runs."""

from __future__ import annotations

import copy
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from orchestrator import config, errors
from tests import harness

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-0123456789abcdef"
CONN = "UseDevelopmentStorage=true"
PASSWORD = "s3cr3t-Pa55word"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_KEY", KEY)
    monkeypatch.setenv("T_STORAGE", CONN)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def base_data() -> dict[str, Any]:
    return {
        "daemon": {"state_dir": "state"},
        "storage": {"connection_string_env": "T_STORAGE"},
        "services": {"svc": {"base_url": "http://127.0.0.1:1", "workspace": "w",
                             "service": "s", "api_key_env": "T_KEY"}},
        "watch": [{"folder": "inbox", "service": "svc"}],
    }


def batch_endpoint(**kw: Any) -> dict[str, Any]:
    return {"kind": "batch_endpoint",
            "scoring_uri": "https://ep.westeurope.inference.ml.azure.com/jobs",
            "workspace_id": "/subscriptions/0000/resourceGroups/rg/providers/"
                            "Microsoft.MachineLearningServices/workspaces/ws", **kw}


def parse(tmp: Path, data: dict[str, Any], *, secrets: bool = True) -> config.Settings:
    (tmp / "inbox").mkdir(exist_ok=True)
    return config.parse(data, base=tmp, secrets=secrets)


def problem(tmp: Path, data: dict[str, Any], *, secrets: bool = True) -> str:
    with pytest.raises(errors.ConfigError) as caught:
        parse(tmp, data, secrets=secrets)
    text = str(caught.value)
    assert text.startswith("config error: ") and "\n" not in text
    return text


def changed(edit: dict[str, Any], data: dict[str, Any] | None = None) -> dict[str, Any]:
    """`data` with dotted keys set (`"services.svc.base_url": ...`); None deletes the key."""
    out = copy.deepcopy(data if data is not None else base_data())
    for dotted, value in edit.items():
        *parents, last = dotted.split(".")
        node: Any = out
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if value is None:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


# ---- what a valid file gives -------------------------------------------------------------


def test_defaults_and_resolved_paths(tmp_path: Path) -> None:
    s = parse(tmp_path, base_data())
    assert s.daemon.state_dir == tmp_path / "state"
    assert s.daemon.spool_dir == tmp_path / "state" / "spool"
    assert s.daemon.executors == 100
    assert s.database.url == f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    svc = s.service("svc")
    assert isinstance(svc, config.BesService) and svc.kind == "bes"
    assert svc.jobs_url == "http://127.0.0.1:1/workspaces/w/services/s/jobs"
    assert svc.api_key.get() == KEY and repr(svc.api_key) == "Secret('***')"
    assert svc.output_dir == tmp_path / "state" / "results" / "svc"
    assert dict(svc.outputs) == {"output1": ".csv"}
    [w] = s.watches
    assert (w.name, w.folder, w.output_dir) == ("inbox", tmp_path / "inbox", tmp_path / "results")
    assert (w.create, w.case_sensitive, w.pattern) == (False, False, "*.csv")
    assert (s.http.listen, s.http.host, s.http.port) == ("127.0.0.1:9464", "127.0.0.1", 9464)
    assert s.http.stuck_after_s == 3600
    assert s.bes_service("svc") is svc


def test_example_file_parses_and_documents_every_key(tmp_path: Path) -> None:
    """config/example.toml is the reference: it must parse, with every kind of service in it."""
    text = (ROOT / "config" / "example.toml").read_text()
    text = text.replace("/srv/bes", str(tmp_path)).replace("/var/lib/bes-orchestrator",
                                                           str(tmp_path / "state"))
    data = tomllib.loads(text)
    env = {"BES_STORAGE_CONNECTION_STRING": CONN, "BES_SENTIMENT_API_KEY": KEY,
           "BES_HTTP_TOKEN": "t" * 20}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        (tmp_path / "inbox").mkdir()
        s = config.parse(data, base=tmp_path)
    assert {svc.kind for svc in s.services.values()} == set(config.KINDS)
    # Every key a model has is named in the file (secrets by their _env form).
    documented = text
    models: list[type[config.core.Model]] = [
        config.DaemonConfig, config.DatabaseConfig, config.StorageConfig, config.HttpConfig,
        config.BesService, config.RrsService, config.BatchEndpointService, config.WatchConfig,
        config.PollPolicy, config.RetryPolicy, config.CredentialConfig]
    for model in models:
        for name, field in model.model_fields.items():
            if name == "name" and model is not config.WatchConfig:
                continue
            key = f"{name}_env" if config.core.is_secret(field.annotation) else name
            assert f"{key} =" in documented or f".{key}]" in documented, (model.__name__, key)


# ---- one line naming the key ---------------------------------------------------------------


@pytest.mark.parametrize(("edit", "expected"), [
    ({"bogus": {"key": 1}}, "config error: bogus: unknown key"),
    ({"daemon.lease_s": "30"}, "config error: daemon.lease_s: must be a number"),
    ({"daemon.executors": 0}, "config error: daemon.executors: must be at least 1"),
    ({"daemon.executors": 2.5}, "config error: daemon.executors: must be a whole number"),
    ({"daemon.heartbeat_s": 40}, "config error: daemon.heartbeat_s: must be shorter than lease_s"),
    ({"daemon.workers": 5}, "config error: daemon.workers: was renamed: use daemon.executors"),
    ({"services.svc.poll": {"jitter": 1}},
     "config error: services.svc.poll.jitter: must be below 1"),
    ({"services.svc.retry": {"oops": 1}}, "config error: services.svc.retry.oops: unknown key"),
    ({"services.svc.workspace": None}, "config error: services.svc.workspace: is required"),
    ({"services.svc.outputs": {"o1": ".exe"}}, "config error: services.svc.outputs.o1: extension"),
    ({"storage.reference": "url"},
     'config error: storage.reference: must be "connection_string" or "sas"'),
    ({"watch.0.follow_symlinks": "yes"},
     "config error: watch[0].follow_symlinks: must be true or false"),
    ({"watch.0.folder": 5}, "config error: watch[0].folder: must be a path"),
    ({"watch.0.service": "nope"}, "config error: watch[0].service: no service named 'nope'"),
    ({"watch": {"folder": "inbox"}}, "config error: watch: must be an array of tables: [[watch]]"),
    ({"services": {}}, "config error: services: at least one [services.NAME] table is required"),
    ({"services.svc.kind": "classic"},
     'config error: services.svc.kind: must be one of "bes", "rrs", "batch_endpoint"'),
])
def test_problems_name_their_key(tmp_path: Path, edit: dict[str, Any], expected: str) -> None:
    assert problem(tmp_path, changed(edit)).startswith(expected)


def test_missing_table_and_unreadable_file(tmp_path: Path) -> None:
    assert problem(tmp_path, changed({"storage": None})).startswith(
        "config error: storage.connection_string_env: is required")
    with pytest.raises(errors.ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")
    (tmp_path / "bad.toml").write_text("[daemon\n")
    with pytest.raises(errors.ConfigError, match="not valid TOML"):
        config.load(tmp_path / "bad.toml")


# ---- secrets -------------------------------------------------------------------------------


def test_secret_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"  {KEY}\n")
    s = parse(tmp_path, changed({"services.svc.api_key_env": None,
                                 "services.svc.api_key_file": str(key_file)}))
    assert s.bes_service("svc").api_key.get() == KEY
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "bes-key").write_text(KEY)
    data = changed({"services.svc.api_key_env": None,
                    "services.svc.api_key_credential": "bes-key"})
    assert problem(tmp_path, data) == (
        "config error: services.svc.api_key_credential: CREDENTIALS_DIRECTORY is not set")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert parse(tmp_path, data).bes_service("svc").api_key.get() == KEY
    assert problem(tmp_path, changed({"services.svc.api_key": KEY})) == (
        "config error: services.svc.api_key: secrets are not allowed in the file; use "
        "api_key_env, api_key_file or api_key_credential")
    assert problem(tmp_path, changed({"services.svc.api_key_file": str(key_file)})) == (
        "config error: services.svc.api_key_file: give only one of api_key_env, api_key_file")
    assert problem(tmp_path, changed({"services.svc.api_key_env": "T_UNSET"})) == (
        "config error: services.svc.api_key_env: environment variable T_UNSET is not set")
    assert problem(tmp_path, changed({"services.svc.api_key_env": None})) == (
        "config error: services.svc.api_key_env: is required (or _file/_credential)")
    assert problem(tmp_path, changed({"services.svc.api_key_file": "/nonexistent/k",
                                      "services.svc.api_key_env": None})).startswith(
        "config error: services.svc.api_key_file: cannot read /nonexistent/k")


def test_without_secrets_nothing_is_read_and_nothing_missing_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("T_KEY")
    data = changed({"database.password_file": "/nonexistent/pw"})
    assert "database.password_file: cannot read /nonexistent/pw" in problem(tmp_path, data)
    assert "T_KEY is not set" in problem(tmp_path, changed({}))
    s = parse(tmp_path, data, secrets=False)
    assert config.secret_values(s) == []
    with pytest.raises(errors.ConfigError) as caught:
        s.bes_service("svc").api_key.get()
    assert str(caught.value).startswith("config error: services.svc.api_key_env: was not read")
    assert s.database.password is not None
    with pytest.raises(errors.ConfigError, match=r"database\.password_file"):
        s.database.password.get()
    # Nor are the watch folders looked at: the daemon's environment is not needed.
    missing = changed({"watch.0.folder": "elsewhere"}, data)
    assert parse(tmp_path, missing, secrets=False).watches[0].folder == tmp_path / "elsewhere"
    # Structure is still checked: a form that is not given at all is an error either way.
    assert "is required" in problem(tmp_path, changed({"services.svc.api_key_env": None}),
                                    secrets=False)


def test_redacted_and_secret_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T_PW", PASSWORD)
    monkeypatch.setenv("T_TOKEN", "tok-" + "x" * 20)
    s = parse(tmp_path, changed({"database.password_env": "T_PW",
                                 "http.token_env": "T_TOKEN"}))
    out = config.redacted(s)
    text = repr(out) + repr(s)
    for secret in (PASSWORD, KEY, CONN, "tok-" + "x" * 20):
        assert secret not in text
    assert out["database"]["password"] == "***" and out["http"]["token"] == "***"
    assert sorted(config.secret_values(s)) == sorted([CONN, KEY, PASSWORD, "tok-" + "x" * 20])


# ---- configs that used to loop at run time ------------------------------------------------


def test_two_watches_on_one_folder(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "inbox")
    for other in ("inbox", "./inbox/", str(tmp_path / "inbox"), "link"):
        data = changed({"watch": [{"folder": "inbox", "service": "svc"},
                                  {"folder": other, "service": "svc", "name": "second"}]})
        assert problem(tmp_path, data).startswith(
            f"config error: watch[1].folder: {tmp_path / 'inbox'} is already watched by watch[0]")


@pytest.mark.parametrize("key", ["output_dir", "archive_dir", "failed_dir"])
def test_result_folders_inside_a_watched_folder(tmp_path: Path, key: str) -> None:
    for where in ("inbox", "inbox/sub", str(tmp_path / "inbox" / "x" / "y")):
        text = problem(tmp_path, changed({f"watch.0.{key}": where}))
        assert text.startswith(f"config error: watch[0].{key}: ")
        assert "is inside the watched folder" in text
    # Another watch's folder, and a service's folders for queue-table jobs, count too.
    (tmp_path / "other").mkdir()
    data = changed({"watch": [{"folder": "inbox", "service": "svc"},
                              {"folder": "other", "service": "svc", key: "inbox"}]})
    assert problem(tmp_path, data).startswith(f"config error: watch[1].{key}: ")
    assert problem(tmp_path, changed({f"services.svc.{key}": "inbox/q"})).startswith(
        f"config error: services.svc.{key}: ")
    # A sibling whose name merely starts the same is not inside.
    parse(tmp_path, changed({f"watch.0.{key}": "inbox2"}))


@pytest.mark.parametrize(("key", "url", "why"), [
    ("services.svc.base_url", "http://", "has no host"),
    ("services.svc.base_url", "https:///workspaces", "has no host"),
    ("services.svc.base_url", "127.0.0.1:8080", "must start with http:// or https://"),
    ("services.svc.base_url", "ftp://example.com", "must start with http:// or https://"),
    ("services.svc.base_url", "http://host:port", "is not a URL"),
    ("services.svc.base_url", "", "must be a non-empty string"),
])
def test_unreachable_urls(tmp_path: Path, key: str, url: str, why: str) -> None:
    assert problem(tmp_path, changed({key: url})) == f"config error: {key}: {why}"


def test_unreachable_batch_endpoint_urls(tmp_path: Path) -> None:
    for key in ("scoring_uri", "arm_url"):
        data = changed({"services.be": batch_endpoint(**{key: "https://"})})
        assert problem(tmp_path, data) == f"config error: services.be.{key}: has no host"
        data = changed({"services.be": batch_endpoint(**{key: "file:///x"})})
        assert problem(tmp_path, data) == (
            f"config error: services.be.{key}: must start with http:// or https://")


@pytest.mark.parametrize("name", [
    "ab", "a" * 64, "Results", "my_container", "-abc", "abc-", "a--b", "abc.d", "ab c", "",
])
def test_container_names_azure_refuses(tmp_path: Path, name: str) -> None:
    assert problem(tmp_path, changed({"storage.container": name})).startswith(
        "config error: storage.container: ")


@pytest.mark.parametrize("name", ["abc", "a-b-c", "0abc9", "a" * 63, "bes-orchestrator"])
def test_container_names_azure_accepts(tmp_path: Path, name: str) -> None:
    assert parse(tmp_path, changed({"storage.container": name})).storage.container == name


def test_watch_folder_must_exist_unless_create(tmp_path: Path) -> None:
    data = changed({"watch.0.folder": "inbx"})
    assert problem(tmp_path, data) == (
        f"config error: watch[0].folder: {tmp_path / 'inbx'} does not exist "
        "(create = true creates it)")
    s = parse(tmp_path, changed({"watch.0.folder": "inbx", "watch.0.create": True}))
    assert s.watches[0].create and not (tmp_path / "inbx").exists()
    (tmp_path / "afile").write_text("x")
    assert problem(tmp_path, changed({"watch.0.folder": "afile"})) == (
        f"config error: watch[0].folder: {tmp_path / 'afile'} is not a folder")


@pytest.mark.parametrize("url", [
    f"postgresql+asyncpg://bes:{PASSWORD}@db.example.com:5432/bes",
    f"postgresql+asyncpg://db.example.com/bes?password={PASSWORD}",
    f"postgresql+asyncpg://bes@db.example.com/bes?sslmode=require&PassWord={PASSWORD}",
    f"postgresql+asyncpg://bes@db.example.com/bes?pwd={PASSWORD}",
    f"postgresql+asyncpg://bes@db.example.com/bes?PASSWD={PASSWORD}",
    f"postgresql+asyncpg://bes@db.example.com/bes?sslpassword={PASSWORD}",
])
def test_password_in_database_url(tmp_path: Path, url: str) -> None:
    text = problem(tmp_path, changed({"database.url": url}))
    assert text == "config error: database.url: must not hold a password; use database.password_env"
    assert PASSWORD not in text


def test_database_url_shapes(tmp_path: Path) -> None:
    text = problem(tmp_path, changed({"database.url": f"mysql://u:{PASSWORD}@h/db"}))
    assert text.startswith("config error: database.url: must start with") and PASSWORD not in text
    text = problem(tmp_path, changed({"database.url": f"::{PASSWORD}::"}))
    assert text == "config error: database.url: is not a database URL"
    ok = "postgresql+asyncpg://bes@db.example.com:5432/bes?ssl=require"
    assert parse(tmp_path, changed({"database.url": ok})).database.url == ok
    s = parse(tmp_path, changed({"database.url": "sqlite+aiosqlite:///db/x.db"}))
    assert s.database.url == f"sqlite+aiosqlite:///{tmp_path / 'db' / 'x.db'}"


# ---- service kinds ------------------------------------------------------------------------


def test_rrs_service(tmp_path: Path) -> None:
    rrs = {"kind": "rrs", "base_url": "http://127.0.0.1:1", "workspace": "w", "service": "s",
           "api_key_env": "T_KEY", "max_rows": 50}
    svc = parse(tmp_path, changed({"services.small": rrs})).service("small")
    assert isinstance(svc, config.RrsService)
    assert svc.execute_url == "http://127.0.0.1:1/workspaces/w/services/s/execute"
    assert (svc.max_rows, svc.max_bytes, dict(svc.outputs)) == (50, 1024 * 1024,
                                                                {"output1": ".csv"})
    full = {"kind": "rrs", "url": "https://h/execute?api-version=2.0", "api_key_env": "T_KEY"}
    svc = parse(tmp_path, changed({"services.small": full})).service("small")
    assert isinstance(svc, config.RrsService) and svc.execute_url == "https://h/execute"
    assert problem(tmp_path, changed({"services.small": {**full, "workspace": "w"}})) == (
        "config error: services.small.workspace: give either url or base_url, workspace and "
        "service")
    assert problem(tmp_path, changed({"services.small": {**rrs, "service": None}})).startswith(
        "config error: services.small.service")
    assert problem(tmp_path, changed({"services.small": {**rrs, "max_rows": 0}})) == (
        "config error: services.small.max_rows: must be at least 1")
    with pytest.raises(errors.ConfigError, match=r'services\.small\.kind: is "rrs", not "bes"'):
        parse(tmp_path, changed({"services.small": rrs})).bes_service("small")


def test_batch_endpoint_service(tmp_path: Path) -> None:
    svc = parse(tmp_path, changed({"services.be": batch_endpoint()})).service("be")
    assert isinstance(svc, config.BatchEndpointService)
    assert (svc.arm_url, svc.api_version, svc.output_file, svc.arm_reads_per_s) == (
        "https://management.azure.com", "2024-04-01", "predictions.csv", 20.0)
    assert svc.subscription_id == "0000"
    assert svc.workspace_url == ("https://management.azure.com/subscriptions/0000/resourceGroups/"
                                 "rg/providers/Microsoft.MachineLearningServices/workspaces/ws")
    assert dict(svc.outputs) == {"score": ".csv"} and svc.credential.type == "default"
    for bad in ("/subscriptions/0000/resourceGroups/rg", "ws",
                "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Storage/"
                "storageAccounts/ws"):
        assert problem(tmp_path, changed({"services.be": batch_endpoint(workspace_id=bad)})
                       ).startswith("config error: services.be.workspace_id: must be the")
    # The union's tag never shows in a key.
    assert problem(tmp_path, changed({"services.be": batch_endpoint(api_key_env="T_KEY")})
                   ) == "config error: services.be.api_key_env: unknown key"
    assert problem(tmp_path, changed({"services.be": batch_endpoint(output_file="a/b.csv")})
                   ) == "config error: services.be.output_file: is not a usable file name"


def test_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def cred(**kw: Any) -> dict[str, Any]:
        return changed({"services.be": batch_endpoint(credential=kw)})

    monkeypatch.setenv("T_CLIENT_SECRET", "cs-" + "y" * 20)
    svc = parse(tmp_path, cred(type="client_secret", tenant_id="t", client_id="c",
                               client_secret_env="T_CLIENT_SECRET")).service("be")
    assert isinstance(svc, config.BatchEndpointService)
    assert svc.credential.client_secret is not None
    assert svc.credential.client_secret.get() == "cs-" + "y" * 20
    assert problem(tmp_path, cred(type="client_secret", tenant_id="t", client_id="c")) == (
        'config error: services.be.credential.client_secret_env: is required with type = '
        '"client_secret" (or _file/_credential)')
    assert problem(tmp_path, cred(type="managed_identity", client_secret_env="T_CLIENT_SECRET")
                   ) == ('config error: services.be.credential.client_secret: is only used with'
                         ' type = "client_secret"')
    assert problem(tmp_path, cred(type="password")).startswith(
        'config error: services.be.credential.type: must be "default", "managed_identity"')
    parse(tmp_path, cred(type="managed_identity", client_id="00000000-id"))


def test_storage_with_entra_id(tmp_path: Path) -> None:
    url = "https://acct.blob.core.windows.net"
    keyless = {"storage": {"account_url": url, "credential": {"type": "managed_identity"}}}
    data = changed({**keyless, "services": {"be": batch_endpoint()}, "watch.0.service": "be"})
    s = parse(tmp_path, data)
    assert s.storage.account_url == url and s.storage.credential.type == "managed_identity"
    assert config.redacted(s)["storage"]["connection_string"] is None
    with pytest.raises(errors.ConfigError, match=r"storage\.connection_string: is not set"):
        s.storage.connection_string.get()
    assert problem(tmp_path, changed({"storage.account_url": url, "storage.reference": "sas"})
                   ) == ("config error: storage.account_url: give either a connection string "
                         "or account_url")
    assert problem(tmp_path, changed({"storage.credential": {"type": "azure_cli"}})) == (
        "config error: storage.credential: is only used with account_url")
    # BES is handed its blobs by a connection string or a SAS made with the account key: with
    # Entra ID alone there is neither, whatever `reference` says.
    for reference in ("connection_string", "sas"):
        assert problem(tmp_path, changed({"storage": {"account_url": url,
                                                      "reference": reference}})) == (
            "config error: storage.account_url: services.svc is a classic BES service, which "
            "needs a storage connection string (Entra ID storage is for batch endpoints)")


def test_http_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for listen in ("0.0.0.0:9464", "192.0.2.1:80", ":9464", "[::]:9464", "example.com:80"):
        assert problem(tmp_path, changed({"http.listen": listen})).startswith(
            "config error: http.listen: "), listen
    assert "token_env" in problem(tmp_path, changed({"http.listen": "0.0.0.0:9464"}))
    for listen in ("127.0.0.1:1", "localhost:9", "[::1]:9464"):
        parse(tmp_path, changed({"http.listen": listen}))
    monkeypatch.setenv("T_TOKEN", "z" * 32)
    s = parse(tmp_path, changed({"http.listen": "0.0.0.0:9464", "http.token_env": "T_TOKEN"}))
    assert s.http.token is not None and s.http.token.get() == "z" * 32
    off = parse(tmp_path, changed({"http.listen": ""})).http
    assert not off.enabled
    for bad in ("9464", "host:", "127.0.0.1:70000"):
        assert problem(tmp_path, changed({"http.listen": bad})).startswith(
            "config error: http.listen: must be \"host:port\"")


# ---- at the command line: one line, exit 78 ---------------------------------------------


def cli_check(tmp: Path, data_toml: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cfg = tmp / "config.toml"
    cfg.write_text(data_toml)
    return subprocess.run([*harness.cli_cmd(), "config", "check", "-c", str(cfg)],
                          env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=60, cwd=tmp)


def test_config_check_exits_78_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    data = changed({"database.url": f"postgresql+asyncpg://u@h/db?password={PASSWORD}",
                    "watch": [{"folder": "inbox", "service": "svc"},
                              {"folder": "inbox/", "service": "svc", "name": "again"}]})
    env = {"T_KEY": KEY, "T_STORAGE": CONN}
    proc = cli_check(tmp_path, harness_toml(data), env)
    assert proc.returncode == 78 and proc.stdout == ""
    assert proc.stderr == ("config error: database.url: must not hold a password; use "
                           "database.password_env\n")
    del data["database"]
    proc = cli_check(tmp_path, harness_toml(data), env)
    assert proc.returncode == 78 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("config error: watch[1].folder: ")


def harness_toml(data: dict[str, Any]) -> str:
    text = ""
    for name in ("daemon", "database", "storage"):
        if name in data:
            text += harness.table(name, data[name])
    for name, svc in data["services"].items():
        text += harness.table(f"services.{name}", svc)
    for w in data["watch"]:
        text += harness.table("[watch]", w)
    return text
