"""The daemon's HTTP endpoint: metrics, health probes and a read-only status page.

It runs on the daemon's own event loop (an aiohttp server beside the worker), off the hot path:
a request only reads the database through the read-only engine and the in-memory metrics.
Nothing here changes a job. With `http.token` set, every request needs
`Authorization: Bearer <token>` (compared in constant time); without one the listener is
loopback-only (the configuration refuses anything else).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hmac
import ipaddress
import json
import re
import time
from collections.abc import Awaitable, Callable

import prometheus_client as prom
from aiohttp import web

from orchestrator import clock, config, errors, lifecycle, logs, metrics
from orchestrator.db import repository
from orchestrator.web import assets, page, queries

log = logs.get("bes.web")

Live = Callable[[], tuple[bool, str]]
Ready = Callable[[], Awaitable[tuple[bool, str]]]

#: Database-derived values are reused for this long: several scrapers (or a page refresh and a
#: scrape) in the same second cost one query, yet a scrape every 15 s always sees fresh counts.
SNAPSHOT_MAX_AGE_S = 1.0
#: Counts of finished jobs need a pass over the whole history (it only grows), so they are
#: recounted at most this often; what happens meanwhile shows in `jobs_finished_total`.
FINISHED_MAX_AGE_S = 60.0
#: The `ready` gauge feeds a "not ready for 5 minutes" alert: a readiness that held is trusted
#: this long before the database is asked again (not ready is asked at every scrape).
READY_GAUGE_MAX_AGE_S = 30.0
READY_TIMEOUT_S = 3.0  #: below a 5 s scrape timeout: a hung check answers "not ready"
IN_FLIGHT_SHOWN = 100
STUCK_SHOWN = 50
FAILURES_SHOWN = 50

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_JOB_ID = re.compile(r"^[0-9a-f]{4,32}$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Listen:
    host: str
    port: int


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json_line(status: int, ok: bool, reason: str) -> web.Response:
    body = json.dumps({"status": "ok" if ok else "fail", "reason": logs.scrub(reason)})
    return web.Response(status=status, text=body + "\n", content_type="application/json")


class _App:
    def __init__(self, settings: config.Settings, repo: repository.Repository, *,
                 live: Live, ready: Ready, token: str | None, stuck_after_s: float) -> None:
        self.settings = settings
        self.repo = repo
        self.engine = queries.read_engine(repo)
        self.live = live
        self.ready = ready
        self._token = None if not token else ("Bearer " + token).encode()
        self.stuck_after_s = stuck_after_s
        self._snapshot: metrics.DatabaseSnapshot | None = None
        self._snapshot_at = -1e9
        self._finished: dict[tuple[str, str], int] = {}
        self._finished_at = -1e9
        self._ready_at = -1e9
        self._snapshot_lock = asyncio.Lock()

    # -- middleware ------------------------------------------------------------------------
    @web.middleware
    async def middleware(
        self, request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if self._token is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._token):
                resp: web.StreamResponse = web.Response(
                    status=401, text="401: a bearer token is required\n",
                    headers={"WWW-Authenticate": 'Bearer realm="bes-orchestrator"'})
                resp.headers.update(_SECURITY_HEADERS)
                return resp
        try:
            resp = await handler(request)
        except web.HTTPException as exc:  # 404, 405: aiohttp's own answers, with our headers
            exc.headers.update(_SECURITY_HEADERS)
            raise
        except Exception as exc:  # a page error must not reach the loop
            log.warning("http_error", path=request.path, error=f"{type(exc).__name__}: {exc}")
            resp = web.Response(
                status=503, content_type="text/html",
                text=page.message_page("unavailable", logs.scrub(
                    f"{type(exc).__name__}: {exc}")))
        resp.headers.update(_SECURITY_HEADERS)
        return resp

    # -- data ------------------------------------------------------------------------------
    async def snapshot(self, *, finished_max_age_s: float | None = None
                       ) -> metrics.DatabaseSnapshot:
        """The database gauges' values, cached (see SNAPSHOT_MAX_AGE_S, FINISHED_MAX_AGE_S)."""
        if finished_max_age_s is None:
            finished_max_age_s = FINISHED_MAX_AGE_S
        async with self._snapshot_lock:
            finished_fresh = time.monotonic() - self._finished_at <= finished_max_age_s
            if self._snapshot is not None and finished_fresh and (
                    time.monotonic() - self._snapshot_at <= SNAPSHOT_MAX_AGE_S):
                return self._snapshot
            started = time.perf_counter()
            active = await queries.active_counts(self.engine)
            if not finished_fresh:
                self._finished = await queries.finished_counts(self.engine)
                self._finished_at = time.monotonic()
            self._snapshot = queries.snapshot(
                active, self._finished, services=self.settings.services, now=clock.now(),
                query_s=time.perf_counter() - started)
            self._snapshot_at = time.monotonic()
            metrics.database.snapshot = self._snapshot
            return self._snapshot

    async def _ready(self) -> tuple[bool, str]:
        try:
            return await asyncio.wait_for(self.ready(), READY_TIMEOUT_S)
        except TimeoutError:
            return False, f"readiness check took longer than {READY_TIMEOUT_S:g} s"
        except Exception as exc:  # any failure of the check: not ready
            return False, f"{type(exc).__name__}: {exc}"

    # -- handlers --------------------------------------------------------------------------
    async def metrics_handler(self, request: web.Request) -> web.Response:
        await self.snapshot()
        if time.monotonic() - self._ready_at > READY_GAUGE_MAX_AGE_S:
            ok, _ = await self._ready()
            metrics.ready.set(1 if ok else 0)
            self._ready_at = time.monotonic() if ok else -1e9  # "not ready" is asked again
        body = prom.generate_latest(metrics.REGISTRY)
        return web.Response(body=body, headers={"Content-Type": prom.CONTENT_TYPE_LATEST})

    def _live(self) -> tuple[bool, str]:
        try:
            return self.live()
        except Exception as exc:  # a failing check is a failed check
            return False, f"{type(exc).__name__}: {exc}"

    async def healthz(self, request: web.Request) -> web.Response:
        ok, reason = self._live()
        return _json_line(200 if ok else 503, ok, reason)

    async def readyz(self, request: web.Request) -> web.Response:
        ok, reason = await self._ready()
        return _json_line(200 if ok else 503, ok, reason)

    async def status_page(self, request: web.Request) -> web.Response:
        now = clock.now()
        # A person looking: finished counts recounted too, so the page's totals add up.
        snap = await self.snapshot(finished_max_age_s=SNAPSHOT_MAX_AGE_S)
        per_minute = await queries.files_per_minute(self.engine, now=now)
        in_flight = await queries.in_flight(self.engine, limit=IN_FLIGHT_SHOWN)
        stuck_total, stuck = await queries.stuck(
            self.engine, older_than=now - dt.timedelta(seconds=self.stuck_after_s),
            limit=STUCK_SHOWN)
        failures = await queries.recent_failures(self.engine, limit=FAILURES_SHOWN)
        active = {s.value for s in lifecycle.ACTIVE_STATES}
        data = page.StatusData(
            now=now, worker=self.settings.daemon.worker_id, live=self._live(),
            ready=await self._ready(), counts=snap.jobs,
            per_minute=per_minute, in_flight=in_flight,
            in_flight_total=sum(n for (_, st), n in snap.jobs.items() if st in active),
            stuck_total=stuck_total, stuck=stuck, stuck_after_s=self.stuck_after_s,
            failures=failures)
        return web.Response(text=page.status_page(data), content_type="text/html")

    async def job_page(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"].lower()
        if not _JOB_ID.match(job_id):
            return web.Response(status=404, content_type="text/html",
                                text=page.message_page("not found", "no such job"))
        try:
            job = await self.repo.get_job(job_id)
        except repository.NotFound:
            return web.Response(status=404, content_type="text/html",
                                text=page.message_page("not found", f"no job {job_id}"))
        except repository.InvalidState as exc:
            return web.Response(status=400, content_type="text/html",
                                text=page.message_page("ambiguous", str(exc)))
        events = await self.repo.events(job.id)
        return web.Response(text=page.job_page(job, events, clock.now()),
                            content_type="text/html")

    async def per_minute_json(self, request: web.Request) -> web.Response:
        points = await queries.files_per_minute(self.engine, now=clock.now())
        return web.json_response([
            {"minute": p.minute.isoformat(), "done": p.done, "failed": p.failed}
            for p in points])

    async def css(self, request: web.Request) -> web.Response:
        return web.Response(text=assets.CSS, content_type="text/css")

    async def js(self, request: web.Request) -> web.Response:
        return web.Response(text=assets.JS, content_type="text/javascript")

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self.middleware], client_max_size=1024)
        app.router.add_get("/", self.status_page, allow_head=True)
        app.router.add_get("/metrics", self.metrics_handler)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/jobs/{job_id}", self.job_page)
        app.router.add_get("/api/files-per-minute", self.per_minute_json)
        app.router.add_get("/static/status.css", self.css)
        app.router.add_get("/static/status.js", self.js)
        return app


