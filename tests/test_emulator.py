"""The BES emulator over real HTTP against real Azurite: every operation and simulated fault."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from azure.storage import blob as azblob
from azure.storage.blob import aio as azblob_aio

from orchestrator import azurite as azurite_mod
from orchestrator.emulator import hashing, server
from orchestrator.emulator import options as options_mod

WS, SVC = "ws1", "svc1"
Q = "?api-version=2.0"
KEY = "test-api-key-123"
SAMPLE = "Col1,Col2\r\n1,This is a good day\r\n"


@contextlib.asynccontextmanager
async def emulator(**kw: Any) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    opts = options_mod.EmulatorOptions(seed=7, **kw)
    async with server.running(opts) as base, aiohttp.ClientSession() as http:
        yield base, http


def jobs_url(base: str, svc: str = SVC) -> str:
    return f"{base}/workspaces/{WS}/services/{svc}/jobs"


async def upload(az: azurite_mod.Azurite, data: bytes, *, container: str | None = None,
                 name: str = "in.csv") -> tuple[str, str]:
    container = container or f"c{uuid.uuid4().hex[:12]}"
    async with azblob_aio.BlobServiceClient.from_connection_string(az.connection_string) as svc:
        with contextlib.suppress(Exception):
            await svc.create_container(container)
        await svc.get_blob_client(container, name).upload_blob(data, overwrite=True)
    return container, name


def ref(az: azurite_mod.Azurite, container: str, name: str) -> dict[str, str]:
    return {"ConnectionString": az.connection_string, "RelativeLocation": f"/{container}/{name}"}


async def submit(http: aiohttp.ClientSession, base: str, body: dict[str, Any],
                 svc: str = SVC, headers: dict[str, str] | None = None) -> str:
    async with http.post(jobs_url(base, svc) + Q, json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        job_id = await r.json()
    assert isinstance(job_id, str) and len(job_id) == 32
    int(job_id, 16)
    return job_id


async def start(http: aiohttp.ClientSession, base: str, job_id: str, svc: str = SVC) -> None:
    async with http.post(f"{jobs_url(base, svc)}/{job_id}/start{Q}") as r:
        assert r.status == 204, await r.text()


async def status(http: aiohttp.ClientSession, base: str, job_id: str,
                 svc: str = SVC) -> dict[str, Any]:
    async with http.get(f"{jobs_url(base, svc)}/{job_id}{Q}") as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
    return body


async def wait_end(http: aiohttp.ClientSession, base: str, job_id: str,
                   svc: str = SVC, timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        body = await status(http, base, job_id, svc)
        if body["StatusCode"] in ("Finished", "Failed", "Cancelled", 2, 3, 4):
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.02)


async def fetch(http: aiohttp.ClientSession, result: dict[str, Any]) -> str:
    url = result["BaseLocation"] + result["RelativeLocation"] + result["SasBlobToken"]
    async with http.get(url) as r:
        assert r.status == 200, await r.text()
        return (await r.read()).decode("utf-8")


async def stats(http: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with http.get(f"{base}/_emulator/stats") as r:
        body: dict[str, Any] = await r.json()
    return body


async def configure(http: aiohttp.ClientSession, base: str, **changes: Any) -> None:
    async with http.post(f"{base}/_emulator/config", json=changes) as r:
        assert r.status == 200, await r.text()


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str, list[str]]:
    body = await resp.json()
    err = body["error"]
    return resp.status, err["code"], [d["code"] for d in err.get("details", [])]


# -- the model ------------------------------------------------------------------------------


def test_published_hashing_vector() -> None:
    assert hashing.feature_counts("This is a good day", bits=3, ngrams=2) == [1, 1, 2, 2, 0, 2,
                                                                              0, 1]
    assert hashing.feature_names("Col2", bits=3)[0] == "Col2 - Hashing feature 1"
    assert hashing.feature_names("Col2", bits=3)[-1] == "Col2 - Hashing feature 8"
    assert hashing.token_hash("1234") == 1234
    assert hashing.token_hash("good") != hashing.token_hash("Good")  # tokens as typed
    assert sum(hashing.feature_counts("a b c", bits=4, ngrams=3)) == 6  # 3 + 2 + 1
    assert hashing.feature_counts("", bits=2, ngrams=2) == [0, 0, 0, 0]


# -- the spec-only client -------------------------------------------------------------------


async def test_spec_client_gets_hashed_csv(azurite: azurite_mod.Azurite) -> None:
    text = ('Col1,Col2,Col3\r\n'
            '1,This is a good day,x\r\n'
            '2,"Hello, world, again",y\r\n'
            '3,"Grüße aus Köln ☕ 42",z\r\n'
            '4,"multi\nline ""quoted""",w\r\n')
    container, name = await upload(azurite, "\ufeff".encode() + text.encode())
    async with emulator(api_key=KEY) as (base, http):
        auth = {"Authorization": f"Bearer {KEY}"}
        body = {"Inputs": {"input1": ref(azurite, container, name)},
                "Outputs": {"output1": ref(azurite, container, "out/result.csv")},
                "GlobalParameters": {}}
        job_id = await submit(http, base, body, headers=auth)
        async with http.post(f"{jobs_url(base)}/{job_id}/start{Q}", headers=auth) as r:
            assert r.status == 204
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            async with http.get(f"{jobs_url(base)}/{job_id}{Q}", headers=auth) as r:
                st = await r.json()
            if st["StatusCode"] == "Finished":
                break
            assert st["StatusCode"] in ("NotStarted", "Running"), st
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        result = st["Results"]["output1"]
        assert result["ConnectionString"] is None
        assert result["BaseLocation"] == azurite.blob_endpoint + "/"
        assert result["RelativeLocation"] == f"{container}/out/result.csv"
        assert result["SasBlobToken"].startswith("?") and "sig=" in result["SasBlobToken"]
        assert "sp=r&" in result["SasBlobToken"] or "sp=r" in result["SasBlobToken"]
        out = await fetch(http, result)
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["Col1", "Col2", "Col3",
                       *[f"Col2 - Hashing feature {i}" for i in range(1, 9)]]
    assert rows[1] == ["1", "This is a good day", "x", "1", "1", "2", "2", "0", "2", "0", "1"]
    assert rows[2][:3] == ["2", "Hello, world, again", "y"]
    assert rows[3][:3] == ["3", "Grüße aus Köln ☕ 42", "z"]
    assert rows[4][:3] == ["4", 'multi\nline "quoted"', "w"]
    for row in rows[2:]:
        expected = hashing.feature_counts(row[1], bits=3, ngrams=2)
        assert [int(v) for v in row[3:]] == expected
    assert len(rows) == 5


