"""The backend seam: the common result writer, the RRS backend's pure parts and its calls to the
emulator over real HTTP, the error classes no retry can fix, and the backend metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pydantic
import pytest
from aiohttp import web

from orchestrator import config, errors, jobs, lifecycle, metrics
from orchestrator.backends import base, registry, results
from orchestrator.backends.bes import backend as bes_backend
from orchestrator.backends.bes import client as client_mod
from orchestrator.backends.rrs import backend as rrs
from orchestrator.emulator import hashing
from orchestrator.emulator import options as emu_options
from orchestrator.emulator import server as emu_server

API_KEY = "seam-test-api-key-0123456789"
NOW = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)


def _dirs() -> dict[str, Any]:
    return dict(output_dir=Path("/o"), archive_dir=Path("/a"), failed_dir=Path("/f"))


def _rrs_service(base_url: str, **kw: Any) -> config.RrsService:
    return config.RrsService(name="rrs", base_url=base_url, workspace="ws1", service="hashing",
                             api_key=config.Secret(API_KEY), request_timeout_s=5.0,
                             **_dirs(), **kw)


def _job(tmp_path: Path, content: bytes, name: str = "in.csv") -> jobs.Job:
    path = tmp_path / "spool.csv"
    path.write_bytes(content)
    return jobs.Job(
        id="c" * 32, state=lifecycle.JobState.STARTED, service="rrs", watch=None,
        claim_key="k", source_path=str(path), input_name=name, input_path=str(path),
        input_sha256=None, input_size=None, output_dir=str(tmp_path / "out"),
        archive_dir="/a", failed_dir="/f", bes_job_id="rrs-" + "c" * 32, bes_status="Ready",
        result_refs={}, outputs={}, error=None, error_code=None, attempts=1, runs=1,
        poll_count=0, resubmits=0, cancel_requested=False, lease_owner="me",
        lease_expires_at=None, next_run_at=NOW, deadline_at=None, created_at=NOW,
        updated_at=NOW, submitted_at=NOW, started_at=NOW, finished_at=None)


@contextlib.asynccontextmanager
async def _stream(*chunks: bytes | Exception) -> AsyncIterator[AsyncIterator[bytes]]:
    async def gen() -> AsyncIterator[bytes]:
        for c in chunks:
            if isinstance(c, Exception):
                raise c
            yield c

    yield gen()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# ---- the common result writer ------------------------------------------------------------


async def test_result_is_written_whole_and_private(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "a.output1.csv"
    size, landed = await results.write(_stream(b"h\r\n", b"1\r\n"), dest, None)
    assert (size, landed) == (6, dest)
    assert dest.read_bytes() == b"h\r\n1\r\n"
    assert os.stat(dest).st_mode & 0o777 == 0o640
    assert os.listdir(dest.parent) == ["a.output1.csv"]


async def test_unique_name_rule_keeps_another_jobs_result(tmp_path: Path) -> None:
    dest, alt = tmp_path / "a.output1.csv", tmp_path / "a.1234abcd.output1.csv"
    dest.write_bytes(b"someone else's\n")
    _, landed = await results.write(_stream(b"mine\n"), dest, alt)
    assert landed == alt and alt.read_bytes() == b"mine\n"
    assert dest.read_bytes() == b"someone else's\n"
    # The same bytes again (a repeat after a crash): kept where they are, nothing new.
    _, landed = await results.write(_stream(b"someone else's\n"), dest, alt)
    assert landed == dest
    assert sorted(os.listdir(tmp_path)) == ["a.1234abcd.output1.csv", "a.output1.csv"]


async def test_a_stream_that_breaks_leaves_nothing_behind(tmp_path: Path) -> None:
    dest = tmp_path / "a.output1.csv"
    broken = errors.TransientError("ended early", code="Truncated")
    with pytest.raises(errors.TransientError) as info:
        await results.write(_stream(b"part", broken), dest, None)
    assert info.value.code == "Truncated"
    assert os.listdir(tmp_path) == []
    # An aiohttp error that slipped through a stream is still transient, not "unwritable".
    with pytest.raises(errors.TransientError):
        await results.write(_stream(b"x", aiohttp.ClientPayloadError("cut")), dest, None)
    assert os.listdir(tmp_path) == []


async def test_an_unwritable_folder_is_permanent(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(errors.PermanentError) as info:
        await results.write(_stream(b"x"), tmp_path / "file" / "r.csv", None)
    assert info.value.code == "ResultUnwritable"


# ---- RRS, pure ---------------------------------------------------------------------------


def test_rrs_limits_name_the_limit_and_point_to_bes() -> None:
    assert rrs.too_large(name="a.csv", rows=3, size=10, max_rows=3, max_bytes=10) is None
    rows = rrs.too_large(name="a.csv", rows=4, size=10, max_rows=3, max_bytes=10)
    assert rows is not None and "4 rows" in rows and "max_rows" in rows
    assert 'use kind = "bes"' in rows
    size = rrs.too_large(name="a.csv", rows=None, size=11, max_rows=3, max_bytes=10)
    assert size is not None and "11 bytes" in size and "max_bytes" in size


def test_rrs_reads_csv_with_bom_quotes_and_blank_lines() -> None:
    table = rrs.parse_csv('\ufeffCol1,Col2\r\n1,"a, b"\r\n\r\n2,"say ""hi"""\n'.encode(),
                          "x.csv")
    assert table.columns == ["Col1", "Col2"]
    assert [list(r) for r in table.rows] == [["1", "a, b"], ["2", 'say "hi"']]
    body = rrs.execute_body(table, "input1", {"bits": "3"})
    assert body == {"Inputs": {"input1": {"ColumnNames": ["Col1", "Col2"],
                                          "Values": [["1", "a, b"], ["2", 'say "hi"']]}},
                    "GlobalParameters": {"bits": "3"}}
    with pytest.raises(errors.PermanentError, match="UTF-8"):
        rrs.parse_csv(b"\xff\xfe\x00", "x.csv")
    with pytest.raises(errors.PermanentError, match="empty"):
        rrs.parse_csv(b"\n\n", "x.csv")


