"""`bes-orchestrator`: run | demo | emulator | submit | jobs | status | migrate | config.

Exit codes: 0 ok, 1 a job failed (`run --once`) or a command failed, 2 usage, 78 bad
configuration or database version (systemd's RestartPreventExitStatus=78 stops a restart loop).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

import click
from rich.console import Console
from rich.markup import escape

from orchestrator import clock, config, errors, fsutil, jobs, lifecycle, logs

if TYPE_CHECKING:
    # SQLAlchemy's asyncio extension and aiosqlite take ~0.3 s to import: the commands that
    # only read a SQLite database (`status`, `jobs list|show`) never load them (see `reading`).
    from orchestrator.db import reads as db_reads
    from orchestrator.db import repository

EX_CONFIG = 78
T = TypeVar("T")

#: Rich assumes 80 columns when not on a terminal and cuts values to fit: piped output (a file,
#: grep, a script) gets every value in full instead.
PIPE_WIDTH = 100_000
console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(logs.scrub(message), err=True)
    sys.exit(code)


@contextlib.contextmanager
def failing_on_one_line() -> Iterator[None]:
    """A command's expected errors as one line and its exit code."""
    try:
        yield
    except errors.ConfigError as exc:
        fail(str(exc), EX_CONFIG)
    except errors.DatabaseVersionError as exc:
        fail(f"database error: {exc}", EX_CONFIG)
    except errors.NotFound as exc:
        fail(f"not found: {exc}")
    except errors.InvalidState as exc:
        fail(str(exc))
    except (errors.OrchestratorError, OSError) as exc:
        fail(f"error: {exc}")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio  # ~40 ms: not for the commands that only read SQLite

    with failing_on_one_line():
        return asyncio.run(coro)


def load_settings(path: Path, *, secrets: bool = True) -> config.Settings:
    """`secrets=False` for commands that only read the database: no secret is read, and a
    missing variable or credential file is no error."""
    try:
        settings = config.load(path, secrets=secrets)
    except errors.ConfigError as exc:
        fail(str(exc), EX_CONFIG)
    logs.register_secrets(config.secret_values(settings))
    return settings


#: SQLite keeps these beside the database file, so its folder must be writable too.
_SQLITE_SIDE_FILES = "-wal and -shm"


def _sqlite_file(settings: config.Settings) -> Path | None:
    """The database file of a SQLite URL (None for PostgreSQL or in-memory)."""
    from orchestrator.db import urls

    database = urls.plain_sqlite_database(settings.database.url)
    if database is not None:  # the usual form: no SQLAlchemy to import
        return urls.sqlite_file(database)
    from orchestrator.db import engine as db_engine

    try:
        url = db_engine.parse_url(settings.database.url)
    except Exception:  # config validated it; the engine will say what is wrong
        return None
    if url.get_backend_name() != "sqlite":
        return None
    return db_engine.sqlite_path(url)


def _unwritable(path: Path) -> str | None:
    """Why this user cannot write the SQLite database at `path` (None if it can)."""
    import os

    folder = path.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"cannot write {folder}: this user needs write access to the database's "
                f"folder (SQLite keeps {_SQLITE_SIDE_FILES} files beside it)")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"cannot write {path}: give this user read and write access"
    return None


def ensure_sqlite_folder(settings: config.Settings) -> None:
    """`migrate` creates the folder a SQLite database lives in (the file itself is 0600), and
    refuses, one line and exit 78, a folder or file this user cannot write."""
    path = _sqlite_file(settings)
    if path is None:
        return
    try:
        fsutil.ensure_dir(path.parent)
    except OSError as exc:
        fail(str(errors.ConfigError("database.url", f"cannot create {path.parent}: "
                                        f"{exc.strerror}")), EX_CONFIG)
    problem = _unwritable(path)
    if problem:
        fail(str(errors.ConfigError("database.url", problem)), EX_CONFIG)