class Server:
    """A running listener; `stop()` closes it (in-flight requests get a moment to finish)."""

    def __init__(self, runner: web.AppRunner, listen: Listen) -> None:
        self._runner = runner
        self.listen = listen

    @property
    def port(self) -> int:
        """The bound port (the configured one, or the one the kernel chose for port 0)."""
        for address in self._runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                return int(address[1])
        return self.listen.port

    @property
    def url(self) -> str:
        host = f"[{self.listen.host}]" if ":" in self.listen.host else self.listen.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self._runner.cleanup()


async def start(
    settings: config.Settings, repo: repository.Repository, *, live: Live, ready: Ready
) -> Server:
    """Listen on `settings.http.listen` on the running loop. OSError (address in use, …) is
    raised as ConfigError naming the key, so the daemon exits 78 with one line."""
    http = settings.http
    listen = Listen(host=http.host, port=http.port)
    token = http.token.get() if http.token is not None else None
    if token is None and not _is_loopback(listen.host):
        # The configuration refuses this already; a second look costs nothing.
        raise errors.ConfigError("http.listen", f"{listen.host} is not a loopback address: "
                                 "give http.token_env, token_file or token_credential")
    metrics.register_process_metrics()
    app = _App(settings, repo, live=live, ready=ready, token=token,
               stuck_after_s=float(http.stuck_after_s))
    runner = web.AppRunner(app.application(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, listen.host, listen.port, reuse_address=True)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise errors.ConfigError("http.listen", f"cannot listen on {http.listen}: "
                                 f"{exc.strerror or exc}") from None
    server = Server(runner, listen)
    log.info("http_listening", url=server.url, auth=token is not None)
    return server