def test_rrs_answer_becomes_csv_text() -> None:
    answer = {"Results": {"output1": {"type": "table", "value": {
        "ColumnNames": ["Col2", "f1"], "ColumnTypes": ["String", "Int32"],
        "Values": [["a, b", 1], [None, 0]]}}}}
    tables = rrs.parse_answer(answer)
    assert rrs.table_text(tables["output1"], ".csv") == b'Col2,f1\r\n"a, b",1\r\n,0\r\n'
    assert rrs.table_text(tables["output1"], ".tsv") == b"Col2\tf1\r\na, b\t1\r\n\t0\r\n"
    bare = rrs.parse_answer({"Results": {"o": {"ColumnNames": ["x"], "Values": [["1"]]}}})
    assert list(bare["o"].rows) == [["1"]]
    for bad in (None, {}, {"Results": {"o": {"ColumnNames": "x", "Values": []}}},
                {"Results": {"o": {"ColumnNames": ["x"], "Values": ["1"]}}}):
        with pytest.raises(errors.PermanentError):
            rrs.parse_answer(bad)


# ---- RRS over real HTTP (the emulator in this process) ------------------------------------


@pytest.fixture
async def emulator() -> AsyncIterator[str]:
    opts = emu_options.EmulatorOptions(api_key=pydantic.SecretStr(API_KEY), seed=1)
    async with emu_server.running(opts) as url:
        yield url