def _database_error(settings: config.Settings, exc: Exception) -> errors.ConfigError:
    """A database that cannot be opened or read, as one line naming database.url."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split()) or type(orig).__name__
    path = _sqlite_file(settings)
    hint = ""
    if path is not None and ("readonly" in text or "unable to open" in text):
        hint = (f" (this user needs write access to {path} and to its folder, where SQLite "
                f"keeps {_SQLITE_SIDE_FILES} files)")
    if path is not None:
        where = str(path)
    else:
        from orchestrator.db import engine as db_engine

        where = db_engine.safe_url(settings.database.url)
    return errors.ConfigError("database.url", f"cannot use the database at {where}: "
                                              f"{text}{hint}")


async def open_repo(
    settings: config.Settings, *, check: bool = True, existing: bool = False
) -> repository.Repository:
    """`existing` (status, jobs): a SQLite database that does not exist is reported, not
    created. Otherwise a SQLite folder or file this user cannot write is refused up front."""
    from sqlalchemy import exc as sa_exc

    from orchestrator.db import repository

    path = _sqlite_file(settings)
    if path is not None:
        if existing:
            _must_exist(path)
        problem = None if existing else _unwritable(path)
        if problem:
            raise errors.ConfigError("database.url", problem)
    pw = settings.database.password.get() if settings.database.password else None
    try:
        repo = await repository.Repository.open(settings.database.url, password=pw)
    except OSError as exc:
        raise errors.ConfigError("database.url", f"cannot open the database: {exc}") from None
    except sa_exc.SQLAlchemyError as exc:
        raise _database_error(settings, exc) from None
    if check:
        try:
            # The revision the scripts' text names settles it; Alembic (~0.4 s of start-up) is
            # loaded only for a database at another revision, or scripts that do not read as
            # one chain (a broken install): `migrate` still loads every script.
            await repo.check_schema(quick=True)
        except (OSError, sa_exc.SQLAlchemyError) as exc:
            await repo.close()
            raise _database_error(settings, exc) from None
        except BaseException:
            await repo.close()
            raise
    return repo


def _must_exist(path: Path) -> None:
    if not path.exists():
        raise errors.ConfigError(
            "database.url", f"no database at {path} (run `bes-orchestrator migrate` "
                            "first, or check database.url)")


@contextlib.contextmanager
def reading(settings: config.Settings) -> Iterator[db_reads.Reads]:
    """The reads of the database-only commands, in one read transaction. A SQLite database is
    read with the standard library's sqlite3 (SQLAlchemy is never imported: `status` answers
    in about a fifth of a second); PostgreSQL through the repository. Either way the schema
    must be at this program's head, and a database that does not exist is not created."""
    path = _sqlite_file(settings)
    if path is None:
        from orchestrator.db import reads

        with reads.through_repository(open_repo(settings, existing=True)) as found:
            yield found
        return
    import sqlite3

    from orchestrator.db import migrate, sqlite_reads

    _must_exist(path)
    try:
        with sqlite_reads.reading(path) as found:
            revision = found.revision()
            if revision is None or revision != migrate.head_from_text():
                migrate.check_revision(revision)  # loads Alembic: the full check and message
            yield found
    except sqlite3.Error as exc:
        raise _database_error(settings, exc) from None


async def with_repo(
    settings: config.Settings, fn: Callable[[repository.Repository], Awaitable[T]],
    *, existing: bool = False,
) -> T:
    repo = await open_repo(settings, existing=existing)
    try:
        return await fn(repo)
    finally:
        await repo.close()


def load_db_settings(path: Path) -> config.Settings:
    """For commands that only use the database (status, jobs): none of the daemon's
    secrets (BES keys, storage) is read and the watch folders are not looked at; only the
    database's own password, when it has one."""
    try:
        settings = config.load(path, secrets=False)
        pw = settings.database.password
        if pw is not None and not pw.is_read:
            settings = _with_database_password(settings, path)
    except errors.ConfigError as exc:
        fail(str(exc), EX_CONFIG)
    logs.register_secrets(config.secret_values(settings))
    return settings


def _with_database_password(settings: config.Settings, path: Path) -> config.Settings:
    import tomllib

    import pydantic

    raw = tomllib.loads(path.read_text(encoding="utf-8")).get("database", {})
    try:
        db = config.DatabaseConfig.model_validate(
            raw, context={"base": path.resolve().parent, "secrets": True})
    except pydantic.ValidationError as exc:
        from orchestrator.config import core

        err = core.to_config_error(exc)
        raise errors.ConfigError(f"database.{err.key}", err.problem) from None
    return settings.model_copy(update={"database": db})


