"""`GET /metrics` of the real daemon (the CLI as a subprocess) after a run on the emulator and
Azurite with done, failed and in-flight jobs: the values equal what `job_history` says."""

from __future__ import annotations

import contextlib
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import azurite as azurite_mod
from tests import harness, test_web

XSS_NAME = test_web.XSS_NAME
GOOD = ["Col1,Col2\n1,This is a good day\n", "Col1,Col2\n2,What a lovely film\n",
        "Col1,Col2\n3,Terrible service\n"]
NO_COL2 = "Col1,Text\n1,no second column here\n"


@dataclass
class MixedRun:
    setup: harness.Setup
    url: str  #: the daemon's HTTP endpoint
    daemon: Any

    def history(self) -> list[dict[str, Any]]:
        with contextlib.closing(sqlite3.connect(self.setup.root / "state.db")) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("select * from job_history")]

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
            return str(r.read().decode())


@contextlib.contextmanager
def mixed_run(root: Path, azurite: azurite_mod.Azurite, *, stuck_after_s: float = 3600
              ) -> Iterator[MixedRun]:
    """The daemon with its HTTP endpoint on, after: three inputs done, two failed (one of them
    named like an HTML tag, both without the column the model needs), two in flight on a
    service whose jobs wait in NotStarted for ten minutes."""
    port = test_web.free_port()
    with harness.emulator() as fast, harness.emulator("--queue-delay-s", "600") as slow:
        slow_service = harness.table("services.slow", {
            "base_url": slow.url, "workspace": "ws1", "service": "hashing",
            "api_key_env": harness.API_KEY_ENV,
            "poll": {"initial_s": 0.2, "multiplier": 1.5, "max_s": 1.0, "jitter": 0.1}})
        slow_watch = harness.table("[watch]", {"folder": "slowbox", "service": "slow",
                                               "settle_s": 0.2, "create": True})
        http = harness.table("http", {"listen": f"127.0.0.1:{port}",
                                      "stuck_after_s": stuck_after_s})
        setup = harness.make_setup(root, emulator_url=fast.url,
                                   storage_connection_string=azurite.connection_string,
                                   watch={"create": True},
                                   extra=slow_service + slow_watch + http)
        setup.cli("migrate")
        for i, text in enumerate(GOOD):
            setup.drop(f"good{i}.csv", text)
        setup.drop(XSS_NAME, NO_COL2)
        setup.drop("nocol.csv", NO_COL2)
        (root / "slowbox").mkdir(exist_ok=True)
        for i in range(2):
            tmp = root / f".slow{i}.tmp"
            tmp.write_text(GOOD[i])
            tmp.rename(root / "slowbox" / f"slow{i}.csv")
        proc = setup.start_daemon()
        run = MixedRun(setup=setup, url=f"http://127.0.0.1:{port}", daemon=proc)
        try:
            def settled() -> bool:
                if proc.poll() is not None:
                    raise AssertionError((root / "daemon.log").read_text()[-3000:])
                rows = run.history() if (root / "state.db").exists() else []
                fast_done = [r for r in rows if r["service"] == "svc"
                             and r["state"] in ("done", "failed")]
                waiting = [r for r in rows if r["service"] == "slow"
                           and r["state"] == "started" and r["bes_status"] == "NotStarted"]
                return len(fast_done) == 5 and len(waiting) == 2

            harness.wait_for(settled, 120, 0.3, "5 jobs ended and 2 waiting in NotStarted")
            yield run
        finally:
            harness.stop(proc)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return test_web.samples(text)


def value(got: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_equal_the_job_history(tmp_path: Path, azurite: azurite_mod.Azurite) -> None:
    with mixed_run(tmp_path, azurite) as run:
        time.sleep(1.1)  # past the endpoint's one-second cache of database values
        text = run.get("/metrics")
        history = run.history()
    got = samples(text)
    for _, labels in got:  # bounded labels: never a file name or a job id
        for _, v in labels:
            assert ".csv" not in v and not any(v == h["job_id"] for h in history)
    counts: dict[tuple[str, str], int] = {}
    for h in history:
        counts[(h["service"], h["state"])] = counts.get((h["service"], h["state"]), 0) + 1
    assert counts == {("svc", "done"): 3, ("svc", "failed"): 2, ("slow", "started"): 2}, [
        (h["input_name"], h["state"], h["error"]) for h in history]
    for service in ("svc", "slow"):
        for state in ("claimed", "accepted", "uploaded", "submitted", "started",
                      "remote_finished", "downloaded", "failing", "cancelling", "done",
                      "failed", "cancelled"):
            assert value(got, "bes_orchestrator_jobs", service=service, state=state) == (
                counts.get((service, state), 0)), (service, state)
    # Finished in this process: the counter and the histogram agree with the history.
    for outcome in ("done", "failed"):
        n = counts[("svc", outcome)]
        assert value(got, "bes_orchestrator_jobs_finished_total", service="svc",
                     outcome=outcome) == n
        assert value(got, "bes_orchestrator_job_duration_seconds_count", service="svc",
                     outcome=outcome) == n
    # The waiting jobs: their backend status and the age of the oldest.
    assert value(got, "bes_orchestrator_jobs_backend_status", service="slow",
                 backend_status="NotStarted") == 2
    oldest = value(got, "bes_orchestrator_oldest_job_age_seconds", service="slow",
                   state="started")
    assert 0 < oldest < 300
    # Intake and backend calls.
    assert value(got, "bes_orchestrator_intake_files_claimed_total", service="svc") == 5
    assert value(got, "bes_orchestrator_intake_files_claimed_total", service="slow") == 2
    assert value(got, "bes_orchestrator_backend_calls_total", service="svc",
                 operation="submit", status_class="2xx") == 5
    sizes = sum(h["input_size"] for h in history if h["service"] == "svc")
    assert value(got, "bes_orchestrator_uploaded_bytes_total", service="svc") == sizes
    assert value(got, "bes_orchestrator_polls_total", service="slow") >= 2
    assert value(got, "bes_orchestrator_jobs_held") == 2
    assert value(got, "bes_orchestrator_ready") == 1
    assert value(got, "process_resident_memory_bytes") > 0


def test_no_secret_on_any_page(tmp_path: Path, azurite: azurite_mod.Azurite) -> None:
    """The API key and the storage key never reach the endpoint's answers."""
    with mixed_run(tmp_path, azurite) as run:
        ids = [h["job_id"] for h in run.history()]
        texts = [run.get(p) for p in ("/", "/metrics", "/healthz", "/readyz",
                                      "/api/files-per-minute", *(f"/jobs/{i}" for i in ids))]
    assert len(texts) == 5 + 7
    for text in texts:
        assert harness.API_KEY not in text
        assert azurite_mod.ACCOUNT_KEY not in text and "AccountKey" not in text
        assert "sig=" not in text
