"""`config check --online`: compare the configuration with what the services and the storage
account really are, before the first file finds out.

For each service: fetch its description (`swagger.json` for BES and RRS) and compare the input
names, output names and global parameter names with the configuration. For the storage account:
list the container, write a probe blob and delete it. Every check is one row of a table; any
row that does not match makes the command exit 1. Nothing here changes a job or the database.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp

from orchestrator import config, logs

API_VERSION = "2.0"
#: Seconds for each call: a check must answer promptly or say it could not.
TIMEOUT_S = 20.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Check:
    """One row: `subject` (services.NAME or storage), `item` checked, what the configuration
    says and what the service answered; `ok` False is a mismatch or an error."""

    subject: str
    item: str
    configured: str
    found: str
    ok: bool


def _names(doc: Mapping[str, Any], definition: str) -> list[str] | None:
    definitions = doc.get("definitions")
    if not isinstance(definitions, Mapping):
        return None
    d = definitions.get(definition)
    if not isinstance(d, Mapping):
        return None
    props = d.get("properties")
    if not isinstance(props, Mapping):
        return None
    return [str(n) for n in props]


def compare_names(subject: str, item: str, configured: Iterable[str], declared: Sequence[str],
                  *, all_required: bool) -> list[Check]:
    """One row per name. A configured name the service does not declare is a mismatch; with
    `all_required`, so is a declared name the configuration does not give."""
    rows = []
    configured = list(configured)
    for name in configured:
        ok = name in declared
        rows.append(Check(subject=subject, item=f"{item} {name}", configured=name,
                          found=name if ok else f"not declared (service has: "
                          f"{', '.join(declared) or 'none'})", ok=ok))
    for name in declared:
        if name not in configured:
            rows.append(Check(
                subject=subject, item=f"{item} {name}", configured="not configured",
                found=name + ("" if all_required else " (service default applies)"),
                ok=not all_required))
    return rows


def compare_service(subject: str, svc: Any, doc: Mapping[str, Any]) -> list[Check]:
    """Pure: the rows for one service's swagger.json."""
    rows: list[Check] = []
    inputs = _names(doc, "ExecutionInputs")
    outputs = _names(doc, "ExecutionOutputs")
    params = _names(doc, "GlobalParameters")
    configured_inputs = [svc.input_name, *getattr(svc, "extra_inputs", {})]
    for item, declared, configured, required in (
        ("input", inputs, configured_inputs, True),
        ("output", outputs, list(svc.outputs), True),
        ("global parameter", params, list(svc.global_parameters), False),
    ):
        if declared is None:
            if configured or required:
                rows.append(Check(subject=subject, item=f"{item} names",
                                  configured=", ".join(configured),
                                  found="swagger.json does not list them", ok=False))
            continue
        rows += compare_names(subject, item, configured, declared, all_required=required)
    return rows


def _describe_url(svc: Any) -> str:
    if svc.kind == "bes":
        return str(svc.jobs_url).rsplit("/", 1)[0] + "/swagger.json"
    return str(svc.execute_url).rsplit("/", 1)[0] + "/swagger.json"


async def check_service(name: str, svc: Any, session: aiohttp.ClientSession) -> list[Check]:
    subject = f"services.{name}"
    if svc.kind not in ("bes", "rrs"):
        return [Check(subject=subject, item="description", configured=svc.kind,
                      found="not checked: this kind publishes no swagger.json", ok=True)]
    headers = {"Authorization": f"Bearer {svc.api_key.get()}", "Accept": "application/json"}
    if svc.apim_key is not None:
        headers["Ocp-Apim-Subscription-Key"] = svc.apim_key.get()
    url = _describe_url(svc)
    try:
        async with session.get(url, params={"api-version": API_VERSION}, headers=headers,
                               timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
                               allow_redirects=False) as resp:
            if resp.status != 200:
                text = (await resp.content.read(300)).decode("utf-8", "replace")
                return [Check(subject=subject, item="swagger.json", configured=url,
                              found=f"HTTP {resp.status}: {' '.join(text.split())}", ok=False)]
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return [Check(subject=subject, item="swagger.json", configured=url,
                      found=f"cannot fetch: {type(exc).__name__}: {exc}", ok=False)]
    if not isinstance(doc, Mapping):
        return [Check(subject=subject, item="swagger.json", configured=url,
                      found="not a JSON object", ok=False)]
    rows = [Check(subject=subject, item="swagger.json", configured=url, found="fetched",
                  ok=True)]
    return rows + compare_service(subject, svc, doc)


