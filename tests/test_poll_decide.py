"""The poll step's pure decision: what a status report means for a job."""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from pathlib import Path

import pytest

from orchestrator import config, jobs, lifecycle, steps
from orchestrator.backends import base
from orchestrator.backends.bes import backend as bes_backend
from orchestrator.backends.bes import protocol
from orchestrator.steps import poll

NOW = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)


def service(**kw: object) -> config.BesService:
    return config.BesService(
        name="svc", base_url="http://127.0.0.1:1", workspace="w", service="s",
        api_key=config.Secret("k" * 10), output_dir=Path("/o"),
        archive_dir=Path("/a"), failed_dir=Path("/f"), **kw)  # type: ignore[arg-type]


def job(**kw: object) -> jobs.Job:
    base = jobs.Job(
        id="a" * 32, state=lifecycle.JobState.STARTED, service="svc", watch=None,
        claim_key="k", source_path="/in/x.csv", input_name="x.csv", input_path="/spool/x.csv",
        input_sha256=None, input_size=None, output_dir="/o", archive_dir="/a", failed_dir="/f",
        bes_job_id="b" * 32, bes_status="Running", result_refs={}, outputs={}, error=None,
        error_code=None, attempts=1, runs=1, poll_count=3, resubmits=0,
        cancel_requested=False, lease_owner="me", lease_expires_at=None, next_run_at=NOW,
        deadline_at=None, created_at=NOW, updated_at=NOW, submitted_at=NOW, started_at=NOW,
        finished_at=None)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


RNG = random.Random(0)


def failed(details: str) -> base.Report:
    """A BES Failed status, as the BES backend reports it through the seam."""
    return bes_backend.to_report(
        protocol.StatusReport(status=protocol.BesStatus.FAILED, results={}, details=details))


def test_storage_failure_is_resubmitted_not_failed() -> None:
    svc = service()
    r = poll.decide(job(), failed("input1: cannot reach storage at http://x to read c/b"), svc,
                    rng=RNG)
    assert isinstance(r, steps.Advance)
    assert r.to is lifecycle.JobState.ACCEPTED
    assert r.fields["resubmits"] == 1 and r.fields["bes_job_id"] is None


def test_resubmits_are_bounded() -> None:
    svc = service(max_resubmits=2)
    r = poll.decide(job(resubmits=2), failed("Unable to connect to the remote server"), svc,
                    rng=RNG)
    assert isinstance(r, steps.Fail) and r.code == "BesJobFailed"


@pytest.mark.parametrize("details", ["Column 'Col2' not found", "", "input1 is empty"])
def test_input_failures_fail(details: str) -> None:
    svc = service()
    r = poll.decide(job(), failed(details), svc, rng=RNG)
    assert isinstance(r, steps.Fail) and r.code == "BesJobFailed"
    assert details in r.message


def test_running_waits_with_backoff_capped() -> None:
    svc = service(poll=config.PollPolicy(initial_s=2, multiplier=2, max_s=30, jitter=0))
    report = bes_backend.to_report(
        protocol.StatusReport(status=protocol.BesStatus.RUNNING, results={}, details=""))
    r = poll.decide(job(poll_count=10), report, svc, rng=RNG)
    assert isinstance(r, steps.Wait) and r.delay_s == 30 and r.poll_count == 11


def test_bes_status_words_map_to_phases_and_stay_in_the_history() -> None:
    for status, phase in [(protocol.BesStatus.NOT_STARTED, base.Phase.QUEUED),
                          (protocol.BesStatus.RUNNING, base.Phase.RUNNING),
                          (protocol.BesStatus.FINISHED, base.Phase.FINISHED),
                          (protocol.BesStatus.FAILED, base.Phase.FAILED),
                          (protocol.BesStatus.CANCELLED, base.Phase.CANCELLED)]:
        report = bes_backend.to_report(protocol.StatusReport(status=status, results={},
                                                             details=""))
        assert report.phase is phase and report.status == status.value


def test_other_backends_name_their_failures_and_never_resubmit() -> None:
    rrs = config.RrsService(
        name="svc", base_url="http://127.0.0.1:1", workspace="w", service="s",
        api_key=config.Secret("k" * 10), output_dir=Path("/o"), archive_dir=Path("/a"),
        failed_dir=Path("/f"))
    report = base.Report(phase=base.Phase.FAILED, status="Failed",
                         details="Unable to connect to the remote server")
    r = poll.decide(job(), report, rrs, rng=RNG, noun="RRS request", code_prefix="Rrs")
    assert isinstance(r, steps.Fail) and r.code == "RrsJobFailed"
    assert r.message.startswith("the RRS request failed: Unable to connect")
    assert r.fields == {"bes_status": "Failed"}
    cancelled = base.Report(phase=base.Phase.CANCELLED, status="Canceled", details="by hand")
    r = poll.decide(job(), cancelled, rrs, rng=RNG, noun="batch job", code_prefix="Batch")
    assert isinstance(r, steps.Fail) and r.code == "BatchJobCancelled"
    assert r.fields == {"bes_status": "Canceled"}
