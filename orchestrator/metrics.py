"""Prometheus metrics: every instrument the daemon updates, declared once.

The engine, the backends and intake update these objects in place (a counter increment is a
few hundred nanoseconds); `orchestrator.web` exposes `REGISTRY` at `GET /metrics`. Label values
are bounded: service names, step names, state names, backend statuses, status classes and fixed
reasons; never a file name or a job id.

Gauges that mirror the database (jobs by service and state, the oldest job per state) are not
kept in step by the code that moves jobs: they are read from the database at scrape time
(`DatabaseCollector`, filled by `orchestrator.web` just before each scrape). The database is
the truth shared by every daemon, `jobs retry`/`cancel` and `submit` on it; a counter kept in
one process would miss what the others did and drift after every restart. Every daemon on a
shared database therefore reports the same values: aggregate them with `max`, not `sum`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import prometheus_client as prom
from prometheus_client import core as prom_core
from prometheus_client import registry as prom_registry

#: One registry for the daemon (not the library's global one): tests and several daemons in one
#: process stay apart. Process and platform collectors are added by `register_process_metrics`.
REGISTRY = prom.CollectorRegistry(auto_describe=True)
_P = "bes_orchestrator_"

#: Seconds: from sub-second HTTP calls to hour-long jobs.
_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_JOB_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
                21600.0, 86400.0)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

jobs_finished = prom.Counter(
    _P + "jobs_finished", "Jobs that reached a terminal state in this process",
    ["service", "outcome"], registry=REGISTRY)
job_duration = prom.Histogram(
    _P + "job_duration_seconds", "From intake to terminal state, for jobs finished here",
    ["service", "outcome"], buckets=_JOB_BUCKETS, registry=REGISTRY)

backend_calls = prom.Counter(
    _P + "backend_calls", "Calls to a backend service by operation and HTTP status class "
    "(2xx, 4xx, 5xx, or 'error' for no response)",
    ["service", "operation", "status_class"], registry=REGISTRY)
backend_call_seconds = prom.Histogram(
    _P + "backend_call_seconds", "Latency of backend calls",
    ["service", "operation"], buckets=_CALL_BUCKETS, registry=REGISTRY)
transient_errors = prom.Counter(
    _P + "transient_errors", "Step errors retried with backoff", ["service"], registry=REGISTRY)
internal_errors = prom.Counter(
    _P + "internal_errors", "Unexpected exceptions in a step (bugs)", ["service"],
    registry=REGISTRY)
throttled = prom.Counter(
    _P + "throttled", "Throttling answers (429, or 403/503 with Retry-After) that paused a service",
    ["service"], registry=REGISTRY)
polls = prom.Counter(
    _P + "polls", "Status polls sent", ["service"], registry=REGISTRY)

schedule_lateness = prom.Histogram(
    _P + "schedule_lateness_seconds", "How late a due job was picked up by an executor",
    buckets=_LAG_BUCKETS, registry=REGISTRY)
executors = prom.Gauge(
    _P + "executors", "Step executors in the pool", registry=REGISTRY)
executors_busy = prom.Gauge(
    _P + "executors_busy", "Step executors running a step now", registry=REGISTRY)
jobs_held = prom.Gauge(
    _P + "jobs_held", "Jobs this daemon holds a lease on", registry=REGISTRY)
leases_renewed = prom.Counter(
    _P + "leases_renewed", "Job leases renewed by the heartbeat", registry=REGISTRY)
leases_lost = prom.Counter(
    _P + "leases_lost", "Jobs dropped because another worker or a person took them",
    registry=REGISTRY)

files_seen = prom.Counter(
    _P + "intake_files_seen", "Settled files the watcher offered", ["service"],
    registry=REGISTRY)
files_claimed = prom.Counter(
    _P + "intake_files_claimed", "Inputs that became jobs (folder or queue)", ["service"],
    registry=REGISTRY)
files_rejected = prom.Counter(
    _P + "intake_files_rejected", "Files not taken, by reason", ["reason"], registry=REGISTRY)
bytes_uploaded = prom.Counter(
    _P + "uploaded_bytes", "Input bytes uploaded to storage", ["service"], registry=REGISTRY)
bytes_downloaded = prom.Counter(
    _P + "downloaded_bytes", "Result bytes downloaded", ["service"], registry=REGISTRY)


ready = prom.Gauge(
    _P + "ready", "1 when the daemon is ready (migrations current, database reachable, intake "
    "up), as /readyz says; checked at scrape time, at most every 30 s while ready",
    registry=REGISTRY)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DatabaseSnapshot:
    """What the database held at one moment, for the scrape-time gauges."""

    #: (service, state) -> jobs, every state of every known service (zeros included).
    jobs: Mapping[tuple[str, str], int]
    #: (service, state) -> age in seconds of the oldest job in that active state (by created_at).
    oldest_age_s: Mapping[tuple[str, str], float]
    #: (service, backend status) -> unfinished jobs the backend reported in that status.
    remote: Mapping[tuple[str, str], int]
    #: (service, backend status) -> seconds since the oldest of those was submitted.
    oldest_remote_age_s: Mapping[tuple[str, str], float]
    #: Seconds the database queries took (the scrape's own cost, for the curious).
    query_s: float


class DatabaseCollector(prom_registry.Collector):
    """Exposes the last `DatabaseSnapshot`; yields nothing until the first one is set."""

    def __init__(self) -> None:
        self.snapshot: DatabaseSnapshot | None = None

    def describe(self) -> Iterable[prom_core.Metric]:
        # Names only, so registering does not call collect() (no database yet).
        return list(self._families(None))

    def collect(self) -> Iterable[prom_core.Metric]:
        return list(self._families(self.snapshot))

    @staticmethod
    def _families(snap: DatabaseSnapshot | None) -> Iterable[prom_core.Metric]:
        jobs_g = prom_core.GaugeMetricFamily(
            _P + "jobs", "Jobs in the database by service and state (read at scrape time)",
            labels=["service", "state"])
        oldest = prom_core.GaugeMetricFamily(
            _P + "oldest_job_age_seconds",
            "Age of the oldest job in each unfinished state (since it was created)",
            labels=["service", "state"])
        remote = prom_core.GaugeMetricFamily(
            _P + "jobs_backend_status",
            "Unfinished jobs by the last status the backend reported (NotStarted, Running, …)",
            labels=["service", "backend_status"])
        oldest_remote = prom_core.GaugeMetricFamily(
            _P + "oldest_backend_status_age_seconds",
            "Seconds since the oldest unfinished job in each backend status was submitted",
            labels=["service", "backend_status"])
        query = prom_core.GaugeMetricFamily(
            _P + "database_scrape_seconds", "Time the scrape-time database queries took")
        if snap is not None:
            for (service, state), n in sorted(snap.jobs.items()):
                jobs_g.add_metric([service, state], n)
            for (service, state), age in sorted(snap.oldest_age_s.items()):
                oldest.add_metric([service, state], age)
            for (service, status), n in sorted(snap.remote.items()):
                remote.add_metric([service, status], n)
            for (service, status), age in sorted(snap.oldest_remote_age_s.items()):
                oldest_remote.add_metric([service, status], age)
            query.add_metric([], snap.query_s)
        return (jobs_g, oldest, remote, oldest_remote, query)


#: Filled by `orchestrator.web` before each scrape (cached briefly: see `web.server`).
database = DatabaseCollector()
REGISTRY.register(database)


def status_class(status: int | None) -> str:
    """The label for an HTTP status: '2xx' … '5xx', or 'error' when no answer came."""
    return "error" if status is None else f"{status // 100}xx"


_process_registered = False


def register_process_metrics() -> None:
    """Add the library's process, platform and GC collectors to `REGISTRY` (once)."""
    global _process_registered
    if _process_registered:
        return
    prom.ProcessCollector(registry=REGISTRY)
    prom.PlatformCollector(registry=REGISTRY)
    prom.GCCollector(registry=REGISTRY)
    _process_registered = True