async def check_storage(storage: config.StorageConfig) -> list[Check]:
    """List the container, write a probe blob, delete it: the three things the daemon does."""
    from azure.core import exceptions as azure_errors
    from azure.storage.blob import aio as azblob_aio

    subject = "storage"
    container = storage.container
    if getattr(storage, "account_url", None) is not None:
        return [Check(subject=subject, item="account", configured=str(storage.account_url),
                      found="not checked: Entra ID access is checked by the daemon", ok=True)]
    service = azblob_aio.BlobServiceClient.from_connection_string(
        storage.connection_string.get(), retry_total=0, connection_timeout=TIMEOUT_S,
        read_timeout=TIMEOUT_S)
    rows: list[Check] = []
    probe = f"bes-orchestrator-probe-{uuid.uuid4().hex}.txt"
    try:
        client = service.get_container_client(container)

        async def step(item: str, action: Any) -> bool:
            try:
                found = await action()
            except azure_errors.AzureError as exc:
                rows.append(Check(subject=subject, item=item, configured=container,
                                  found=_azure_error(exc), ok=False))
                return False
            rows.append(Check(subject=subject, item=item, configured=container, found=found,
                              ok=True))
            return True

        async def list_container() -> str:
            if not await client.exists():
                # The daemon creates it at start; doing so here tests the right to write.
                await client.create_container()
                return "did not exist: created (as the daemon would at start)"
            n = 0
            async for _ in client.list_blobs(results_per_page=5):
                n += 1
                if n >= 5:
                    break
            return "listed" + (" (empty)" if n == 0 else "")

        async def write_probe() -> str:
            await client.upload_blob(probe, b"bes-orchestrator config check --online\n",
                                     overwrite=True)
            return f"wrote {probe}"

        async def delete_probe() -> str:
            await client.delete_blob(probe)
            return f"deleted {probe}"

        if await step("list container", list_container) and await step(
                "write probe blob", write_probe):
            await step("delete probe blob", delete_probe)
    finally:
        await service.close()
    return rows


def _azure_error(exc: Exception) -> str:
    """The error code and the message's first line (not the request id and time lines)."""
    code = getattr(exc, "error_code", None) or type(exc).__name__
    message = str(getattr(exc, "message", None) or exc).strip().splitlines()
    return f"{code}: {message[0][:200] if message else ''}"


async def run(settings: config.Settings) -> list[Check]:
    async with aiohttp.ClientSession() as session:
        rows: list[Check] = []
        for name, svc in settings.services.items():
            rows += await check_service(name, svc, session)
    return rows + await check_storage(settings.storage)


def render(rows: Sequence[Check]) -> str:
    """A plain text table (secrets scrubbed), then one line: how many checks did not match."""
    head = ("", "what", "item", "configured", "found")
    lines = [("ok" if r.ok else "MISMATCH", r.subject, r.item, r.configured, r.found)
             for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(4)]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths, strict=True))
           + "  " + str(row[4]) for row in [head, *lines]]
    bad = sum(not r.ok for r in rows)
    out.append(f"{len(rows) - bad} of {len(rows)} checks match"
               + (f"; {bad} do not" if bad else ""))
    return logs.scrub("\n".join(line.rstrip() for line in out))