async def test_sas_form_single_input_and_int_status(azurite: azurite_mod.Azurite) -> None:
    container, name = await upload(azurite, SAMPLE.encode())
    expiry = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    sas = azblob.generate_container_sas(
        azurite_mod.ACCOUNT, container, account_key=azurite_mod.ACCOUNT_KEY,
        permission=azblob.ContainerSasPermissions(read=True, write=True, create=True),
        expiry=expiry)
    base_loc = azurite.blob_endpoint + "/"
    body = {"Input": {"BaseLocation": base_loc, "RelativeLocation": f"{container}/{name}",
                      "SasBlobToken": "?" + sas},
            "Outputs": {"output1": {"BaseLocation": base_loc,
                                    "RelativeLocation": f"{container}/sas-out.csv",
                                    "SasBlobToken": "?" + sas}}}
    async with emulator(int_status=True) as (base, http):
        job_id = await submit(http, base, body)
        st = await status(http, base, job_id)
        assert st == {"StatusCode": 0, "Results": None, "Details": None}
        await start(http, base, job_id)
        st = await wait_end(http, base, job_id)
        assert st["StatusCode"] == 4, st
        result = st["Results"]["output1"]
        # No account key in a SAS-form request: the service hands back the token it was given.
        assert result["SasBlobToken"] == "?" + sas
        out = await fetch(http, result)
        async with http.get(f"{base}/_emulator/jobs/{job_id}") as r:
            seen = await r.json()
    assert out.splitlines()[1] == "1,This is a good day,1,1,2,2,0,2,0,1"
    assert seen["submitted"]["Input"]["SasBlobToken"] == "***"
    assert sas not in json.dumps(seen)


