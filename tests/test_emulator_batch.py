"""The emulator's Azure ML batch endpoints over real HTTP: a real emulator subprocess, real
Azurite, and azure-identity's own managed-identity code path for tokens."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from azure.core import exceptions as azure_errors
from azure.identity import aio as identity_aio
from azure.storage.blob import aio as azblob_aio
from click.testing import CliRunner

from orchestrator import azurite as azurite_mod
from orchestrator.emulator import batch, cli, hashing, process
from orchestrator.emulator import options as options_mod

IDENTITY_SECRET = "test-identity-header-5up3r"
ML_SCOPE = "https://ml.azure.com/.default"
ARM_SCOPE = "https://management.azure.com/.default"
WS = ("/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg1/providers/"
      "Microsoft.MachineLearningServices/workspaces/ws1")
Q = "?api-version=2024-04-01"
DATASTORE = "workspaceblobstore"
SAMPLE = ('Col1,Col2\r\n1,This is a good day\r\n2,"Hello, world, again"\r\n'
          '3,"Grüße aus Köln ☕ 42"\r\n')
FINAL = ("Completed", "Failed", "Canceled")


@dataclass
class Batch:
    url: str
    container: str
    http: aiohttp.ClientSession
    ml: str  #: a token for https://ml.azure.com
    arm: str  #: a token for https://management.azure.com

    @property
    def scoring_uri(self) -> str:
        return f"{self.url}/endpoints/hashing/jobs"

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    async def invoke(self, body: dict[str, Any], *, token: str | None = None,
                     headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        resp = await self.http.post(self.scoring_uri, json=body,
                                    headers={**self.auth(token or self.ml), **(headers or {})})
        await resp.read()
        return resp

    async def arm_get(self, path: str, *, token: str | None = None,
                      ) -> aiohttp.ClientResponse:
        url = path if path.startswith("http") else f"{self.url}{WS}{path}"
        resp = await self.http.get(url, headers=self.auth(token or self.arm))
        await resp.read()
        return resp

    async def job(self, name: str) -> dict[str, Any]:
        resp = await self.arm_get(f"/jobs/{name}{Q}")
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body

    async def wait_final(self, name: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            body = await self.job(name)
            if body["properties"]["status"] in FINAL:
                return body
            assert asyncio.get_running_loop().time() < deadline, body
            await asyncio.sleep(0.05)

    async def emulator_get(self, path: str) -> dict[str, Any]:
        async with self.http.get(f"{self.url}{path}") as r:
            assert r.status == 200, await r.text()
            body: dict[str, Any] = await r.json()
        return body

    async def configure(self, **knobs: Any) -> None:
        async with self.http.post(f"{self.url}/_emulator/config", json=knobs) as r:
            assert r.status == 200, await r.text()


def body_for(in_path: str, out_path: str, *, tags: dict[str, str] | None = None,
             camel: bool = False) -> dict[str, Any]:
    uri = f"azureml://datastores/{DATASTORE}/paths/"
    if camel:  # what the SDK sends
        return {"properties": {
            "inputData": {"input_data": {"jobInputType": "UriFile", "uri": uri + in_path}},
            "outputData": {"output_data": {"jobOutputType": "UriFile", "uri": uri + out_path}},
            "tags": tags or {}}}
    return {"properties": {
        "InputData": {"input_data": {"JobInputType": "UriFile", "Uri": uri + in_path}},
        "OutputData": {"output_data": {"JobOutputType": "UriFile", "Uri": uri + out_path}},
        "tags": tags or {}}}


@contextlib.contextmanager
def identity_env(monkeypatch: pytest.MonkeyPatch, url: str,
                 secret: str = IDENTITY_SECRET) -> Iterator[None]:
    """What App Service sets for a managed identity; azure-identity reads it at construction."""
    with monkeypatch.context() as m:
        m.setenv("IDENTITY_ENDPOINT", f"{url}/msi/token")
        m.setenv("IDENTITY_HEADER", secret)
        for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
                     "AZURE_FEDERATED_TOKEN_FILE", "MSI_ENDPOINT", "IMDS_ENDPOINT",
                     "IDENTITY_SERVER_THUMBPRINT"):
            m.delenv(name, raising=False)
        yield


async def tokens(url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    with identity_env(monkeypatch, url):
        async with identity_aio.ManagedIdentityCredential() as cred:
            ml = await cred.get_token(ML_SCOPE)
            arm = await cred.get_token(ARM_SCOPE)
    return ml.token, arm.token


async def new_container(az: azurite_mod.Azurite) -> str:
    name = f"be{uuid.uuid4().hex[:12]}"
    async with azblob_aio.BlobServiceClient.from_connection_string(az.connection_string) as svc:
        await svc.create_container(name)
    return name


async def put_blob(az: azurite_mod.Azurite, container: str, path: str, data: bytes) -> None:
    # 1 MiB pieces: aiohttp warns (an error here) about larger bytes bodies.
    async with azblob_aio.BlobServiceClient.from_connection_string(
            az.connection_string, max_single_put_size=1 << 20, max_block_size=1 << 20) as svc:
        await svc.get_blob_client(container, path).upload_blob(
            io.BytesIO(data), length=len(data), overwrite=True)


async def get_blob(az: azurite_mod.Azurite, container: str, path: str) -> bytes | None:
    async with azblob_aio.BlobServiceClient.from_connection_string(az.connection_string) as svc:
        try:
            stream = await svc.get_blob_client(container, path).download_blob()
        except azure_errors.ResourceNotFoundError:
            return None
        return await stream.readall()


@contextlib.asynccontextmanager
async def batch_emulator(az: azurite_mod.Azurite, monkeypatch: pytest.MonkeyPatch,
                         *args: str) -> AsyncIterator[Batch]:
    container = await new_container(az)
    env = {process.BE_STORAGE_ENV: az.connection_string,
           process.IDENTITY_HEADER_ENV: IDENTITY_SECRET}
    with process.spawn("--seed", "3", "--be-container", container, *args, env=env) as (url, _):
        ml, arm = await tokens(url, monkeypatch)
        async with aiohttp.ClientSession() as http:
            yield Batch(url=url, container=container, http=http, ml=ml, arm=arm)


def expected_rows(text: str) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(text)))
    out = [[*rows[0], *hashing.feature_names("Col2", bits=3)]]
    for row in rows[1:]:
        out.append([*row, *map(str, hashing.feature_counts(row[1], bits=3, ngrams=2))])
    return out


# -- identity ------------------------------------------------------------------------------


async def test_managed_identity_through_azure_identity(
        azurite: azurite_mod.Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch, "--token-lifetime-s", "2") as be:
        with identity_env(monkeypatch, be.url):
            async with identity_aio.ManagedIdentityCredential() as cred:
                first = await cred.get_token(ML_SCOPE)
                assert await cred.get_token(ML_SCOPE) == first  # cached by the library
                await asyncio.sleep(2.5)
                # Expired: the emulator refuses it and the library fetches a fresh one.
                resp = await be.invoke(body_for("in/a.csv", "out/a.csv"), token=first.token)
                assert resp.status == 401
                err = (await resp.json())["error"]
                assert err["code"] == "ExpiredAuthenticationToken"
                assert "expiry" in err["message"]
                second = await cred.get_token(ML_SCOPE)
                assert second.token != first.token
            # DefaultAzureCredential reaches the same endpoint through its chain.
            async with identity_aio.DefaultAzureCredential(
                    exclude_cli_credential=True, exclude_powershell_credential=True,
                    exclude_developer_cli_credential=True,
                    exclude_visual_studio_code_credential=True) as dac:
                arm = await dac.get_token(ARM_SCOPE)
        resp = await be.arm_get(f"/datastores/{DATASTORE}{Q}", token=arm.token)
        assert resp.status == 200, await resp.text()
        stats = (await be.emulator_get("/_emulator/stats"))["batch"]
        # azure-identity asks for the resource, not the scope: no "/.default".
        assert stats["tokens_by_audience"] == {"https://ml.azure.com": 3,
                                               "https://management.azure.com": 2}


async def test_token_endpoint_checks_the_identity_header(
        azurite: azurite_mod.Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch) as be:
        url = f"{be.url}/msi/token?api-version=2019-08-01&resource=https://ml.azure.com"
        async with be.http.get(url) as r:
            assert r.status == 400
            assert "X-IDENTITY-HEADER" in (await r.json())["message"]
        async with be.http.get(url, headers={"X-IDENTITY-HEADER": "wrong"}) as r:
            assert r.status == 401
        async with be.http.get(url, headers={"X-IDENTITY-HEADER": IDENTITY_SECRET}) as r:
            assert r.status == 200
            body = await r.json()
        assert body["resource"] == "https://ml.azure.com" and body["token_type"] == "Bearer"
        assert body["expires_on"].isdigit() and len(body["access_token"]) >= 40
        # A wrong secret makes azure-identity fail loudly, not hang.
        with identity_env(monkeypatch, be.url, secret="wrong"):
            async with identity_aio.ManagedIdentityCredential() as cred:
                with pytest.raises(azure_errors.ClientAuthenticationError):
                    await cred.get_token(ML_SCOPE)


async def test_wrong_audience_is_named(azurite: azurite_mod.Azurite,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch) as be:
        resp = await be.invoke(body_for("in/a.csv", "out/a.csv"), token=be.arm)
        assert resp.status == 401
        err = (await resp.json())["error"]
        assert err["code"] == "InvalidAuthenticationTokenAudience"
        assert "wrong audience" in err["message"]
        assert "'https://management.azure.com'" in err["message"]  # what it got
        assert "'https://ml.azure.com'" in err["message"]  # what it wants
        assert "invalid_token" in resp.headers["WWW-Authenticate"]
        resp = await be.arm_get(f"/jobs{Q}", token=be.ml)
        assert resp.status == 401
        msg = (await resp.json())["error"]["message"]
        assert "wrong audience" in msg and "https://management.azure.com" in msg
        resp = await be.arm_get(f"/jobs{Q}", token="not-a-token")
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "InvalidAuthenticationToken"
        async with be.http.get(f"{be.url}{WS}/jobs{Q}") as r:
            assert r.status == 401
            assert "header is missing" in (await r.json())["error"]["message"]
        assert (await be.emulator_get("/_emulator/stats"))["batch"]["invokes"] == 0


# -- invoke, poll, output ------------------------------------------------------------------


async def test_invoke_poll_completed_writes_exact_output(
        azurite: azurite_mod.Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch, "--prepare-s", "0.3",
                              "--run-time-s", "0.3", "--finalize-s", "0.2") as be:
        await put_blob(azurite, be.container, "jobs/j1/1/in/sample.csv",
                       "\ufeff".encode() + SAMPLE.encode())
        tags = {batch.JOB_TAG: "j1", batch.ATTEMPT_TAG: "1"}
        resp = await be.invoke(body_for("jobs/j1/1/in/sample.csv",
                                        "jobs/j1/1/out/predictions.csv", tags=tags))
        assert resp.status == 200, await resp.text()
        job = await resp.json()
        name = job["name"]
        assert name.startswith("batchjob-") and uuid.UUID(name.removeprefix("batchjob-"))
        assert job["properties"]["status"] == "Preparing"
        assert job["properties"]["tags"] == tags
        assert job["id"].endswith(f"/jobs/{name}")
        studio = job["properties"]["interactionEndpoints"]["Studio"]["endpoint"]
        assert studio.startswith("https://ml.azure.com/runs/" + name)
        seen = set()
        while (status := (await be.job(name))["properties"]["status"]) not in FINAL:
            seen.add(status)
            await asyncio.sleep(0.05)
        assert status == "Completed"
        assert {"Preparing", "Running"} <= seen
        info = await be.emulator_get(f"/_emulator/batch/jobs/{name}")
        assert info["history"] == ["Preparing", "Queued", "Running", "Finalizing", "Completed"]
        out = await get_blob(azurite, be.container, "jobs/j1/1/out/predictions.csv")
        assert out is not None
        assert list(csv.reader(io.StringIO(out.decode()))) == expected_rows(SAMPLE)
        assert (await be.job(name))["properties"]["tags"] == tags


async def test_camel_case_body_and_default_output(
        azurite: azurite_mod.Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch) as be:
        await put_blob(azurite, be.container, "in/s.csv", SAMPLE.encode())
        resp = await be.invoke(body_for("in/s.csv", "out/s.csv", camel=True),
                               headers={batch.DEPLOYMENT_HEADER: "default"})
        assert resp.status == 200, await resp.text()
        assert (await be.wait_final((await resp.json())["name"]))["properties"][
            "status"] == "Completed"
        assert await get_blob(azurite, be.container, "out/s.csv") is not None
        body = body_for("in/s.csv", "unused")
        del body["properties"]["OutputData"]
        resp = await be.invoke(body)
        name = (await resp.json())["name"]
        assert (await be.wait_final(name))["properties"]["status"] == "Completed"
        # Left out, the output goes where the service puts it by default.
        assert await get_blob(azurite, be.container,
                              f"azureml/{name}/score/predictions.csv") is not None


async def test_existing_output_and_bad_input_fail_the_job(
        azurite: azurite_mod.Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch) as be:
        await put_blob(azurite, be.container, "in/s.csv", SAMPLE.encode())
        await put_blob(azurite, be.container, "out/taken.csv", b"someone else's")
        resp = await be.invoke(body_for("in/s.csv", "out/taken.csv"))
        name = (await resp.json())["name"]
        assert (await be.wait_final(name))["properties"]["status"] == "Failed"
        info = await be.emulator_get(f"/_emulator/batch/jobs/{name}")
        assert "already exists" in info["reason"]
        assert await get_blob(azurite, be.container, "out/taken.csv") == b"someone else's"
        # The same for an output large enough to be written as staged blocks.
        big = "Col1,Col2\r\n" + "".join(f"{i},word{i} and more words\r\n"
                                          for i in range(40_000))
        await put_blob(azurite, be.container, "in/big.csv", big.encode())
        resp = await be.invoke(body_for("in/big.csv", "out/taken.csv"))
        name = (await resp.json())["name"]
        assert (await be.wait_final(name))["properties"]["status"] == "Failed"
        assert "already exists" in (await be.emulator_get(f"/_emulator/batch/jobs/{name}"))[
            "reason"]
        assert await get_blob(azurite, be.container, "out/taken.csv") == b"someone else's"
        resp = await be.invoke(body_for("in/big.csv", "out/big.csv"))
        name = (await resp.json())["name"]
        assert (await be.wait_final(name))["properties"]["status"] == "Completed"
        out = await get_blob(azurite, be.container, "out/big.csv")
        assert out is not None and len(out) > 1024 * 1024  # more than one block
        assert out.count(b"\r\n") == 40_001

        await put_blob(azurite, be.container, "in/bad.csv", b"A,B\r\n1,2\r\n")
        resp = await be.invoke(body_for("in/bad.csv", "out/bad.csv"))
        name = (await resp.json())["name"]
        job = await be.wait_final(name)
        assert job["properties"]["status"] == "Failed"
        assert "Col2" in (await be.emulator_get(f"/_emulator/batch/jobs/{name}"))["reason"]
        assert await get_blob(azurite, be.container, "out/bad.csv") is None

        resp = await be.invoke(body_for("in/missing.csv", "out/m.csv"))
        name = (await resp.json())["name"]
        assert (await be.wait_final(name))["properties"]["status"] == "Failed"


async def test_validation_errors_embed_a_json_list(
        azurite: azurite_mod.Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch) as be:
        bad = body_for("in/s.csv", "out/s.csv")
        props = bad["properties"]
        props["OutputData"]["output_data"]["JobOutputType"] = "UriFolder"
        props["InputData"]["input_data"]["Uri"] = "azureml://datastores/other/paths/in/s.csv"
        props["miniBatchSize"] = 0
        props["retrySettings"] = {"maxRetries": 3, "timeout": "30 seconds"}
        resp = await be.invoke(bad)
        assert resp.status == 400
        err = (await resp.json())["error"]
        failures = json.loads(err["message"])
        assert {f["PropertyName"] for f in failures} == {
            "InputData.input_data.Uri", "OutputData.output_data.JobOutputType",
            "miniBatchSize", "retrySettings.timeout"}
        for f in failures:
            assert set(f) == {"PropertyName", "ErrorMessage", "AttemptedValue", "ErrorCode"}
        assert any("other" in f["ErrorMessage"] for f in failures)
        resp = await be.invoke({"nothing": 1})
        assert resp.status == 400
        assert json.loads((await resp.json())["error"]["message"])[0]["PropertyName"] == \
            "properties"
        # Routing: an unknown deployment is refused before anything is created.
        resp = await be.invoke(body_for("in/s.csv", "out/s.csv"),
                               headers={batch.DEPLOYMENT_HEADER: "blue"})
        assert resp.status == 400
        assert "No valid deployments to route to" in (await resp.json())["error"]["message"]
        stats = (await be.emulator_get("/_emulator/stats"))["batch"]
        assert stats["invokes"] == 0 and stats["jobs"] == 0


async def test_no_default_deployment(azurite: azurite_mod.Azurite,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch, "--be-deployment", "blue=feature_hashing",
                              "--be-no-default-deployment") as be:
        await put_blob(azurite, be.container, "in/s.csv", SAMPLE.encode())
        resp = await be.invoke(body_for("in/s.csv", "out/s.csv"))
        assert resp.status == 400
        assert (await resp.json())["error"]["message"].startswith(
            "No valid deployments to route to")
        ep = await (await be.arm_get(f"/batchEndpoints/hashing{Q}")).json()
        assert ep["properties"]["defaults"]["deploymentName"] is None
        resp = await be.invoke(body_for("in/s.csv", "out/s.csv"),
                               headers={batch.DEPLOYMENT_HEADER: "blue"})
        assert resp.status == 200, await resp.text()


# -- the ARM plane ---------------------------------------------------------------------------


async def test_endpoint_and_datastore(azurite: azurite_mod.Azurite,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch) as be:
        resp = await be.arm_get(f"/batchEndpoints/hashing{Q}")
        assert resp.status == 200
        assert int(resp.headers["x-ms-ratelimit-remaining-subscription-reads"]) > 0
        ep = await resp.json()
        assert ep["properties"]["scoringUri"] == be.scoring_uri
        assert ep["properties"]["defaults"]["deploymentName"] == "default"
        resp = await be.arm_get(f"/datastores/{DATASTORE}{Q}")
        ds = (await resp.json())["properties"]
        assert ds["accountName"] == azurite_mod.ACCOUNT
        assert ds["containerName"] == be.container
        assert ds["protocol"] == "https" and ds["endpoint"] == "core.windows.net"
        assert ds["credentials"] == {"credentialsType": "AccountKey"}
        assert azurite_mod.ACCOUNT_KEY not in await resp.text()
        assert (await be.arm_get(f"/datastores/nope{Q}")).status == 404
        resp = await be.arm_get(f"/jobs/batchjob-nope{Q}")
        assert resp.status == 404
        assert "x-ms-ratelimit-remaining-subscription-reads" in resp.headers
        await be.configure(be_workspace_id=WS)
        assert (await be.arm_get(f"/datastores/{DATASTORE}{Q}")).status == 200
        await be.configure(be_workspace_id=WS.replace("ws1", "ws2"))
        resp = await be.arm_get(f"/datastores/{DATASTORE}{Q}")
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "ResourceNotFound"
        await be.configure(be_workspace_id=None)
        resp = await be.arm_get("/jobs")
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "MissingApiVersionParameter"


async def test_job_lookup_by_tag_pages_with_next_link(
        azurite: azurite_mod.Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch, "--arm-page-size", "2") as be:
        await put_blob(azurite, be.container, "in/s.csv", SAMPLE.encode())
        names = {}
        for i in range(5):
            tags = {batch.JOB_TAG: f"job{i}", batch.ATTEMPT_TAG: "1"}
            resp = await be.invoke(body_for("in/s.csv", f"out/{i}.csv", tags=tags))
            names[(await resp.json())["name"]] = tags
        await be.invoke(body_for("in/s.csv", "out/untagged.csv"))
        # The same submission invoked again is counted: the daemon must never cause this.
        await be.invoke(body_for("in/s.csv", "out/again.csv",
                                 tags={batch.JOB_TAG: "job0", batch.ATTEMPT_TAG: "1"}))
        found: dict[str, dict[str, str]] = {}
        url: str | None = f"{be.url}{WS}/jobs{Q}&tag={batch.JOB_TAG}"
        pages = 0
        while url:
            resp = await be.arm_get(url)
            assert resp.status == 200
            page = await resp.json()
            pages += 1
            assert len(page["value"]) <= 2
            for item in page["value"]:
                assert item["properties"]["status"]
                found[item["name"]] = item["properties"]["tags"]
            url = page.get("nextLink")
        assert pages == 3
        resp = await be.arm_get(f"/jobs{Q}&tag={batch.JOB_TAG}=job1")
        assert resp.status == 400 and "tag name only" in (await resp.json())["error"]["message"]
        assert len(found) == 6
        assert {n: t for n, t in found.items() if n in names} == names
        stats = (await be.emulator_get("/_emulator/stats"))["batch"]
        assert stats["duplicate_invokes"] == 1 and stats["submissions_invoked_twice"] == 1
        assert stats["invokes"] == 7


async def test_cancel_through_arm(azurite: azurite_mod.Azurite,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch, "--run-time-s", "30",
                              "--cancel-s", "0.5") as be:
        await put_blob(azurite, be.container, "in/s.csv", SAMPLE.encode())
        name = (await (await be.invoke(body_for("in/s.csv", "out/c.csv"))).json())["name"]
        for _ in range(100):
            if (await be.job(name))["properties"]["status"] == "Running":
                break
            await asyncio.sleep(0.05)
        async with be.http.post(f"{be.url}{WS}/jobs/{name}/cancel{Q}",
                                headers=be.auth(be.arm)) as r:
            assert r.status == 202
            location = r.headers["Location"]
            assert int(r.headers["Retry-After"]) >= 1
            assert "x-ms-ratelimit-remaining-subscription-writes" in r.headers
        assert (await be.job(name))["properties"]["status"] == "CancelRequested"
        async with be.http.get(location, headers=be.auth(be.arm)) as r:
            assert r.status == 202
        assert (await be.wait_final(name))["properties"]["status"] == "Canceled"
        async with be.http.get(location, headers=be.auth(be.arm)) as r:
            assert r.status == 200
        async with be.http.post(f"{be.url}{WS}/jobs/{name}/cancel{Q}",
                                headers=be.auth(be.arm)) as r:
            assert r.status == 200  # already final: nothing to do
        await asyncio.sleep(0.3)
        assert await get_blob(azurite, be.container, "out/c.csv") is None


async def test_arm_throttles_with_retry_after(azurite: azurite_mod.Azurite,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch, "--arm-reads", "3/2") as be:
        remaining = []
        for _ in range(3):
            resp = await be.arm_get(f"/jobs{Q}")
            assert resp.status == 200
            remaining.append(int(resp.headers["x-ms-ratelimit-remaining-subscription-reads"]))
        assert remaining == [2, 1, 0]
        resp = await be.arm_get(f"/jobs{Q}")
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "TooManyRequests"
        retry_after = int(resp.headers["Retry-After"])
        assert retry_after == 1
        await asyncio.sleep(retry_after)
        assert (await be.arm_get(f"/jobs{Q}")).status == 200
        stats = (await be.emulator_get("/_emulator/stats"))["batch"]
        assert stats["arm_throttled"] == 1 and stats["arm_reads"] == 4
        await be.configure(arm_reads="off")
        for _ in range(10):
            assert (await be.arm_get(f"/jobs{Q}")).status == 200


async def test_faults_503_drops_and_not_responding(
        azurite: azurite_mod.Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch) as be:
        await put_blob(azurite, be.container, "in/s.csv", SAMPLE.encode())
        await be.configure(error_503_rate=1.0, retry_after_s=4)
        resp = await be.invoke(body_for("in/s.csv", "out/x.csv"))
        assert resp.status == 503 and resp.headers["Retry-After"] == "4"
        assert (await be.arm_get(f"/jobs{Q}")).status == 503
        await be.configure(error_503_rate=0.0, invoke_denied_rate=1.0)
        resp = await be.invoke(body_for("in/s.csv", "out/x.csv"))
        assert resp.status == 403 and await resp.text() == batch.DENIED_BY_POLICY
        await be.configure(invoke_denied_rate=0.0, invoke_201=True)
        resp = await be.invoke(body_for("in/s.csv", "out/created.csv"))
        assert resp.status == 201 and (await resp.json())["name"].startswith("batchjob-")
        await be.configure(invoke_201=False, drop_rate=1.0)
        for i in range(8):
            with pytest.raises(aiohttp.ClientError):
                await be.invoke(body_for("in/s.csv", f"out/d{i}.csv"))
        await be.configure(drop_rate=0.0, not_responding_rate=1.0, not_responding_s="0.3",
                           run_time_s="0.5")
        stats = (await be.emulator_get("/_emulator/stats"))["batch"]
        assert stats["dropped"] == 8
        # Half the drops hit after the invoke took effect: those jobs exist and run.
        assert 2 <= stats["invokes"] <= 8 and stats["jobs"] == stats["invokes"]
        assert stats["invoke_denied"] == 1
        resp = await be.invoke(body_for("in/s.csv", "out/nr.csv"))
        name = (await resp.json())["name"]
        assert (await be.wait_final(name))["properties"]["status"] == "Completed"
        history = (await be.emulator_get(f"/_emulator/batch/jobs/{name}"))["history"]
        assert history[history.index("NotResponding") + 1] == "Running"


async def test_max_running_queues_jobs(azurite: azurite_mod.Azurite,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async with batch_emulator(azurite, monkeypatch, "--max-running", "1",
                              "--run-time-s", "0.4") as be:
        await put_blob(azurite, be.container, "in/s.csv", SAMPLE.encode())
        names = [(await (await be.invoke(body_for("in/s.csv", f"out/q{i}.csv"))).json())["name"]
                 for i in range(3)]
        await asyncio.sleep(0.2)
        states = [(await be.job(n))["properties"]["status"] for n in names]
        assert states.count("Running") == 1 and states.count("Queued") == 2
        for n in names:
            assert (await be.wait_final(n))["properties"]["status"] == "Completed"
        assert (await be.emulator_get("/_emulator/stats"))["batch"]["max_running_seen"] == 1


# -- options -----------------------------------------------------------------------------------


def test_options_validate_and_name_the_knob() -> None:
    opts = options_mod.build({"prepare_s": "1,3", "arm_reads": "100/10",
                              "be_deployments": ["blue=feature_hashing"],
                              "be_default_deployment": "blue"})
    assert opts.prepare_s == (1.0, 3.0)
    assert opts.arm_reads == options_mod.TokenBucket(capacity=100, refill_per_s=10.0)
    with pytest.raises(options_mod.OptionError, match=r"^be_default_deployment: 'green'"):
        options_mod.updated(opts, {"be_default_deployment": "green"})
    with pytest.raises(options_mod.OptionError, match=r"^arm_reads: expected CAPACITY"):
        options_mod.updated(opts, {"arm_reads": "lots"})
    with pytest.raises(options_mod.OptionError, match=r"^not_responding_rate: "):
        options_mod.updated(opts, {"not_responding_rate": 2})
    with pytest.raises(options_mod.OptionError, match=r"^port: not a knob"):
        options_mod.updated(opts, {"port": 1})
    with pytest.raises(options_mod.OptionError, match=r"^nonsense: not a knob"):
        options_mod.updated(opts, {"nonsense": 1})
    secret = options_mod.build({"be_storage_connection_string": "AccountKey=s3cr3t"})
    assert "s3cr3t" not in repr(secret) and "s3cr3t" not in json.dumps(secret.public())


def test_cli_documents_the_batch_knobs() -> None:
    result = CliRunner().invoke(cli.emulator_command, ["--help"])
    assert result.exit_code == 0
    for knob in ("--token-lifetime-s", "--identity-header", "--be-deployment",
                 "--be-no-default-deployment", "--be-datastore", "--be-container",
                 "--be-storage-connection-string", "--prepare-s", "--arm-reads",
                 "--arm-page-size", "--not-responding-rate", "--be-workspace-id"):
        assert knob in result.output, knob
    result = CliRunner().invoke(cli.emulator_command, ["--arm-reads", "lots"])
    assert result.exit_code != 0 and "CAPACITY/REFILL_PER_S" in result.output