async def test_rrs_status_runs_the_call_and_result_streams_as_csv(
    emulator: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    backend = rrs.RrsBackend(_rrs_service(emulator), session)
    job = _job(tmp_path, b'Col1,Col2\n1,"This is a good day"\n')
    assert "1 rows" in await backend.prepare_input(job)
    submitted = await backend.submit(job, maybe_submitted=False)
    assert submitted.remote_id == f"rrs-{job.id}"
    report = await backend.status(job)
    assert report.phase is base.Phase.FINISHED and report.status == "Finished"
    ref = report.results["output1"]
    assert ref.public_url.endswith("/services/hashing/execute#output1")
    size, landed = await results.write(backend.open_result(ref), tmp_path / "r.csv", None)
    lines = landed.read_text().splitlines()
    assert lines[0].startswith("Col1,Col2,Col2 - Hashing feature 1")
    assert [int(v) for v in lines[1].split(",")[2:]] == hashing.feature_counts(
        "This is a good day", bits=3, ngrams=2)
    assert size == landed.stat().st_size


async def test_rrs_refused_input_is_a_failed_report_and_limits_fail_before_any_call(
    emulator: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    backend = rrs.RrsBackend(_rrs_service(emulator, max_rows=1), session)
    report = await backend.status(_job(tmp_path, b"Col1,Text\n1,hello\n"))
    assert report.phase is base.Phase.FAILED and report.status == "Failed"
    assert "Col2" in report.details and API_KEY not in report.details
    with pytest.raises(errors.PermanentError) as info:
        await backend.prepare_input(_job(tmp_path, b"Col1,Col2\n1,a\n2,b\n"))
    assert info.value.code == "TooLargeForRrs"


async def test_rrs_wrong_key_is_permanent_not_retried(
    emulator: str, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    svc = _rrs_service(emulator).model_copy(update={"api_key": config.Secret("wrong-key-xyz")})
    with pytest.raises(errors.PermanentError) as info:
        await rrs.RrsBackend(svc, session).status(_job(tmp_path, b"Col1,Col2\n1,a\n"))
    assert info.value.status == 401


def test_registry_builds_the_backend_the_kind_names() -> None:
    assert set(registry.BUILDERS) >= {"bes", "rrs"}
    assert registry.kind_of(_rrs_service("http://127.0.0.1:1")) == "rrs"
    assert registry.kind_of(object()) == base.DEFAULT_KIND


# ---- errors no retry can fix; metrics ----------------------------------------------------


@pytest.mark.parametrize("url", ["http://", "http:///workspaces/w/services/s", "nohost"])
async def test_a_url_without_a_host_is_permanent(session: aiohttp.ClientSession,
                                                 url: str) -> None:
    svc = config.BesService(name="badurl", base_url="http://127.0.0.1:1", workspace="w",
                            service="s", api_key=config.Secret(API_KEY), **_dirs())
    client = client_mod.BesClient(svc, session, service_url=url)
    before = metrics.backend_calls.labels("badurl", "status", "error")._value.get()
    with pytest.raises(errors.PermanentError) as info:
        await client.status("abc")
    assert info.value.code == "BadUrl"
    assert metrics.backend_calls.labels("badurl", "status", "error")._value.get() == before + 1


async def test_calls_are_counted_by_status_class_with_latency_and_throttling(
    session: aiohttp.ClientSession,
) -> None:
    answers = [web.json_response({"statusCode": 429, "message": "slow down"}, status=429,
                                 headers={"Retry-After": "0"}),
               web.json_response({"StatusCode": "Running", "Results": None, "Details": ""})]

    async def handler(_request: web.Request) -> web.StreamResponse:
        return answers.pop(0)

    app = web.Application()
    app.router.add_get("/workspaces/w/services/s/jobs/{job_id}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        svc = config.BesService(name="metered", base_url=f"http://{host}:{port}", workspace="w",
                                service="s", api_key=config.Secret(API_KEY), **_dirs())
        client = client_mod.BesClient(svc, session)
        with pytest.raises(errors.ThrottledError):
            await client.status("job1")
        report = bes_backend.to_report(await client.status("job1"))
        assert report.phase is base.Phase.RUNNING and report.status == "Running"
    finally:
        await runner.cleanup()

    def value(metric: Any, *labels: str) -> float:
        got = metric.labels(*labels)._value.get()
        assert isinstance(got, float)
        return got

    assert value(metrics.backend_calls, "metered", "status", "4xx") == 1
    assert value(metrics.backend_calls, "metered", "status", "2xx") == 1
    assert value(metrics.throttled, "metered") == 1
    count = [s.value for s in next(iter(metrics.backend_call_seconds.collect())).samples
             if s.name.endswith("_count") and s.labels == {"service": "metered",
                                                            "operation": "status"}]
    assert count == [2]


def test_report_and_submitted_are_plain_records() -> None:
    r = base.Report(phase=base.Phase.QUEUED, status="NotStarted")
    assert r.results == {} and r.details == ""
    assert base.TERMINAL_PHASES == {base.Phase.FINISHED, base.Phase.FAILED,
                                    base.Phase.CANCELLED}
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.status = "x"  # type: ignore[misc]


async def test_rrs_413_says_to_use_bes(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"code": "RequestEntityTooLarge",
                                            "message": "The request is too large."}},
                                 status=413)

    app = web.Application()
    app.router.add_post("/workspaces/ws1/services/hashing/execute", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        host, port = runner.addresses[0][:2]
        backend = rrs.RrsBackend(_rrs_service(f"http://{host}:{port}"), session)
        with pytest.raises(errors.PermanentError) as info:
            await backend.status(_job(tmp_path, b"Col1,Col2\n1,a\n"))
    finally:
        await runner.cleanup()
    assert info.value.status == 413 and info.value.code == "RequestEntityTooLarge"
    assert 'use kind = "bes"' in str(info.value)