async def test_default_output_location_and_global_parameters(
        azurite: azurite_mod.Azurite) -> None:
    container, name = await upload(azurite, b"id,text\r\n1,a b a\r\n2,7 7\r\n")
    params = {"Hashing bitsize": "2", "N-grams": "1", "Target column": "text"}
    async with emulator() as (base, http):
        job_id = await submit(http, base, {"Inputs": {"input1": ref(azurite, container, name)},
                                           "GlobalParameters": params})
        await start(http, base, job_id)
        st = await wait_end(http, base, job_id)
        assert st["StatusCode"] == "Finished", st
        result = st["Results"]["output1"]
        assert result["RelativeLocation"] == f"{container}/{job_id}/output1.csv"
        out = await fetch(http, result)
        async with http.get(f"{base}/_emulator/jobs/{job_id}") as r:
            seen = await r.json()
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["id", "text", *[f"text - Hashing feature {i}" for i in range(1, 5)]]
    assert [int(v) for v in rows[1][2:]] == hashing.feature_counts("a b a", bits=2, ngrams=1)
    assert [int(v) for v in rows[2][2:]] == [0, 0, 0, 2]  # "7" hashes to 7 -> bucket 3
    assert seen["global_parameters"] == params
    assert seen["inputs"] == {"input1": f"{container}/{name}"}
    assert azurite_mod.ACCOUNT_KEY not in json.dumps(seen)
    assert "AccountKey=***" in seen["submitted"]["Inputs"]["input1"]["ConnectionString"]


async def test_multi_input_multi_output(azurite: azurite_mod.Azurite) -> None:
    container, name = await upload(azurite, SAMPLE.encode())
    await upload(azurite, b"k,v\r\n1,2\r\n", container=container, name="side.csv")
    async with emulator(inputs=("input1", "input2"), outputs=("output1", "output2")) as (
            base, http):
        body = {"Inputs": {"input1": ref(azurite, container, name),
                           "input2": ref(azurite, container, "side.csv")},
                "Outputs": {"output1": ref(azurite, container, "o1.csv"),
                            "output2": ref(azurite, container, "o2.tsv")}}
        job_id = await submit(http, base, body)
        await start(http, base, job_id)
        st = await wait_end(http, base, job_id)
        assert st["StatusCode"] == "Finished", st
        assert set(st["Results"]) == {"output1", "output2"}
        tsv = await fetch(http, st["Results"]["output2"])
        # A missing second input fails the job, naming it.
        body["Inputs"]["input2"] = ref(azurite, container, "nope.csv")
        job2 = await submit(http, base, body)
        await start(http, base, job2)
        st2 = await wait_end(http, base, job2)
    assert tsv.splitlines()[1] == "1\tThis is a good day\t1\t1\t2\t2\t0\t2\t0\t1"
    assert st2["StatusCode"] == "Failed" and "input2" in st2["Details"]
    assert "nope.csv" in st2["Details"]


async def test_rrs_execute(azurite: azurite_mod.Azurite) -> None:
    async with emulator() as (base, http):
        url = f"{base}/workspaces/{WS}/services/{SVC}/execute?api-version=2.0&details=true"
        body = {"Inputs": {"input1": {"ColumnNames": ["Col2"],
                                      "Values": [["This is a good day"]]}},
                "GlobalParameters": {}}
        async with http.post(url, json=body) as r:
            assert r.status == 200
            out = await r.json()
        async with http.post(url, json={"Inputs": {"input1": {"ColumnNames": ["x"],
                                                              "Values": [["a"]]}}}) as r:
            bad = await r.json()
            assert r.status == 400
    value = out["Results"]["output1"]["value"]
    assert out["Results"]["output1"]["type"] == "table"
    assert value["ColumnNames"][0] == "Col2" and len(value["ColumnNames"]) == 9
    assert len(value["ColumnTypes"]) == 9
    assert value["Values"] == [["This is a good day", "1", "1", "2", "2", "0", "2", "0", "1"]]
    assert "Column 'Col2' not found" in bad["error"]["details"][0]["message"]


async def test_swagger_lists_declared_names(azurite: azurite_mod.Azurite) -> None:
    async with emulator(inputs=("a", "b"), outputs=("r",),
                        global_parameters=("Hashing bitsize", "N-grams")) as (base, http):
        async with http.get(f"{base}/workspaces/{WS}/services/{SVC}/swagger.json{Q}") as r:
            assert r.status == 200
            doc = await r.json()
    defs = doc["definitions"]
    assert list(defs["ExecutionInputs"]["properties"]) == ["a", "b"]
    assert list(defs["ExecutionOutputs"]["properties"]) == ["r"]
    assert list(defs["GlobalParameters"]["properties"]) == ["Hashing bitsize", "N-grams"]