config_option = click.option(
    "--config", "-c", "config_path", type=click.Path(path_type=Path),
    default="bes-orchestrator.toml", envvar="BES_ORCHESTRATOR_CONFIG", show_default=True,
    show_envvar=True, help="The TOML configuration file.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, not a table.")


#: What adds the development tools (`demo`, `emulator`) to an install.
EMULATOR_EXTRA_PIP = "pip install 'bes-orchestrator[emulator]'"


def _needs_extra_command(name: str) -> click.Command:
    """Stands in for `name` when the emulator extra is not installed: `--help` still lists it,
    and running it prints one line saying how to add the extra."""
    message = f"`bes-orchestrator {name}` needs the emulator extra: {EMULATOR_EXTRA_PIP}"

    def callback() -> None:
        fail(message)

    return click.Command(
        name, callback=callback, help=f"(not installed) {message}",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                          "help_option_names": []},
    )


class _LazyGroup(click.Group):
    """Imports `demo` and `emulator` only when asked for: the daemon never pays for them, and
    a production install without the emulator extra gets a one-line hint instead."""

    lazy: ClassVar[dict[str, tuple[str, str]]] = {
        "demo": ("orchestrator.demo", "demo_command"),
        "emulator": ("orchestrator.emulator.cli", "emulator_command"),
    }
    #: The modules only the emulator extra installs (pyproject.toml, [emulator]).
    extra_modules: ClassVar[tuple[str, ...]] = ("mmh3",)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            import importlib
            import importlib.util

            if any(importlib.util.find_spec(m) is None for m in self.extra_modules):
                return _needs_extra_command(cmd_name)
            module, attr = self.lazy[cmd_name]
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--log-json/--log-text", default=None,
              help="Log format; default: JSON unless stderr is a terminal.")
@click.version_option(package_name="bes-orchestrator", prog_name="bes-orchestrator",
                      message="%(prog)s %(version)s")
def main(log_level: str, log_json: bool | None) -> None:
    """Turn a folder or a queue table into Azure ML Batch Execution Service jobs, reliably."""
    logs.configure(json=log_json, level=log_level)


# ------------------------------------------------------------------------------------------
# run


def _job_line(job: jobs.Job) -> str:
    where = ""
    if job.state is lifecycle.JobState.DONE and job.outputs:
        where = " -> " + ", ".join(job.outputs.values())
    elif job.state in (lifecycle.JobState.FAILED, lifecycle.JobState.FAILING) and job.error:
        where = f": {job.error}"
    return f"{job.short_id}  {job.input_name:<32} {job.state.value:<15}{where}"


async def run_daemon(
    settings: config.Settings, *, once: bool, progress: bool, echo_jobs: bool = False,
    config_path: Path | None = None,
) -> int:
    """The daemon (orchestrator/daemon.py) with what a person at a terminal sees: each job as
    it moves (`echo_jobs`), a progress bar, and `--once`'s summary."""
    from orchestrator import daemon as daemon_mod

    for folder in (settings.daemon.state_dir, settings.daemon.spool_dir):
        try:
            fsutil.ensure_dir(folder)
        except OSError as exc:
            raise errors.ConfigError("daemon.state_dir", f"cannot create {folder}: "
                                     f"{exc.strerror}") from None
    repo = await open_repo(settings)
    bar: Any = None
    task_id: Any = None

    def on_change(job: jobs.Job) -> None:
        if echo_jobs and job.state in (
            lifecycle.JobState.CLAIMED, lifecycle.JobState.STARTED, *lifecycle.TERMINAL_STATES
        ):
            click.echo(_job_line(job))
        if bar is not None:
            s = d.worker.stats
            bar.update(task_id, total=max(s.claimed, 1), completed=s.done + s.failed + s.cancelled,
                       description=f"done {s.done}  failed {s.failed}")

    d = daemon_mod.Daemon(settings, repo, config_path=config_path, once=once,
                          on_change=on_change)
    progress_cm: Any = contextlib.nullcontext()
    if progress and console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        progress_cm = Progress(TextColumn("{task.description}"), BarColumn(),
                               MofNCompleteColumn(), console=err_console, transient=True)
    try:
        with progress_cm as bar_obj:
            if bar_obj is not None:
                bar = bar_obj
                task_id = bar.add_task("starting", total=None)
            outcome = await d.run()
    finally:
        await repo.close()
    if once and outcome.failure is None:
        console.print(daemon_mod.exit_message(outcome), highlight=False, soft_wrap=True)
    return outcome.exit_code


