"""BesClient over real HTTP: the BES emulator (with Azurite behind it) for the protocol and its
simulated faults, and a small canned aiohttp server for shapes the emulator does not produce."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pydantic
import pytest
from aiohttp import web

from orchestrator import azurite as azurite_mod
from orchestrator import config, errors
from orchestrator.backends.bes import client as client_mod
from orchestrator.backends.bes import protocol, throttle
from orchestrator.emulator import options as emu_options
from orchestrator.emulator import server as emu_server
from orchestrator.storage import blob, naming

API_KEY = "test-api-key-0123456789abcdef"
APIM_KEY = "apim-subscription-key-fedcba9876"
INPUT_CSV = b"Col1,Col2\n1,This is a good day\n"


def _service(base_url: str, **kw: Any) -> config.BesService:
    defaults: dict[str, Any] = dict(
        name="svc", base_url=base_url, workspace="ws1", service="sentiment",
        api_key=config.Secret(API_KEY), request_timeout_s=5.0,
        output_dir=Path("/nonexistent/out"), archive_dir=Path("/nonexistent/archive"),
        failed_dir=Path("/nonexistent/failed"),
    )
    defaults.update(kw)
    return config.BesService(**defaults)


def _assert_no_secret(exc: BaseException, *extra: str) -> None:
    text = f"{exc} {exc!r} {exc.args!r}"
    for secret in (API_KEY, APIM_KEY, azurite_mod.ACCOUNT_KEY, *extra):
        assert secret not in text, f"{secret!r} leaked into {text!r}"
    assert not re.search(r"sig=(?!\*\*\*)", text), f"a SAS signature leaked into {text!r}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def emulator() -> AsyncIterator[str]:
    opts = emu_options.EmulatorOptions(api_key=pydantic.SecretStr(API_KEY), seed=1)
    async with emu_server.running(opts) as url:
        yield url


async def _configure(session: aiohttp.ClientSession, base: str, **changes: Any) -> None:
    async with session.post(f"{base}/_emulator/config", json=changes) as resp:
        assert resp.status == 200, await resp.text()


async def _stats(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/_emulator/stats") as resp:
        data: dict[str, Any] = await resp.json()
        return data


@pytest.fixture
async def store(azurite: azurite_mod.Azurite, session: aiohttp.ClientSession
                ) -> AsyncIterator[blob.BlobStore]:
    s = blob.BlobStore(config.StorageConfig(
        connection_string=config.Secret(azurite.connection_string),
        container=f"c{uuid.uuid4().hex[:12]}"), session)
    await s.ensure_container()
    try:
        yield s
    finally:
        await s.close()


async def _submit_body(store: blob.BlobStore, tmp_path: Path) -> dict[str, Any]:
    job = uuid.uuid4().hex
    src = tmp_path / f"{job}.csv"
    src.write_bytes(INPUT_CSV)
    in_blob = naming.input_blob_name(job, "input1", ".csv")
    await store.upload_file(src, in_blob)
    return protocol.build_submit_body(
        inputs={"input1": store.reference(in_blob, write=False)},
        outputs={"output1": store.reference(naming.output_blob_name(job, "output1", ".csv"),
                                            write=True)},
        global_parameters={},
    )


async def _wait_terminal(bes: client_mod.BesClient, job_id: str) -> protocol.StatusReport:
    for _ in range(200):
        report = await bes.status(job_id)
        if report.status in protocol.TERMINAL_STATUSES:
            return report
        await asyncio.sleep(0.05)
    raise AssertionError("job did not finish")


# ---- happy path -----------------------------------------------------------------------------


async def test_submit_start_status_download(emulator: str, session: aiohttp.ClientSession,
                                            store: blob.BlobStore, tmp_path: Path) -> None:
    bes = client_mod.BesClient(_service(emulator), session, gate=throttle.ServiceGate())
    swagger = await bes.describe()
    assert swagger["basePath"].endswith("/services/sentiment")

    job_id = await bes.submit(await _submit_body(store, tmp_path))
    assert len(job_id) == 32
    assert (await bes.status(job_id)).status is protocol.BesStatus.NOT_STARTED
    await bes.start(job_id)
    report = await _wait_terminal(bes, job_id)
    assert report.status is protocol.BesStatus.FINISHED, report.details
    ref = report.results["output1"]
    store.check_result_url(ref)  # the emulator points at our own Azurite
    dest = tmp_path / "out" / "x.output1.csv"
    await store.download(ref, dest)
    lines = dest.read_text().splitlines()
    assert lines[0].endswith(",Col2 - Hashing feature 8")
    assert lines[1].split(",")[-8:] == ["1", "1", "2", "2", "0", "2", "0", "1"]

    # Starting a finished job: CannotStartJob, which the caller treats as "already started".
    with pytest.raises(client_mod.StartConflict) as info:
        await bes.start(job_id)
    assert info.value.code == "CannotStartJob"
    assert info.value.status == 400
    assert str(info.value).startswith("HTTP 400 CannotStartJob: ")
    assert isinstance(info.value, errors.PermanentError)

    stats = await _stats(session, emulator)
    assert stats["submits"] == 1 and stats["starts"] == 1 and stats["start_conflicts"] == 1


async def test_integer_status_codes_are_understood(emulator: str, session: aiohttp.ClientSession,
                                                   store: blob.BlobStore, tmp_path: Path) -> None:
    await _configure(session, emulator, int_status=True)
    bes = client_mod.BesClient(_service(emulator), session)
    job_id = await bes.submit(await _submit_body(store, tmp_path))
    await bes.start(job_id)
    assert (await _wait_terminal(bes, job_id)).status is protocol.BesStatus.FINISHED


async def test_cancel_then_cancel_again_and_unknown(emulator: str, session: aiohttp.ClientSession,
                                                    store: blob.BlobStore, tmp_path: Path) -> None:
    await _configure(session, emulator, queue_delay_s=[30, 30])
    bes = client_mod.BesClient(_service(emulator), session)
    job_id = await bes.submit(await _submit_body(store, tmp_path))
    await bes.start(job_id)
    await bes.cancel(job_id)
    await bes.cancel(job_id)  # idempotent
    assert (await bes.status(job_id)).status is protocol.BesStatus.CANCELLED
    await bes.cancel("0" * 32)  # 404: already gone, fine
    assert (await _stats(session, emulator))["deletes"] == 2


# ---- refusals -------------------------------------------------------------------------------


async def test_wrong_api_key_is_permanent_401(emulator: str,
                                              session: aiohttp.ClientSession) -> None:
    bes = client_mod.BesClient(_service(emulator, api_key=config.Secret("wrong-key-123456")),
                               session)
    with pytest.raises(errors.PermanentError) as info:
        await bes.status("0" * 32)
    assert info.value.status == 401
    assert not isinstance(info.value, errors.TransientError)
    _assert_no_secret(info.value, "wrong-key-123456")


async def test_unknown_job_is_permanent_404(emulator: str,
                                            session: aiohttp.ClientSession) -> None:
    bes = client_mod.BesClient(_service(emulator), session)
    with pytest.raises(errors.PermanentError) as info:
        await bes.status("f" * 32)
    assert info.value.status == 404
    assert info.value.code == "JobNotFound"
    with pytest.raises(errors.PermanentError):
        await bes.start("f" * 32)


async def test_bad_submit_keeps_detail_code_and_never_echoes_body(
        emulator: str, session: aiohttp.ClientSession, store: blob.BlobStore,
        tmp_path: Path) -> None:
    bes = client_mod.BesClient(_service(emulator), session)
    body = await _submit_body(store, tmp_path)
    body["Inputs"]["nosuchinput"] = body["Inputs"].pop("input1")
    with pytest.raises(errors.PermanentError) as info:
        await bes.submit(body)
    assert info.value.status == 400
    assert info.value.code not in ("", "BadArgument")  # the specific detail code wins
    _assert_no_secret(info.value)


async def test_job_ids_never_reach_the_url_unchecked(emulator: str,
                                                     session: aiohttp.ClientSession) -> None:
    bes = client_mod.BesClient(_service(emulator), session)
    with pytest.raises(errors.PermanentError):
        await bes.status("../../swagger.json")


# ---- transient trouble and throttling -------------------------------------------------------


async def test_503_is_transient_with_retry_after(emulator: str,
                                                 session: aiohttp.ClientSession) -> None:
    await _configure(session, emulator, error_503_rate=1.0, retry_after_s=7)
    bes = client_mod.BesClient(_service(emulator), session)
    with pytest.raises(errors.TransientError) as info:
        await bes.status("0" * 32)
    exc = info.value
    assert not isinstance(exc, errors.ThrottledError)
    assert exc.status == 503
    assert exc.retry_after_s == 7.0
    assert exc.code in ("TooManyConcurrentRequests", "RequestThrottled")
    _assert_no_secret(exc)


async def test_429_is_throttled_and_pauses_the_service(emulator: str,
                                                       session: aiohttp.ClientSession) -> None:
    await _configure(session, emulator, rate_limit="3/30s")
    gate = throttle.ServiceGate(window_s=30.0)
    bes = client_mod.BesClient(_service(emulator), session, gate=gate)
    for _ in range(3):
        await bes.describe()
    with pytest.raises(errors.ThrottledError) as info:
        await bes.describe()
    exc = info.value
    assert exc.status == 429
    assert exc.retry_after_s is not None and 1 <= exc.retry_after_s <= 30
    assert gate.paused(gate.now())
    assert gate.next_allowed(gate.now()) >= gate.now() + exc.retry_after_s - 1
    assert gate.rate_per_s is not None and gate.rate_per_s <= 3 / 30
    _assert_no_secret(exc)
    # A call while paused waits instead of hitting the gateway again.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await bes.describe()
    assert (await _stats(session, emulator))["http_429"] == 1


async def test_quota_403_with_retry_after_is_throttled(emulator: str,
                                                       session: aiohttp.ClientSession) -> None:
    await _configure(session, emulator, quota="1/60s")
    bes = client_mod.BesClient(_service(emulator), session)
    await bes.describe()
    with pytest.raises(errors.ThrottledError) as info:
        await bes.describe()
    assert info.value.status == 403
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0


async def test_apim_subscription_key_is_sent(session: aiohttp.ClientSession) -> None:
    opts = emu_options.EmulatorOptions(api_key=pydantic.SecretStr(API_KEY),
                                       apim_key=pydantic.SecretStr(APIM_KEY))
    async with emu_server.running(opts) as url:
        good = client_mod.BesClient(
            _service(url, apim_key=config.Secret(APIM_KEY)), session)
        await good.describe()
        bad = client_mod.BesClient(_service(url), session)
        with pytest.raises(errors.PermanentError) as info:
            await bad.describe()
        assert info.value.status == 401
        _assert_no_secret(info.value)


async def test_dropped_connection_is_transient(emulator: str,
                                               session: aiohttp.ClientSession) -> None:
    await _configure(session, emulator, drop_rate=1.0)
    bes = client_mod.BesClient(_service(emulator), session)
    for _ in range(3):  # the drop happens before or after the action: both are transient
        with pytest.raises(errors.TransientError) as info:
            await bes.status("0" * 32)
        assert info.value.code == "ConnectionError"
        _assert_no_secret(info.value)


async def test_slow_response_times_out_as_transient(emulator: str,
                                                    session: aiohttp.ClientSession) -> None:
    await _configure(session, emulator, slow_response_s=[2, 2])
    bes = client_mod.BesClient(_service(emulator, request_timeout_s=0.3), session)
    with pytest.raises(errors.TransientError) as info:
        await bes.status("0" * 32)
    assert info.value.code == "Timeout"


async def test_nothing_listening_is_transient(session: aiohttp.ClientSession) -> None:
    port = azurite_mod.free_port()
    bes = client_mod.BesClient(_service(f"http://127.0.0.1:{port}"), session)
    with pytest.raises(errors.TransientError) as info:
        await bes.submit({"Inputs": {"input1": {"ConnectionString": azurite_mod.ACCOUNT_KEY}}})
    _assert_no_secret(info.value)


# ---- canned responses the emulator does not give --------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def canned() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def serve(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield serve
    for r in runners:
        await r.cleanup()


async def test_request_shape_headers_and_query(canned: Callable[[Handler], Awaitable[str]],
                                               session: aiohttp.ClientSession) -> None:
    seen: list[web.Request] = []
    bodies: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        bodies.append(await request.read())
        if request.method == "POST" and request.path.endswith("/jobs"):
            return web.json_response("abc123")
        return web.Response(status=204)

    url = await canned(handler)
    bes = client_mod.BesClient(_service(url, apim_key=config.Secret(APIM_KEY)), session)
    assert await bes.submit({"Inputs": {}}) == "abc123"
    await bes.start("abc123")
    await bes.cancel("abc123")
    submit, start, cancel = seen
    assert submit.path == "/workspaces/ws1/services/sentiment/jobs"
    assert start.path == "/workspaces/ws1/services/sentiment/jobs/abc123/start"
    assert (cancel.method, cancel.path) == ("DELETE",
                                            "/workspaces/ws1/services/sentiment/jobs/abc123")
    for r in seen:
        assert r.query["api-version"] == "2.0"
        assert r.headers["Authorization"] == f"Bearer {API_KEY}"
        assert r.headers["Ocp-Apim-Subscription-Key"] == APIM_KEY
    assert json.loads(bodies[0]) == {"Inputs": {}}
    assert bodies[1] == b""


@pytest.mark.parametrize(("status", "body", "headers", "kind", "code"), [
    (500, "<html>Internal error</html>", {}, errors.TransientError, "InternalServerError"),
    (502, "", {}, errors.TransientError, "BadGateway"),
    (504, json.dumps({"error": {"code": "GatewayTimeout", "message": "backend"}}), {},
     errors.TransientError, "GatewayTimeout"),
    (408, "", {}, errors.TransientError, "RequestTimeout"),
    (413, json.dumps({"error": {"code": "MemoryQuotaViolation", "message": "too big"}}), {},
     errors.PermanentError, "MemoryQuotaViolation"),
    (403, "Forbidden", {}, errors.PermanentError, "Forbidden"),
    (429, json.dumps({"statusCode": 429, "message": "Rate limit is exceeded."}), {},
     errors.ThrottledError, "TooManyRequests"),
])
async def test_error_mapping(canned: Callable[[Handler], Awaitable[str]],
                             session: aiohttp.ClientSession, status: int, body: str,
                             headers: dict[str, str], kind: type[Exception], code: str) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, headers=headers)

    bes = client_mod.BesClient(_service(await canned(handler)), session)
    with pytest.raises(kind) as info:
        await bes.status("abc")
    exc = info.value
    assert isinstance(exc, errors.TransientError | errors.PermanentError)
    assert exc.code == code and exc.status == status
    if kind is errors.PermanentError:
        assert not isinstance(exc, errors.TransientError)


async def test_server_messages_are_scrubbed(canned: Callable[[Handler], Awaitable[str]],
                                            session: aiohttp.ClientSession) -> None:
    leaky = (f"could not read blob with AccountKey={azurite_mod.ACCOUNT_KEY} "
             f"via https://a/b?sv=1&sig=TOPSECRET using Bearer {API_KEY}")

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"code": "BadArgument", "message": leaky}},
                                 status=400)

    bes = client_mod.BesClient(_service(await canned(handler)), session)
    with pytest.raises(errors.PermanentError) as info:
        await bes.status("abc")
    assert "could not read blob" in str(info.value)
    _assert_no_secret(info.value, "TOPSECRET")


async def test_2xx_that_is_not_json_is_transient(canned: Callable[[Handler], Awaitable[str]],
                                                 session: aiohttp.ClientSession) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, text="<html>maintenance</html>")

    bes = client_mod.BesClient(_service(await canned(handler)), session)
    with pytest.raises(errors.TransientError):
        await bes.status("abc")


async def test_submit_answer_that_is_not_a_job_id(canned: Callable[[Handler], Awaitable[str]],
                                                  session: aiohttp.ClientSession) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"id": "x"})

    bes = client_mod.BesClient(_service(await canned(handler)), session)
    with pytest.raises(errors.PermanentError):
        await bes.submit({"Inputs": {}})


async def test_gate_relaxes_after_successes(canned: Callable[[Handler], Awaitable[str]],
                                            session: aiohttp.ClientSession) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls == 1:
            return web.json_response({"statusCode": 429, "message": "slow down"}, status=429,
                                     headers={"Retry-After": "0"})
        return web.json_response({"StatusCode": "Running", "Results": None})

    gate = throttle.ServiceGate(window_s=0.2)
    bes = client_mod.BesClient(_service(await canned(handler)), session, gate=gate)
    with pytest.raises(errors.ThrottledError) as info:
        await bes.status("abc")
    assert info.value.retry_after_s == 0.0
    assert gate.rate_per_s is not None
    capped = gate.rate_per_s
    for _ in range(3):
        await bes.status("abc")  # waits for tokens, then succeeds
    await asyncio.sleep(0.3)
    await bes.status("abc")
    assert gate.rate_per_s is None or gate.rate_per_s > capped


async def test_gate_adapts_to_gateway_rate_limit(session: aiohttp.ClientSession) -> None:
    """Issue 4: after the first 429s of a window the gate adapts; later windows see at most one
    further 429 each, and the service keeps being called at about the allowed rate."""
    opts = emu_options.EmulatorOptions(
        api_key=pydantic.SecretStr(API_KEY),
        rate_limit=emu_options.RateLimit(calls=10, period_s=1.0))
    async with emu_server.running(opts) as url:
        gate = throttle.ServiceGate()  # the default 60 s window: the gateway's is unknown
        bes = client_mod.BesClient(_service(url), session, gate=gate)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ok: list[float] = []
        throttled: list[float] = []

        async def caller() -> None:
            while loop.time() - t0 < 3.0:
                try:
                    await bes.describe()
                    ok.append(loop.time() - t0)
                except errors.ThrottledError:
                    throttled.append(loop.time() - t0)

        await asyncio.gather(*(caller() for _ in range(8)))
        first_burst = [t for t in throttled if t < 0.5]  # calls in flight at the first 429
        later = [t for t in throttled if t >= 0.5]
        assert first_burst, "the gateway never throttled: the test proves nothing"
        assert len(later) <= 3, f"429s after the first window: {later}"
        assert len(ok) >= 20, f"only {len(ok)} calls got through in 3 s at 10/s allowed"
        assert (await _stats(session, url))["http_429"] == len(throttled)


async def test_sas_references_work_end_to_end(emulator: str, session: aiohttp.ClientSession,
                                              store: blob.BlobStore, tmp_path: Path) -> None:
    sas_store = blob.BlobStore(
        config.StorageConfig(connection_string=store.storage.connection_string,
                             container=store.container, reference="sas"), session)
    try:
        body = await _submit_body(sas_store, tmp_path)
        assert "ConnectionString" not in json.dumps(body)
        bes = client_mod.BesClient(_service(emulator), session)
        job_id = await bes.submit(body)
        await bes.start(job_id)
        report = await _wait_terminal(bes, job_id)
        assert report.status is protocol.BesStatus.FINISHED, report.details
        dest = tmp_path / "r.csv"
        assert await sas_store.download(report.results["output1"], dest) > 0
        assert dest.read_text().splitlines()[1].endswith(",1,1,2,2,0,2,0,1")
    finally:
        await sas_store.close()
