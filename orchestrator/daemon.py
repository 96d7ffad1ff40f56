"""The daemon's wiring: registration, spool recovery, the HTTP endpoint, the worker's tasks
under supervision, signals, systemd notifications, reload and shutdown.

`Daemon(settings, repo).run()` is the whole daemon on the running loop (the CLI's `run` is a
few lines around it; tests run it in-process). Order at start: the worker id is registered
(refused while another live daemon holds it), spooled inputs without a job row are registered
again, the HTTP endpoint listens, the worker's tasks start, and READY=1 goes to systemd once
intake is up. Any supervised task that ends stops the daemon with exit 70 (systemd restarts it);
a `supervise.Fatal` (the database file deleted or replaced) with exit 1 and one line.
SIGTERM/SIGINT stop it; SIGHUP reloads the configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa

from orchestrator import (
    clock,
    config,
    errors,
    jobs,
    lifecycle,
    logs,
    pipeline,
    spool,
    steps,
    supervise,
    systemd,
    web,
    worker,
)
from orchestrator.db import repository

EX_SOFTWARE = 70  #: a supervised task died: systemd restarts the daemon
EX_FATAL = 1  #: the daemon cannot go on (one line says why); systemd restarts it
#: The event loop is "responsive" while this probe wakes on time.
LOOP_PROBE_S = 1.0
LOOP_STALL_S = 10.0
DRAIN_CHECK_S = 0.2

log = logs.get("bes.daemon")

OpenContext = Callable[..., Any]
CloseContext = Callable[[steps.Context], Any]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
    exit_code: int
    stats: worker.Stats
    counts: Mapping[lifecycle.JobState, int]
    #: Why the daemon stopped on its own (a task died, the database went away), or None.
    failure: str | None = None


class Daemon:
    def __init__(
        self,
        settings: config.Settings,
        repo: repository.Repository,
        *,
        config_path: Path | None = None,
        once: bool = False,
        on_change: Callable[[jobs.Job], None] | None = None,
        handle_signals: bool = True,
        step_for: worker.StepFor = pipeline.step_for,
        open_context: OpenContext = steps.open_context,
        close_context: CloseContext = steps.close_context,
    ) -> None:
        """`repo` is open and its schema checked. `config_path` is what SIGHUP reloads.
        `step_for`, `open_context` and `close_context` are for in-process tests' fakes."""
        self.settings = settings
        self.repo = repo
        self.config_path = config_path
        self.once = once
        self._handle_signals = handle_signals
        self._open_context = open_context
        self._close_context = close_context
        self._db_file = DatabaseFile.of(settings.database.url)
        self.worker = worker.Worker(settings, repo, once=once, on_change=on_change,
                                    step_for=step_for, check=self._db_file.check)
        self.supervisor = supervise.Supervisor()
        self._stop = asyncio.Event()
        self._running = False
        self._stopping = False
        self._probe_at = clock.monotonic()
        #: The HTTP endpoint while it runs (None when `http.listen` is "").
        self.server: web.Server | None = None

    # -- what probes and signals call --------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def live(self) -> tuple[bool, str]:
        """Liveness: every supervised task runs and the event loop answers on time. The same
        condition gates the systemd watchdog ping."""
        if not self._running:
            return False, "stopping" if self._stopping else "starting"
        ok, why = self.supervisor.alive()
        if not ok:
            return False, why
        late_s = clock.monotonic() - self._probe_at - LOOP_PROBE_S
        if late_s > LOOP_STALL_S:
            return False, f"event loop stalled for {late_s:.1f} s"
        return True, "ok"

    async def ready(self) -> tuple[bool, str]:
        """Readiness: alive, intake up, the database reachable and at this program's schema."""
        ok, why = self.live()
        if not ok:
            return False, why
        if not self.worker.intake.up.is_set():
            return False, "intake is not up yet"
        try:
            async with asyncio.timeout(5):
                await self.repo.check_schema(quick=True)
        except errors.DatabaseVersionError as exc:
            return False, f"database schema: {exc}"
        except Exception as exc:
            return False, f"database unreachable: {type(exc).__name__}: {exc}"
        return True, "ok"

    def reload(self) -> bool:
        """SIGHUP: read the configuration file again and apply watches, limits, poll and retry
        policies. Anything invalid (or a change only a restart can apply) keeps the old
        configuration, with one error line."""
        if self.config_path is None:
            log.error("reload_failed", error="no configuration file to reload")
            return False
        try:
            new = config.load(self.config_path)
        except errors.ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return False
        except OSError as exc:
            log.error("reload_failed", error=f"cannot read {self.config_path}: {exc.strerror}")
            return False
        problem = reload_refusal(self.settings, new)
        if problem is not None:
            log.error("reload_failed", error=problem)
            return False
        logs.register_secrets(config.secret_values(new))
        self.settings = new
        self.worker.reload(new)
        log.info("config_reloaded", watches=len(new.watches), services=len(new.services))
        return True

    # -- running -----------------------------------------------------------------------------
    async def run(self) -> Outcome:
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        if self._handle_signals:  # from the start: a SIGHUP while starting must not kill us
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
                handled.append(sig)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            handled.append(signal.SIGHUP)
        try:
            await self._register()
            try:
                return await self._run_registered()
            finally:
                # Once: frees the leases and the worker id; not on a database that is gone
                # (SQLite would create an empty file in its place).
                await self.worker.close(release=not self.supervisor.fatal)
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    async def _run_registered(self) -> Outcome:
        d = self.settings.daemon
        await self._recover_spool()
        server = self.server = await self._start_http()
        exit_code = 0
        try:
            connector = aiohttp.TCPConnector(limit=d.http_connections, limit_per_host=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                ctx = await self._open_context(self.settings, session, rng=self.worker.rng)
                try:
                    exit_code = await self._supervised(ctx)
                finally:
                    self._stopping = True
                    self._running = False
                    systemd.notify("STOPPING=1")
                    await self.supervisor.stop()
                    await self.worker.close(release=not self.supervisor.fatal)
                    await self._close_context(ctx)
        finally:
            if server is not None:
                await server.stop()
        counts = {} if self.supervisor.fatal else await self.repo.count_by_state()
        if exit_code == 0 and self.once and (self.worker.stats.failed
                                             or self.worker.stats.cancelled):
            exit_code = 1
        return Outcome(exit_code=exit_code, stats=self.worker.stats, counts=counts,
                       failure=self.supervisor.failure)

    async def _supervised(self, ctx: steps.Context) -> int:
        sup = self.supervisor
        for name, coro in self.worker.tasks(ctx).items():
            sup.spawn(name, coro)
        sup.spawn("loop-probe", self._probe())
        sup.spawn("watchdog", systemd.watchdog_loop(self.live))
        self._running = True
        waiters = {asyncio.create_task(self._stop.wait()),
                   asyncio.create_task(sup.failed.wait()),
                   asyncio.create_task(self._notify_ready())}
        drained = asyncio.create_task(self._drained()) if self.once else None
        if drained is not None:
            waiters.add(drained)
        try:
            while True:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if sup.failed.is_set():
                    return EX_FATAL if sup.fatal else EX_SOFTWARE
                if self._stop.is_set() or (drained is not None and drained in done):
                    return 0
                waiters -= done  # READY was sent
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    async def _register(self) -> None:
        """Raises repository.WorkerIdInUse (a ConfigError: one line, exit 78) while another
        live daemon runs under this worker id."""
        d = self.settings.daemon
        await self.repo.register_worker(d.worker_id, host=socket.gethostname(), pid=os.getpid(),
                                        now=clock.now(), lease_s=d.lease_s)

    async def _recover_spool(self) -> None:
        n = await spool.recover(self.settings, self.repo)
        if n:
            log.warning("spool_recovered", inputs=n)

    async def _start_http(self) -> web.Server | None:
        """After the schema check (the caller's), before READY; `http.listen = ""` is off."""
        if not self.settings.http.enabled:
            return None
        return await web.start(self.settings, self.repo, live=self.live, ready=self.ready)

    async def _notify_ready(self) -> None:
        await self.worker.intake.up.wait()
        systemd.notify("READY=1\nSTATUS=watching for inputs")
        log.info("daemon_ready", worker_id=self.settings.daemon.worker_id,
                 executors=self.settings.daemon.executors)

    async def _probe(self) -> None:
        while True:
            self._probe_at = clock.monotonic()
            await asyncio.sleep(LOOP_PROBE_S)

    async def _drained(self) -> None:
        """`--once`: intake idle, nothing held, and no active job left in the database."""
        await self.worker.intake.drained.wait()
        while True:
            await asyncio.sleep(DRAIN_CHECK_S)
            if not self.worker.idle():
                continue
            counts = await self.repo.count_by_state()
            if not any(counts.get(s, 0) for s in lifecycle.ACTIVE_STATES):
                return


# -- the database file's identity ----------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class DatabaseFile:
    """A SQLite database file and its identity (device, inode) when the daemon started.

    A file deleted or replaced under a running daemon would take the history with it while
    the daemon kept writing to the old inode: checked at every heartbeat, it stops the daemon."""

    path: Path | None
    identity: tuple[int, int] | None

    @classmethod
    def of(cls, url: str) -> DatabaseFile:
        path = sqlite_path(url)
        if path is None:
            return cls(path=None, identity=None)
        try:
            st = path.stat()
        except OSError:
            return cls(path=path, identity=None)
        return cls(path=path, identity=(st.st_dev, st.st_ino))

    def check(self) -> None:
        """Raise supervise.Fatal if the file is gone or another file took its name."""
        if self.path is None or self.identity is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise supervise.Fatal(
                f"database error: {self.path} was deleted while the daemon ran; stopping "
                "(restore it, or run `migrate` for a new one, then start again)") from None
        except OSError as exc:
            raise supervise.Fatal(f"database error: cannot stat {self.path}: "
                                  f"{exc.strerror}") from None
        if (st.st_dev, st.st_ino) != self.identity:
            raise supervise.Fatal(
                f"database error: {self.path} was replaced by another file while the daemon "
                "ran; stopping")


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names; None for another database or an in-memory one."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


# -- reload -----------------------------------------------------------------------------------
#: What a reload may change; anything else needs a restart.
RELOADABLE_DAEMON = frozenset({"max_jobs_held", "max_claims", "rescan_s"})
RELOADABLE_SERVICE = frozenset({"max_in_flight", "job_timeout_s", "poll", "retry",
                                "resubmit_on", "max_resubmits"})
#: Top-level sections a reload may change freely (watches) or in part (daemon, services).
_FREE_SECTIONS = frozenset({"watches"})


def _fields(obj: object) -> dict[str, Any]:
    """A settings object's fields (dataclass or pydantic model) by name."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    model_fields = getattr(type(obj), "model_fields", None)
    if model_fields is not None:
        return {name: getattr(obj, name) for name in model_fields}
    return dict(vars(obj))


def _changed(old: object, new: object, allowed: frozenset[str]) -> str | None:
    a, b = _fields(old), _fields(new)
    for key in sorted(a.keys() | b.keys()):
        if key not in allowed and a.get(key) != b.get(key):
            return key
    return None


def reload_refusal(old: config.Settings, new: config.Settings) -> str | None:
    """Pure: why `new` cannot replace `old` in a running daemon (one line), or None."""
    restart = "changed: restart the daemon to apply it (the old configuration is kept)"
    top_old, top_new = _fields(old), _fields(new)
    for key in sorted(top_old.keys() | top_new.keys()):
        if key in _FREE_SECTIONS:
            continue
        if key == "daemon":
            sub = _changed(old.daemon, new.daemon, RELOADABLE_DAEMON)
            if sub is not None:
                return f"reload: daemon.{sub} {restart}"
        elif key == "services":
            if set(old.services) != set(new.services):
                return f"reload: the set of services {restart}"
            for name, svc in old.services.items():
                sub = _changed(svc, new.services[name], RELOADABLE_SERVICE)
                if sub is not None:
                    return f"reload: services.{name}.{sub} {restart}"
        elif top_old.get(key) != top_new.get(key):
            return f"reload: {key} {restart}"
    return None


def exit_message(outcome: Outcome) -> str:
    """`run --once`'s summary line."""
    s, counts = outcome.stats, outcome.counts
    return (f"run --once: {s.done} done, {s.failed} failed, {s.cancelled} cancelled"
            f" (database: {sum(counts.values())} jobs; "
            + ", ".join(f"{k.value} {v}" for k, v in sorted(counts.items()) if v) + ")")