# -- jobs that cannot run -------------------------------------------------------------------


async def _run_to_end(http: aiohttp.ClientSession, base: str, body: dict[str, Any]
                      ) -> dict[str, Any]:
    job_id = await submit(http, base, body)
    await start(http, base, job_id)
    return await wait_end(http, base, job_id)


async def test_failed_jobs_explain_themselves(azurite: azurite_mod.Azurite) -> None:
    container, name = await upload(azurite, b"a,b\r\n1,2\r\n")
    _, bad_utf8 = await upload(azurite, b"Col2\r\n\xff\xfe bad\r\n", container=container,
                               name="bad.csv")
    _, bad_quote = await upload(azurite, b'Col2\r\n"x"y,z\r\n', container=container,
                                name="q.csv")
    _, empty = await upload(azurite, b"", container=container, name="empty.csv")
    wrong_key = azurite.connection_string.replace(
        azurite_mod.ACCOUNT_KEY, "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmc=")
    async with emulator() as (base, http):
        st = await _run_to_end(http, base, {"Inputs": {"input1": ref(azurite, container, name)}})
        assert st["StatusCode"] == "Failed"
        assert st["Details"] == "Column 'Col2' not found in input1; columns are: a, b"
        st = await _run_to_end(http, base, {"Inputs": {"input1": ref(azurite, container,
                                                                     "missing.csv")}})
        assert st["StatusCode"] == "Failed" and "not found" in st["Details"]
        assert "missing.csv" in st["Details"]
        st = await _run_to_end(http, base, {"Inputs": {"input1": {
            "ConnectionString": wrong_key, "RelativeLocation": f"{container}/{name}"}}})
        assert st["StatusCode"] == "Failed" and "credentials" in st["Details"]
        assert "d3Jvbmc" not in st["Details"]
        st = await _run_to_end(http, base, {"Inputs": {"input1": ref(azurite, container,
                                                                     bad_utf8)}})
        assert st["StatusCode"] == "Failed" and "UTF-8" in st["Details"]
        st = await _run_to_end(http, base, {"Inputs": {"input1": ref(azurite, container,
                                                                     bad_quote)}})
        assert st["StatusCode"] == "Failed" and "not valid CSV" in st["Details"]
        st = await _run_to_end(http, base, {"Inputs": {"input1": ref(azurite, container,
                                                                     empty)}})
        assert st["StatusCode"] == "Failed" and "empty" in st["Details"]
        dead = azurite_mod.connection_string("127.0.0.1", azurite_mod.free_port())
        st = await _run_to_end(http, base, {"Inputs": {"input1": {
            "ConnectionString": dead, "RelativeLocation": f"{container}/{name}"}}})
        assert st["StatusCode"] == "Failed" and "cannot reach storage" in st["Details"]
        # The server is still fine.
        assert (await stats(http, base))["jobs_by_state"]["Failed"] == 7


async def test_simulated_failure_rate(azurite: azurite_mod.Azurite) -> None:
    container, name = await upload(azurite, SAMPLE.encode())
    async with emulator(failure_rate=1.0, failure_details="boom: try later") as (base, http):
        st = await _run_to_end(http, base, {"Inputs": {"input1": ref(azurite, container, name)}})
    assert st == {"StatusCode": "Failed", "Results": None, "Details": "boom: try later"}


# -- request errors -------------------------------------------------------------------------


