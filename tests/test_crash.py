"""Crash safety (issue 5, part 1): SIGKILL the daemon at random moments, restart it, and check
that nothing was lost, nothing ran twice and nothing partial is visible.

`run_chaos` is the scenario; `bench/chaos.py` runs it longer with more kills, by hand.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from orchestrator import azurite as azurite_mod
from orchestrator import lifecycle
from orchestrator.emulator import hashing
from tests import harness

pytestmark = pytest.mark.slow

#: Words the per-file texts are made of: every file differs, so a mixed-up result is caught.
WORDS = ["good", "bad", "day", "ramen", "queue", "42", "café", "never", "again", "this", "is"]
#: Every temporary name the daemon (or a writer) could leave behind.
TEMP_MARKERS = (".part", ".tmp")


def texts_for(i: int) -> list[str]:
    rng = random.Random(i)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))) + f" n{i}"
            for _ in range(3)]


def csv_text(texts: list[str]) -> str:
    return "Col1,Col2\n" + "".join(f'{k},"{t}"\n' for k, t in enumerate(texts))


def check_result(path: Path, texts: list[str]) -> None:
    rows = harness.read_csv(path)
    header = rows[0]
    first = header.index("Col2 - Hashing feature 1")
    assert header[first:] == hashing.feature_names("Col2", bits=3)
    assert [r[1] for r in rows[1:]] == texts, path
    for row, text in zip(rows[1:], texts, strict=True):
        assert [int(float(v)) for v in row[first:]] == hashing.feature_counts(
            text, bits=3, ngrams=2), (path, text)


def visible_temp_files(*folders: Path) -> list[Path]:
    found = []
    for folder in folders:
        if folder.exists():
            found += [p for p in folder.rglob("*")
                      if p.name.startswith(".") or p.name.endswith(TEMP_MARKERS)]
    return found


def event_chains(db: Path) -> dict[str, list[tuple[str | None, str, str]]]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "select job_id, from_state, to_state, at from job_events order by id").fetchall()
    finally:
        con.close()
    chains: dict[str, list[tuple[str | None, str, str]]] = {}
    for job_id, frm, to, at in rows:
        chains.setdefault(job_id, []).append((frm, to, at))
    return chains


#: The milestone order a job moves through (FAILING only on the failure path).
ORDER = [s.value for s in (
    lifecycle.JobState.CLAIMED, lifecycle.JobState.ACCEPTED, lifecycle.JobState.UPLOADED,
    lifecycle.JobState.SUBMITTED, lifecycle.JobState.STARTED, lifecycle.JobState.REMOTE_FINISHED,
    lifecycle.JobState.DOWNLOADED, lifecycle.JobState.DONE)]


def check_chain(job_id: str, chain: list[tuple[str | None, str, str]]) -> None:
    """Each event starts where the previous one ended, time never goes back, and states only
    move forward along the pipeline, one milestone at a time (same-state events record a
    lease takeover or a BES status change)."""
    prev_to: str | None = None
    prev_at = ""
    for frm, to, at in chain:
        assert frm == prev_to, (job_id, chain)
        assert at >= prev_at, (job_id, chain)
        if frm != to:
            assert ORDER.index(to) == (ORDER.index(frm) + 1 if frm else 0), (job_id, chain)
        prev_to, prev_at = to, at
    assert prev_to == "done", (job_id, chain)


@dataclasses.dataclass(kw_only=True)
class ChaosReport:
    files: int
    kills: int
    seconds: float
    stats: dict[str, Any]


def run_chaos(
    root: Path, *, azurite_cs: str, files: int, kills: int, gap_s: tuple[float, float],
    run_time_s: str = "0.2,1", seed: int | None = None, log: Any = None,
    drain_timeout_s: float = 90,
) -> ChaosReport:
    """Drop `files` inputs (half before the first start, half while it runs), SIGKILL the
    daemon `kills` times at random moments `gap_s` apart, restarting it each time, then drain
    with `run --once` and check every promise of issue 5 part 1."""
    rng = random.Random(seed)
    began = time.monotonic()
    with harness.emulator("--run-time-s", run_time_s) as emu:
        s = harness.make_setup(
            root, emulator_url=emu.url, storage_connection_string=azurite_cs,
            service={"max_in_flight": 50},
            # Short leases: a killed daemon's jobs are free again soon after the restart.
            daemon={"lease_s": 2.0, "heartbeat_s": 0.5, "rescan_s": 1.0},
            watch={"settle_s": 0.1})
        s.cli("migrate")
        expected = {f"in {i:04d} é.csv": texts_for(i) for i in range(files)}
        names = list(expected)
        for n in names[: files // 2]:
            s.drop(n, csv_text(expected[n]))
        later = names[files // 2:]
        done_kills = 0
        while done_kills < kills:
            log_file = s.root / f"daemon-{done_kills}.log"
            daemon = s.start_daemon(log_name=log_file.name)
            # Count the gap from the daemon's first log line: Python's start-up alone can take
            # longer than a gap, and a kill before the daemon runs tests nothing.
            harness.wait_for(lambda f=log_file: f.stat().st_size > 0, 30, interval=0.05,
                             what="the daemon's first log line")
            time.sleep(rng.uniform(*gap_s))
            for n in later[:max(1, len(later) // max(1, kills - done_kills))]:
                s.drop(n, csv_text(expected[n]))  # files keep arriving while it runs
            later = later[max(1, len(later) // max(1, kills - done_kills)):]
            time.sleep(rng.uniform(0, 0.3))
            if daemon.poll() is not None:
                raise AssertionError(f"daemon exited by itself with {daemon.returncode}")
            harness.stop(daemon, signal.SIGKILL)
            done_kills += 1
            if log is not None:
                log(f"kill {done_kills}: {emu.stats()['starts']} started so far")
        for n in later:
            s.drop(n, csv_text(expected[n]))
        proc = s.cli("run", "--once", timeout=drain_timeout_s)
        assert f"{files} done, 0 failed" in proc.stdout or "0 failed" in proc.stdout, proc.stdout
        stats = emu.stats()
        check_outcome(s, expected, stats)
    return ChaosReport(files=files, kills=done_kills, seconds=time.monotonic() - began,
                       stats=stats)


def check_outcome(s: harness.Setup, expected: dict[str, list[str]], stats: dict[str, Any]
                  ) -> None:
    hist = s.history()
    by_name: dict[str, list[dict[str, Any]]] = {}
    for h in hist:
        by_name.setdefault(h["input_name"], []).append(h)
    # Exactly one job per input, and it is done.
    assert sorted(by_name) == sorted(expected)
    assert all(len(v) == 1 for v in by_name.values()), [k for k, v in by_name.items()
                                                         if len(v) > 1]
    assert {h["state"] for h in hist} == {"done"}
    # Every input sits in exactly one terminal place: the archive.
    assert not [p for p in s.inbox.iterdir() if not p.name.startswith(".")]
    spool = s.root / "state"
    assert not [p for p in spool.iterdir() if p.is_file() and p.suffix == ".csv"]
    assert sorted(p.name for p in s.archive.iterdir()) == sorted(expected)
    assert not s.failed.exists() or not list(s.failed.iterdir())
    for name, texts in expected.items():
        assert (s.archive / name).read_text() == csv_text(texts)
        check_result(s.results / f"{Path(name).stem}.output1.csv", texts)
    assert len(list(s.results.iterdir())) == len(expected)
    assert visible_temp_files(s.results, s.archive, s.inbox) == []
    # BES: every stored job started exactly once; nothing scored twice.
    assert stats["double_starts"] == 0, stats
    assert stats["max_scored_per_job"] <= 1, stats
    started_ids = {h["bes_job_id"] for h in hist}
    assert len(started_ids) == len(expected)
    # Submits may exceed jobs (a crash between submit and storing the id costs an unstarted
    # job); starts may not.
    assert stats["submits"] >= len(expected)
    assert stats["starts"] == len(expected), stats
    chains = event_chains(s.root / "state.db")
    assert len(chains) == len(expected)
    for job_id, chain in chains.items():
        check_chain(job_id, chain)


# Ten kills and restarts over 200 files take 80–110 s on a loaded 2-core box.
@pytest.mark.timeout(300)
def test_sigkill_at_random_moments_loses_nothing(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    report = run_chaos(tmp_path, azurite_cs=azurite.connection_string, files=200, kills=10,
                       gap_s=(0.3, 1.5))
    assert report.kills >= 10
    print(f"crash test: {report.kills} kills survived, {report.files} files, "
          f"{report.seconds:.0f} s, emulator {report.stats}")
