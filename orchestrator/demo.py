"""`bes-orchestrator demo`: the main job on the embedded default, no cloud account needed.

Starts Azurite and the BES emulator as child processes, fills a local inbox with the sample
review CSVs, and runs the daemon on it. Children are stopped on every exit path.
`--backend batch-endpoint` drives the emulator's Azure ML batch-endpoint planes instead (scoring,
ARM, and a managed-identity token endpoint that azure-identity reaches through
IDENTITY_ENDPOINT / IDENTITY_HEADER), with the same folder.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import secrets
from pathlib import Path

import click
from rich.table import Table

from orchestrator import azurite, cli, logs
from orchestrator.emulator import process

API_KEY_ENV = "BES_DEMO_API_KEY"
STORAGE_ENV = "BES_DEMO_STORAGE_CONNECTION_STRING"
#: The batch-endpoint demo's datastore container (the daemon's own [storage] container).
DEMO_CONTAINER = "bes-demo"
DEMO_WORKSPACE_ID = ("/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/demo/"
                     "providers/Microsoft.MachineLearningServices/workspaces/demo-workspace")


def _service_table(base_url: str, backend: str) -> str:
    if backend == "batch-endpoint":
        return f"""\
[services.sentiment]
kind = "batch_endpoint"
scoring_uri = "{base_url}/endpoints/feature-hashing/jobs"
workspace_id = "{DEMO_WORKSPACE_ID}"
arm_url = "{base_url}"
datastore = "workspaceblobstore"
input_name = "input_data"
output_name = "output1"
credential = {{ type = "managed_identity" }}
max_in_flight = 10
invoke_lookup_grace_s = 2
poll = {{ initial_s = 0.5, multiplier = 1.5, max_s = 5 }}
"""
    return f"""\
[services.sentiment]
base_url = "{base_url}"
workspace = "demo-workspace"
service = "feature-hashing"
api_key_env = "{API_KEY_ENV}"
max_in_flight = 10
poll = {{ initial_s = 0.5, multiplier = 1.5, max_s = 5 }}
"""


def write_config(workdir: Path, base_url: str, backend: str = "bes") -> Path:
    path = workdir / "demo.toml"
    path.write_text(f"""\
# Written by `bes-orchestrator demo`. Secrets come from the environment, never this file.
[daemon]
state_dir = "state"
heartbeat_s = 2
lease_s = 10

[database]
url = "sqlite+aiosqlite:///state/state.db"

[storage]
connection_string_env = "{STORAGE_ENV}"
container = "{DEMO_CONTAINER}"

{_service_table(base_url, backend)}
[[watch]]
folder = "inbox"
pattern = "*.csv"
service = "sentiment"
output_dir = "results"
archive_dir = "archive"
failed_dir = "failed"
settle_s = 0.5
""", encoding="utf-8")
    return path


def print_history(settings_path: Path) -> None:
    settings = cli.load_settings(settings_path)
    rows = cli.run_async(cli.with_repo(settings, lambda r: r.history(limit=50)))
    table = Table("job", "input", "state", "s", "result files (in results/) or error")
    for row in rows:
        outputs = json.loads(row.get("outputs") or "{}")
        names = ", ".join(Path(p).name for p in outputs.values())
        table.add_row(str(row["job_id"])[:8], str(row["input_name"]), str(row["state"]),
                      f"{row['duration_s']:.1f}" if row.get("duration_s") is not None else "",
                      str(row.get("error") or names))
    cli.console.print(table)


@click.command()
@click.option("--once", is_flag=True, help="Exit when the inbox is drained; print the history.")
@click.option("--dir", "workdir", type=click.Path(path_type=Path), default=Path("demo"),
              show_default=True, help="Where the demo's inbox, results and state live.")
@click.option("--verbose", "-v", is_flag=True, help="Show every log line, not only warnings.")
@click.option("--backend", type=click.Choice(["bes", "batch-endpoint"]), default="bes",
              show_default=True,
              help="Classic BES, or an Azure ML batch endpoint (the emulator's batch planes, "
                   "tokens through azure-identity's managed-identity path).")
def demo_command(once: bool, workdir: Path, verbose: bool, backend: str) -> None:
    """Run the whole pipeline locally: Azurite + the BES emulator + the daemon on sample CSVs.

    Drop more CSVs (with a Col2 text column) into DIR/inbox while it runs; Ctrl-C stops it.
    """
    from orchestrator.db import migrate as migrate_mod

    try:  # before anything starts: a missing Azurite is one line saying how to get it
        azurite.find_binary()
    except azurite.AzuriteNotFound as exc:
        cli.fail(f"demo: {exc}")
    if not verbose:  # the job lines tell the story; keep log lines to warnings and errors
        logs.configure(json=None, level="warning")
    workdir = workdir.resolve()
    inbox = workdir / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    samples = importlib.resources.files("orchestrator") / "samples"
    for sample in samples.iterdir():
        if sample.name.endswith(".csv"):
            # write-then-rename, as writers are told to
            tmp = inbox / f".{sample.name}.tmp"
            tmp.write_bytes(sample.read_bytes())
            tmp.rename(inbox / sample.name)
    api_key = secrets.token_urlsafe(24)
    identity_header = secrets.token_urlsafe(24)
    click.echo(f"demo folder: {workdir}")
    with azurite.running() as az, process.spawn(
        *_emulator_args(backend),
        env={process.API_KEY_ENV: api_key, process.BE_STORAGE_ENV: az.connection_string,
             process.IDENTITY_HEADER_ENV: identity_header},
    ) as (url, _):
        os.environ[STORAGE_ENV] = az.connection_string
        os.environ[API_KEY_ENV] = api_key
        if backend == "batch-endpoint":  # azure-identity's App Service managed identity
            os.environ["IDENTITY_ENDPOINT"] = f"{url}/msi/token"
            os.environ["IDENTITY_HEADER"] = identity_header
        which = "batch-endpoint" if backend == "batch-endpoint" else "BES"
        click.echo(f"Azurite on {az.blob_endpoint}; {which} emulator on {url}")
        cfg = write_config(workdir, url, backend)
        settings = cli.load_settings(cfg)
        cli.ensure_sqlite_folder(settings)
        cli.run_async(migrate_mod.upgrade(settings.database.url, None))
        click.echo(f"watching {inbox} — results go to {workdir / 'results'}"
                   + ("" if once else "; drop more CSVs in, Ctrl-C to stop"))
        code = cli.run_async(cli.run_daemon(settings, once=once, progress=False, echo_jobs=True))
        if once:
            print_history(cfg)
            click.echo(f"results in {workdir / 'results'}; history: "
                       f"sqlite3 {workdir / 'state' / 'state.db'} 'select * from job_history'")
    raise SystemExit(code if once else 0)


def _emulator_args(backend: str) -> list[str]:
    if backend == "batch-endpoint":
        return ["--be-container", DEMO_CONTAINER, "--prepare-s", "0.5,1", "--run-time-s", "1,3"]
    return ["--run-time-s", "1,3", "--queue-delay-s", "0,1"]