async def test_submit_validation_errors(azurite: azurite_mod.Azurite) -> None:
    r1 = ref(azurite, "c", "in.csv")
    cases: list[tuple[Any, str]] = [
        ({"Input": r1, "Inputs": {"input1": r1}}, "DuplicateInputInBatchCall"),
        ({"Inputs": {"inputX": r1}}, "InvalidInputNames"),
        ({"Inputs": {"input1": r1}, "Outputs": {"outputX": ref(azurite, "c", "o.csv")}},
         "InvalidOutputOverrideName"),
        ({"Inputs": {"input1": r1}, "Outputs": {"output1": ref(azurite, "c", "o.txt")}},
         "InvalidBlobExtension"),
        ({"Inputs": {}}, "MissingInputBlobInformation"),
        ({"Inputs": {"input1": {"RelativeLocation": "c/in.csv"}}},
         "MissingInputBlobInformation"),
        ({"GlobalParameters": {}}, "MissingInputBlobInformation"),
        ({"Inputs": {"input1": r1}, "GlobalParameters": {"Nope": "1"}},
         "InvalidGlobalParameterName"),
        ({"Inputs": {"input1": r1}, "GlobalParameters": {"Hashing bitsize": "x"}},
         "InvalidGlobalParameterValue"),
    ]
    async with emulator() as (base, http):
        for body, code in cases:
            async with http.post(jobs_url(base) + Q, json=body) as r:
                assert await error_of(r) == (400, "BadArgument", [code]), body
        async with http.post(jobs_url(base) + Q, data=b"{not json",
                             headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and (await error_of(r))[1] == "BadArgument"
        async with http.post(jobs_url(base) + "?api-version=1.0", json={}) as r:
            assert r.status == 400
        async with http.get(f"{jobs_url(base)}/{uuid.uuid4().hex}{Q}") as r:
            assert (await error_of(r))[:2] == (404, "NotFound")
        async with http.post(f"{jobs_url(base)}/{uuid.uuid4().hex}/start{Q}") as r:
            assert r.status == 404
        async with http.delete(f"{jobs_url(base)}/{uuid.uuid4().hex}{Q}") as r:
            assert r.status == 404
        assert (await stats(http, base))["submits"] == 0


async def test_start_conflict_and_double_start(azurite: azurite_mod.Azurite) -> None:
    container, name = await upload(azurite, SAMPLE.encode())
    body = {"Inputs": {"input1": ref(azurite, container, name)}}
    async with emulator(queue_delay_s=(0.5, 0.5)) as (base, http):
        job_id = await submit(http, base, body)
        await start(http, base, job_id)
        assert (await status(http, base, job_id))["StatusCode"] == "NotStarted"
        await start(http, base, job_id)  # accepted again while queued: a double start
        st = await wait_end(http, base, job_id)
        assert st["StatusCode"] == "Finished"
        async with http.post(f"{jobs_url(base)}/{job_id}/start{Q}") as r:
            assert await error_of(r) == (400, "InvalidOperation", ["CannotStartJob"])
        s = await stats(http, base)
    assert s["double_starts"] == 1 and s["start_conflicts"] == 1 and s["starts"] == 2
    assert s["max_scored_per_job"] == 1


async def test_cancel_running_and_queued(azurite: azurite_mod.Azurite) -> None:
    container, name = await upload(azurite, SAMPLE.encode())
    body = {"Inputs": {"input1": ref(azurite, container, name)}}
    async with emulator(run_time_s=(30, 30), max_running=1) as (base, http):
        running_id = await submit(http, base, body)
        queued_id = await submit(http, base, body)
        await start(http, base, running_id)
        await start(http, base, queued_id)
        for _ in range(100):
            if (await status(http, base, running_id))["StatusCode"] == "Running":
                break
            await asyncio.sleep(0.02)
        assert (await status(http, base, queued_id))["StatusCode"] == "NotStarted"
        async with http.delete(f"{jobs_url(base)}/{running_id}{Q}") as r:
            assert r.status == 204
        st = await status(http, base, running_id)
        assert st["StatusCode"] == "Cancelled"
        # The freed slot goes to the queued job; cancel it too.
        for _ in range(100):
            if (await status(http, base, queued_id))["StatusCode"] == "Running":
                break
            await asyncio.sleep(0.02)
        assert (await status(http, base, queued_id))["StatusCode"] == "Running"
        async with http.delete(f"{jobs_url(base)}/{queued_id}{Q}") as r:
            assert r.status == 204
        s = await stats(http, base)
    assert s["running_now"] == 0 and s["jobs_by_state"]["Cancelled"] == 2
    assert s["deletes"] == 2


async def test_max_running_honoured_fifo(azurite: azurite_mod.Azurite) -> None:
    container, name = await upload(azurite, SAMPLE.encode())
    body = {"Inputs": {"input1": ref(azurite, container, name)}}
    async with emulator(run_time_s=(0.3, 0.3), max_running=2) as (base, http):
        ids = [await submit(http, base, body) for _ in range(5)]
        for job_id in ids:
            await start(http, base, job_id)
        await asyncio.sleep(0.1)
        states = [(await status(http, base, j))["StatusCode"] for j in ids]
        assert states == ["Running", "Running", "NotStarted", "NotStarted", "NotStarted"]
        for job_id in ids:
            assert (await wait_end(http, base, job_id))["StatusCode"] == "Finished"
        s = await stats(http, base)
    assert s["max_running_seen"] == 2 and s["jobs_by_state"]["Finished"] == 5


# -- auth and gateway -----------------------------------------------------------------------


async def test_api_key_and_apim(azurite: azurite_mod.Azurite) -> None:
    async with emulator(api_key=KEY, apim_key="sub-key-456") as (base, http):
        url = f"{base}/workspaces/{WS}/services/{SVC}/swagger.json{Q}"
        async with http.get(url, headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 401
            assert await r.json() == {"statusCode": 401,
                                      "message": server.APIM_401_MESSAGE}
        sub = {"Ocp-Apim-Subscription-Key": "sub-key-456"}
        async with http.get(url, headers={**sub, "Authorization": "Bearer wrong"}) as r:
            assert (await error_of(r))[0] == 401
        async with http.get(url, headers=sub) as r:
            assert r.status == 401
        async with http.get(url, headers={**sub, "Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200


async def test_rate_limit_429_and_quota_403(azurite: azurite_mod.Azurite) -> None:
    rate = options_mod.RateLimit(calls=3, period_s=2.0)
    async with emulator(rate_limit=rate) as (base, http):
        url = f"{base}/workspaces/{WS}/services/{SVC}/swagger.json{Q}"
        codes = []
        for _ in range(5):
            async with http.get(url) as r:
                codes.append(r.status)
                if r.status == 429:
                    retry_after = int(r.headers["Retry-After"])
                    assert (await r.json())["statusCode"] == 429
        assert codes == [200, 200, 200, 429, 429]
        assert 1 <= retry_after <= 2
        assert (await stats(http, base))["http_429"] == 2
        await configure(http, base, rate_limit=None, quota="2/60s")
        codes = []
        for _ in range(3):
            async with http.get(url) as r:
                codes.append(r.status)
                if r.status == 403:
                    assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert codes == [200, 200, 403]


async def test_503_injection(azurite: azurite_mod.Azurite) -> None:
    async with emulator() as (base, http):
        await configure(http, base, error_503_rate=1.0, retry_after_s=3)
        async with http.post(jobs_url(base) + Q, json={}) as r:
            status_, code, details = await error_of(r)
            assert r.headers["Retry-After"] == "3"
        assert (status_, code) == (503, "ServiceUnavailable")
        assert details[0] in ("TooManyConcurrentRequests", "RequestThrottled")
        await configure(http, base, error_503_rate=0.0)
        async with http.get(f"{base}/workspaces/{WS}/services/{SVC}/swagger.json{Q}") as r:
            assert r.status == 200
        assert (await stats(http, base))["http_503"] == 1
        async with http.post(f"{base}/_emulator/config", json={"error_503_rate": 2}) as r:
            assert r.status == 400


async def test_drops_before_and_after_effect(azurite: azurite_mod.Azurite) -> None:
    container, name = await upload(azurite, SAMPLE.encode())
    body = {"Inputs": {"input1": ref(azurite, container, name)}}
    async with emulator(queue_delay_s=(30, 30)) as (base, http):
        ids = [await submit(http, base, body) for _ in range(16)]
        await configure(http, base, drop_rate=1.0)
        for job_id in ids:
            with pytest.raises(aiohttp.ClientError):
                async with http.post(f"{jobs_url(base)}/{job_id}/start{Q}") as r:
                    await r.read()
        await configure(http, base, drop_rate=0.0)
        started = []
        for job_id in ids:
            async with http.get(f"{base}/_emulator/jobs/{job_id}") as r:
                started.append((await r.json())["started"])
        s = await stats(http, base)
    assert s["dropped"] == 16
    # Some starts took effect though their response was lost, some never happened.
    assert any(started) and not all(started)
    assert s["starts"] == sum(started)


async def test_slow_responses(azurite: azurite_mod.Azurite) -> None:
    async with emulator(slow_response_s=(0.3, 0.3)) as (base, http):
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with http.get(f"{base}/workspaces/{WS}/services/{SVC}/swagger.json{Q}") as r:
            assert r.status == 200
        assert loop.time() - t0 >= 0.3
