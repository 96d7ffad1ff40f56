"""Looking a job up by its tags (before any second invoke) costs one ARM read however many jobs
the workspace holds: the client asks ARM for the tag key only that job carries. The real client
and azure-identity's managed-identity path against the emulator over HTTP, one job per ARM page
so a scan of every job would show."""

from __future__ import annotations

import os
from collections.abc import Iterator

import aiohttp
import pytest
from azure.identity import aio as identity_aio

from orchestrator.backends.batch_endpoint import budget, client, protocol
from orchestrator.emulator import process

IDENTITY_SECRET = "lookup-test-identity-header"
WORKSPACE = ("/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/rg1/providers/"
             "Microsoft.MachineLearningServices/workspaces/ws1")


@pytest.fixture
def emulator_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # Jobs stay Preparing: nothing runs (no datastore access is needed for a lookup).
    with process.spawn("--arm-page-size", "1", "--prepare-s", "3600",
                       env={process.IDENTITY_HEADER_ENV: IDENTITY_SECRET}) as (url, _):
        monkeypatch.setenv("IDENTITY_ENDPOINT", f"{url}/msi/token")
        monkeypatch.setenv("IDENTITY_HEADER", IDENTITY_SECRET)
        yield url


async def _stats(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(f"{url}/_emulator/stats") as resp:
        data = (await resp.json())["batch"]
    assert isinstance(data, dict)
    return data


async def test_a_lookup_reads_one_page_among_many_jobs(emulator_url: str) -> None:
    assert os.environ["IDENTITY_ENDPOINT"].startswith(emulator_url)
    async with aiohttp.ClientSession() as session, \
            identity_aio.ManagedIdentityCredential() as credential:
        be = client.BatchEndpointClient(
            service="be", session=session, credential=credential,
            scoring_uri=f"{emulator_url}/endpoints/hashing/jobs", deployment=None,
            workspace_id=WORKSPACE, arm_url=emulator_url, api_version="2024-04-01",
            budget=budget.ReadBudget(1000))
        names = {}
        for i in range(30):
            job_id = f"{i:032x}"
            body = protocol.build_invoke_body(
                input_name="input_data",
                input_uri=protocol.datastore_uri("workspaceblobstore", f"p/{job_id}/1/in/a.csv"),
                output_name="score",
                output_uri=protocol.datastore_uri("workspaceblobstore",
                                                  f"p/{job_id}/1/out/predictions.csv"),
                job_id=job_id, attempt="1", overrides=protocol.Overrides())
            names[job_id] = (await be.invoke(body)).name
        before = await _stats(session, emulator_url)

        last = f"{29:032x}"
        found = await be.find_job(last, "1")
        assert found is not None and found.name == names[last]
        assert await be.find_job(last, "2") is None  # another attempt: not this job
        assert await be.find_job("f" * 32, "1") is None  # never invoked

        after = await _stats(session, emulator_url)
        # Three lookups, one page each (scanning every tagged job would read 30 pages each).
        assert after["list_pages"] - before["list_pages"] == 3, (before, after)
        assert after["arm_reads"] - before["arm_reads"] == 3