@main.command()
@config_option
@click.option("--once", is_flag=True,
              help="Drain what is there (folders and queue), wait for every job to end, print a "
                   "summary, and exit non-zero if anything failed.")
def run(config_path: Path, once: bool) -> None:
    """Run the daemon: watch folders and the queue table, push every input through BES."""
    settings = load_settings(config_path)
    sys.exit(run_async(run_daemon(settings, once=once, progress=once, config_path=config_path)))


# ------------------------------------------------------------------------------------------
# migrate / config / submit


@main.command()
@config_option
def migrate(config_path: Path) -> None:
    """Create or upgrade the database schema (Alembic)."""
    from orchestrator.db import migrate as migrate_mod

    settings = load_settings(config_path)
    pw = settings.database.password.get() if settings.database.password else None
    ensure_sqlite_folder(settings)

    async def go() -> str:
        await migrate_mod.upgrade(settings.database.url, pw)
        return migrate_mod.head_revision()

    # Inside run_async: a broken install (no migrations) is one line and exit 78.
    click.echo(f"database at revision {run_async(go())}")


@main.group(name="config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command(name="check")
@config_option
@click.option("--online", is_flag=True,
              help="Also compare each service's swagger.json with the config and try the "
                   "storage account (list, write and delete a probe blob); exit 1 on a mismatch.")
def config_check(config_path: Path, online: bool) -> None:
    """Validate the configuration and print it resolved, with secrets redacted."""
    settings = load_settings(config_path)
    click.echo(json.dumps(config.redacted(settings), indent=2, default=str))
    if online:
        from orchestrator import online as online_mod

        rows = run_async(online_mod.run(settings))
        click.echo(online_mod.render(rows))
        sys.exit(0 if all(r.ok for r in rows) else 1)


@main.command()
@config_option
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--service", "-s", required=True, help="The configured service to run them on.")
def submit(config_path: Path, files: tuple[Path, ...], service: str) -> None:
    """Put FILES on the queue table; works whether or not the daemon is running.

    The daemon that takes a row moves the file into its spool (copying it first when it does
    not own it), so each file leaves its folder; a file named twice is queued once."""
    settings = load_db_settings(config_path)
    if service not in settings.services:
        fail(f"unknown service {service!r}; configured: {', '.join(settings.services)}", 2)
    paths: list[str] = []
    for f in files:
        if not f.is_file():
            fail(f"{f}: not a file", 2)
        resolved = str(f.resolve())  # the same file by any name (./a.csv, a link) is one
        if resolved in paths:
            click.echo(f"skipped {f}: {resolved} is already in this submission", err=True)
            continue
        paths.append(resolved)
    ids = run_async(with_repo(settings, lambda r: r.enqueue(paths, service=service,
                                                            now=clock.now()), existing=True))
    for p, i in zip(paths, ids, strict=True):
        click.echo(f"queued {p} (queue id {i})")


# ------------------------------------------------------------------------------------------
# jobs / status


def job_dict(job: jobs.Job) -> dict[str, Any]:
    return {
        "job_id": job.id, "state": job.state.value, "service": job.service,
        "input_name": job.input_name, "input_path": job.input_path,
        "input_sha256": job.input_sha256, "bes_job_id": job.bes_job_id,
        "bes_status": job.bes_status, "attempts": job.attempts, "runs": job.runs,
        "resubmits": job.resubmits,
        "created_at": clock.iso(job.created_at), "submitted_at": clock.iso(job.submitted_at),
        "started_at": clock.iso(job.started_at), "finished_at": clock.iso(job.finished_at),
        "outputs": dict(job.outputs), "error": job.error, "error_code": job.error_code,
        "worker": job.lease_owner,
    }


def print_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A table for people. Values are text, never rich markup (a file may be named
    `[red].csv`); when piped, nothing is cut or wrapped (see PIPE_WIDTH)."""
    from rich.table import Table

    table = Table(*columns)
    for row in rows:
        table.add_row(*(escape(v) for v in row))
    console.print(table)


def state_choice() -> click.Choice[str]:
    return click.Choice([s.value for s in lifecycle.JobState])


@main.group(name="jobs")
def jobs_group() -> None:
    """List, show, retry or cancel jobs."""


@jobs_group.command(name="list")
@config_option
@json_option
@click.option("--state", type=state_choice(), help="Only jobs in this state.")
@click.option("--service", help="Only jobs of this service.")
@click.option("--limit", default=50, show_default=True)
def jobs_list(config_path: Path, as_json: bool, state: str | None, service: str | None,
              limit: int) -> None:
    """The newest jobs."""
    settings = load_db_settings(config_path)
    st = lifecycle.JobState(state) if state else None
    with failing_on_one_line(), reading(settings) as db:
        rows = db.list_jobs(state=st, service=service, limit=limit)
    if as_json:
        click.echo(json.dumps([job_dict(j) for j in rows], indent=2))
        return
    cut = 60 if console.is_terminal else None  # piped: every value in full
    print_table(["job", "input", "service", "state", "BES status", "created", "error"],
                [[j.short_id, j.input_name, j.service, j.state.value, j.bes_status or "",
                  clock.iso(j.created_at) or "", (j.error or "")[:cut]] for j in rows])


@jobs_group.command(name="show")
@config_option
@json_option
@click.argument("job_id")
def jobs_show(config_path: Path, as_json: bool, job_id: str) -> None:
    """One job and its events."""
    settings = load_db_settings(config_path)
    with failing_on_one_line(), reading(settings) as db:
        job = db.get_job(job_id)
        events = db.events(job.id)
    evs = [{"at": clock.iso(e.at), "from": e.from_state.value if e.from_state else None,
            "to": e.to_state.value, "worker": e.worker, "message": e.message} for e in events]
    if as_json:
        click.echo(json.dumps({**job_dict(job), "events": evs}, indent=2))
        return
    for k, v in job_dict(job).items():
        console.print(f"[bold]{k:>13}[/bold]  {escape(str(v if v not in (None, {}) else '-'))}",
                      highlight=False, soft_wrap=not console.is_terminal)
    print_table(["at", "from", "to", "worker", "message"],
                [[e["at"] or "", e["from"] or "", e["to"] or "", e["worker"] or "",
                  e["message"] or ""] for e in evs])


@jobs_group.command(name="retry")
@config_option
@click.argument("job_id")
def jobs_retry(config_path: Path, job_id: str) -> None:
    """Run a failed or cancelled job again (its input comes back from the failed folder)."""
    settings = load_db_settings(config_path)
    job = run_async(with_repo(settings, lambda r: r.retry(job_id, now=clock.now()),
                              existing=True))
    click.echo(f"job {job.short_id} queued again (run {job.runs})")


@jobs_group.command(name="cancel")
@config_option
@click.argument("job_id")
def jobs_cancel(config_path: Path, job_id: str) -> None:
    """Cancel a job: its BES job is deleted and its input goes to the failed folder."""
    settings = load_db_settings(config_path)
    job = run_async(with_repo(settings, lambda r: r.request_cancel(job_id, now=clock.now()),
                              existing=True))
    click.echo(f"job {job.short_id} is being cancelled")


@main.command()
@config_option
@json_option
def status(config_path: Path, as_json: bool) -> None:
    """Counts by state, the oldest job still in flight, and the daemon's health."""
    from orchestrator.web import probe

    settings = load_db_settings(config_path)
    try:
        health = probe.health(probe.http_settings(config_path))
    except errors.ConfigError as exc:
        fail(str(exc), EX_CONFIG)

    from orchestrator.backends.batch_endpoint import status as be_status

    services = list(settings.services.values())
    with failing_on_one_line(), reading(settings) as db:
        counts, oldest = db.count_by_state(), db.oldest_active()
        polling = (be_status.intervals(services, db.polling_counts())
                   if be_status.any_batch_endpoint(services) else [])
    data = {
        "counts": {s.value: counts.get(s, 0) for s in lifecycle.JobState},
        "in_flight": sum(counts.get(s, 0) for s in lifecycle.ACTIVE_STATES),
        "batch_endpoint_polling": [row.as_dict() for row in polling],
        "oldest_in_flight": job_dict(oldest) if oldest else None,
        "health": health.as_dict(),
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    print_table(["state", "jobs"],
                [[s.value, str(counts[s])] for s in lifecycle.JobState if counts.get(s)])
    for row in polling:
        console.print(be_status.describe(row), highlight=False, markup=False)
    if oldest:
        age = (clock.now() - oldest.created_at).total_seconds()
        console.print(f"oldest in flight: {oldest.short_id} {oldest.input_name} "
                      f"({oldest.state.value}, {age:.0f} s old)", highlight=False,
                      markup=False, soft_wrap=not console.is_terminal)
    else:
        console.print("nothing in flight")
    if health.url is None:
        console.print('daemon health: not served ([http] listen = "")', markup=False,
                      highlight=False)
    for name, answer in (("live", health.live), ("ready", health.ready)):
        if answer is not None:
            console.print(f"{name}: {'yes' if answer.ok else 'NO'} ({answer.reason})",
                          highlight=False, markup=False)




# ------------------------------------------------------------------------------------------
# db copy


@main.group(name="db")
def db_group() -> None:
    """Database maintenance: copy a job history to another database."""


def _env_password(option: str, name: str | None) -> str | None:
    if name is None:
        return None
    import os

    value = os.environ.get(name)
    if not value:
        fail(f"{option}: environment variable {name} is not set", EX_CONFIG)
    logs.register_secrets([value])
    return value


@db_group.command(name="copy")
@click.option("--from", "from_url", metavar="URL",
              help="The source database URL; default: database.url of the config file.")
@click.option("--to", "to_url", metavar="URL", required=True,
              help="The target database URL (e.g. postgresql+asyncpg://host/db); migrated to "
                   "this program's schema if needed, and it must hold no jobs.")
@click.option("--from-password-env", metavar="NAME",
              help="Environment variable with the source database's password.")
@click.option("--to-password-env", metavar="NAME",
              help="Environment variable with the target database's password.")
@click.option("--config", "-c", "config_path", type=click.Path(path_type=Path),
              envvar="BES_ORCHESTRATOR_CONFIG",
              help="Take the source (URL and password) from this configuration file.")
def db_copy(from_url: str | None, to_url: str, from_password_env: str | None,
            to_password_env: str | None, config_path: Path | None) -> None:
    """Copy jobs, events and the queue table into a new, empty database (stop the daemons
    first). Workers and leases are not copied: active jobs are resumed by the next daemon."""
    from sqlalchemy import exc as sa_exc

    from orchestrator.db import copy as copy_mod
    from orchestrator.db import engine as db_engine

    from_pw = _env_password("--from-password-env", from_password_env)
    if from_url is None:
        if config_path is None:
            fail("give --from URL or --config FILE for the source database", 2)
        settings = load_settings(config_path)
        from_url = settings.database.url
        if from_pw is None and settings.database.password:
            from_pw = settings.database.password.get()
    to_pw = _env_password("--to-password-env", to_password_env)
    for option, url, pw in (("--from", from_url, from_pw), ("--to", to_url, to_pw)):
        try:
            parsed = db_engine.parse_url(url)
        except (ValueError, sa_exc.ArgumentError) as exc:
            fail(f"{option}: {exc}", 2)
        if pw is not None and parsed.get_backend_name() == "sqlite":
            fail(f"{option}: a SQLite database has no password", 2)
    try:
        counts = run_async(copy_mod.copy_history(
            from_url, to_url, source_password=from_pw, target_password=to_pw))
    except sa_exc.SQLAlchemyError as exc:
        fail(f"database error: {type(exc).__name__}: {exc.args[0] if exc.args else ''}")
    click.echo(f"copied {counts.jobs} jobs, {counts.events} events, {counts.queue} queue rows "
               f"from {db_engine.safe_url(from_url)} to {db_engine.safe_url(to_url)}")
