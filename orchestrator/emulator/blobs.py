"""Blob references as BES requests carry them, and streaming reads/writes through them.

A reference is either ConnectionString + RelativeLocation or BaseLocation + RelativeLocation +
SasBlobToken. Messages made here never include an AccountKey or a SAS signature.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import io
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote

import aiohttp
from azure.core import MatchConditions
from azure.core import exceptions as azure_errors
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage import blob as azblob
from azure.storage.blob import aio as azblob_aio

from orchestrator import logs

#: Azurite's well-known endpoint for `UseDevelopmentStorage=true`.
#: Lifetime of the SAS the emulator makes for its own reads of an input.
READ_SAS_LIFETIME_S = 3600
READ_ATTEMPTS = 3
READ_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)
CLIENT_CACHE_SIZE = 256
DEV_STORAGE_URL = "http://127.0.0.1:10000/devstoreaccount1"
DEV_STORAGE_ACCOUNT = "devstoreaccount1"
DEV_STORAGE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class ReferenceError_(ValueError):
    """A blob reference in a request that cannot be used (-> 400 BadArgument)."""


class StorageError(Exception):
    """A read or write that failed; the message is fit for a job's Details."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlobRef:
    account_url: str  #: e.g. http://127.0.0.1:10000/devstoreaccount1 (no trailing slash)
    container: str
    blob: str
    account_name: str | None = None
    account_key: str | None = None
    sas_token: str | None = None  #: without the leading '?'
    #: The request used the SAS form (BaseLocation + SasBlobToken).
    sas_form: bool = False

    @property
    def extension(self) -> str:
        name = self.blob.rsplit("/", 1)[-1]
        return "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""

    @property
    def where(self) -> str:
        """A credential-free description for messages."""
        return f"{self.account_url}/{self.container}/{self.blob}"

    def sibling(self, blob: str) -> BlobRef:
        return dataclasses.replace(self, blob=blob)


def parse_connection_string(text: str) -> dict[str, str]:
    parts: dict[str, str] = {}
    for item in text.split(";"):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ReferenceError_("ConnectionString is not of the form Key=Value;Key=Value")
        parts[key.strip().lower()] = value.strip()
    return parts


def _split_location(relative: str) -> tuple[str, str]:
    container, _, blob = relative.lstrip("/").partition("/")
    if not container or not blob:
        raise ReferenceError_(
            f"RelativeLocation {relative!r} must be 'container/path/to/blob'"
        )
    return container, blob


def _from_connection_string(conn: str, container: str, blob: str) -> BlobRef:
    parts = parse_connection_string(conn)
    if parts.get("usedevelopmentstorage", "").lower() == "true":
        return BlobRef(account_url=DEV_STORAGE_URL, container=container, blob=blob,
                       account_name=DEV_STORAGE_ACCOUNT, account_key=DEV_STORAGE_KEY)
    name = parts.get("accountname")
    endpoint = parts.get("blobendpoint")
    if not endpoint:
        if not name:
            raise ReferenceError_("ConnectionString has neither BlobEndpoint nor AccountName")
        protocol = parts.get("defaultendpointsprotocol", "https")
        suffix = parts.get("endpointsuffix", "core.windows.net")
        endpoint = f"{protocol}://{name}.blob.{suffix}"
    key = parts.get("accountkey")
    sas = parts.get("sharedaccesssignature")
    if not key and not sas:
        raise ReferenceError_("ConnectionString has neither AccountKey nor SharedAccessSignature")
    if key and not name:
        raise ReferenceError_("ConnectionString has an AccountKey but no AccountName")
    return BlobRef(account_url=endpoint.rstrip("/"), container=container, blob=blob,
                   account_name=name, account_key=key,
                   sas_token=sas.lstrip("?") if sas else None)


def from_connection_string(conn: str, container: str, blob: str) -> BlobRef:
    """A BlobRef to `container/blob` of the account a connection string names."""
    return _from_connection_string(conn, container, blob)


def parse_reference(obj: object) -> BlobRef:
    """A BlobRef from a request's {ConnectionString|BaseLocation+SasBlobToken, RelativeLocation}."""
    if not isinstance(obj, Mapping):
        raise ReferenceError_("a blob reference must be a JSON object")
    relative = obj.get("RelativeLocation")
    if not isinstance(relative, str) or not relative.strip():
        raise ReferenceError_("RelativeLocation is missing")
    container, blob = _split_location(relative.strip())
    conn = obj.get("ConnectionString")
    if isinstance(conn, str) and conn.strip():
        return _from_connection_string(conn, container, blob)
    base = obj.get("BaseLocation")
    token = obj.get("SasBlobToken")
    if isinstance(base, str) and base.strip() and isinstance(token, str) and token.strip():
        return BlobRef(account_url=base.strip().rstrip("/"), container=container, blob=blob,
                       sas_token=token.strip().lstrip("?"), sas_form=True)
    raise ReferenceError_(
        "a blob reference needs ConnectionString, or BaseLocation and SasBlobToken"
    )


def redact_reference(obj: object) -> object:
    """The reference as submitted, with AccountKey and SAS values replaced by '***'."""
    if not isinstance(obj, Mapping):
        return obj
    out: dict[str, Any] = dict(obj)
    if isinstance(out.get("ConnectionString"), str):
        out["ConnectionString"] = logs.scrub(
            ";".join(
                (p.split("=", 1)[0] + "=***")
                if p.split("=", 1)[0].strip().lower() in {"accountkey", "sharedaccesssignature"}
                else p
                for p in out["ConnectionString"].split(";")
            )
        )
    if out.get("SasBlobToken") is not None:
        out["SasBlobToken"] = "***"
    return out


class Storage:
    """Blob clients that share one aiohttp session (a client per job costs no connection)."""

    def __init__(self, *, chunk_bytes: int) -> None:
        self._chunk_bytes = chunk_bytes
        self._session: aiohttp.ClientSession | None = None
        self._containers: dict[tuple[str | None, ...], azblob_aio.ContainerClient] = {}

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=256)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self, ref: BlobRef) -> azblob_aio.BlobClient:
        # A container client builds the SDK pipeline once; its blob clients share it (building
        # a pipeline per job was a sixth of the emulator's CPU in the throughput bench).
        key = (ref.account_url, ref.account_name, ref.account_key, ref.sas_token, ref.container)
        container = self._containers.get(key)
        if container is None:
            credential: Any
            if ref.account_key and ref.account_name:
                credential = {"account_name": ref.account_name, "account_key": ref.account_key}
            else:
                credential = ref.sas_token
            container = azblob_aio.ContainerClient(
                ref.account_url, ref.container, credential=credential,
                transport=AioHttpTransport(session=self._session, session_owner=False),
                max_single_get_size=self._chunk_bytes, max_chunk_get_size=self._chunk_bytes,
                max_single_put_size=self._chunk_bytes, max_block_size=self._chunk_bytes,
                retry_total=2, initial_backoff=0.2, increment_base=1, random_jitter_range=0.2,
                connection_timeout=10,
            )
            if len(self._containers) >= CLIENT_CACHE_SIZE:
                self._containers.pop(next(iter(self._containers)))
            self._containers[key] = container
        return container.get_blob_client(ref.blob)

    def _read_url(self, ref: BlobRef) -> str:
        if ref.account_key and ref.account_name:
            token = azblob.generate_blob_sas(
                ref.account_name, ref.container, ref.blob, account_key=ref.account_key,
                permission=azblob.BlobSasPermissions(read=True),
                expiry=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=READ_SAS_LIFETIME_S),
            )
        else:
            token = ref.sas_token or ""
        return f"{ref.account_url}/{ref.container}/{quote(ref.blob)}?{token}"

    async def _get(self, ref: BlobRef, *, name: str) -> aiohttp.ClientResponse:
        """GET the blob, retrying connection errors and 5xx before the first byte."""
        assert self._session is not None
        url = self._read_url(ref)
        for attempt in range(READ_ATTEMPTS):
            last = attempt == READ_ATTEMPTS - 1
            try:
                resp = await self._session.get(url, timeout=READ_TIMEOUT)
            except (aiohttp.ClientError, TimeoutError):
                if last:
                    raise StorageError(f"{name}: cannot reach storage at {ref.account_url} to "
                                       f"read {ref.container}/{ref.blob}") from None
            else:
                if resp.status < 500 or last:
                    return resp
                resp.release()
            await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def read(self, ref: BlobRef, *, name: str) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks of at most `chunk_bytes`.

        Plain aiohttp with a short-lived read SAS: about 3x cheaper than the SDK's downloader
        (measured in bench/emulator_throughput.py), and it streams just the same."""
        async with await self._get(ref, name=name) as resp:
            if resp.status != 200:
                raise StorageError(describe_status(resp.status, resp.headers.get(
                    "x-ms-error-code"), name=name, ref=ref, verb="read"))
            try:
                async for chunk in resp.content.iter_chunked(self._chunk_bytes):
                    yield chunk
            except (aiohttp.ClientError, TimeoutError):
                raise StorageError(f"{name}: the connection to storage at {ref.account_url} "
                                   f"broke while reading {ref.container}/{ref.blob}") from None

    async def write(self, ref: BlobRef, chunks: AsyncIterator[bytes], *, name: str,
                    overwrite: bool = True) -> None:
        """Upload the stream: one PUT if it fits in a chunk, else staged blocks then a commit.

        `overwrite=False`: the write fails (409 BlobAlreadyExists) if the blob exists."""
        if_missing: dict[str, Any] = {} if overwrite else {
            "match_condition": MatchConditions.IfMissing}
        client = self._client(ref)
        buf = bytearray()
        blocks: list[str] = []
        try:
            async for chunk in chunks:
                buf += chunk
                while len(buf) >= self._chunk_bytes:
                    blocks.append(await self._stage(client, len(blocks),
                                                    bytes(buf[: self._chunk_bytes])))
                    del buf[: self._chunk_bytes]
            if not blocks:
                # A stream, not bytes: aiohttp warns that a large bytes body blocks the loop.
                await client.upload_blob(io.BytesIO(buf), length=len(buf), overwrite=overwrite)
                return
            if buf:
                blocks.append(await self._stage(client, len(blocks), bytes(buf)))
            await client.commit_block_list([azblob.BlobBlock(block_id=b) for b in blocks],
                                           **if_missing)
        except azure_errors.AzureError as exc:
            raise StorageError(describe(exc, name=name, ref=ref, verb="write")) from None

    async def ensure_container(self, ref: BlobRef) -> None:
        """Create the reference's container unless it exists."""
        self._client(ref)
        key = (ref.account_url, ref.account_name, ref.account_key, ref.sas_token, ref.container)
        try:
            await self._containers[key].create_container()
        except azure_errors.ResourceExistsError:
            pass
        except azure_errors.AzureError as exc:
            raise StorageError(f"cannot create container {ref.container} at "
                               f"{ref.account_url}: {type(exc).__name__}") from None

    @staticmethod
    async def _stage(client: azblob_aio.BlobClient, index: int, data: bytes) -> str:
        block_id = base64.b64encode(f"block-{index:08d}".encode()).decode()
        await client.stage_block(block_id, io.BytesIO(data), length=len(data))
        return block_id


def describe_status(status: int, code: str | None, *, name: str, ref: BlobRef,
                    verb: str) -> str:
    if status == 404:
        return (f"{name}: blob {ref.container}/{ref.blob} not found at {ref.account_url} "
                f"({code or 'not found'})")
    if status in (401, 403):
        return (f"{name}: storage at {ref.account_url} refused the credentials to {verb} "
                f"{ref.container}/{ref.blob}; check the AccountKey or SAS token")
    return (f"{name}: storage at {ref.account_url} answered {status} ({code or 'no code'}) "
            f"when asked to {verb} {ref.container}/{ref.blob}")


def describe(exc: BaseException, *, name: str, ref: BlobRef, verb: str) -> str:
    """A Details line a person can act on, free of credentials."""
    if isinstance(exc, azure_errors.ResourceExistsError) or (
            isinstance(exc, azure_errors.HttpResponseError) and exc.status_code == 412
            and verb == "write"):
        return (f"{name}: blob {ref.container}/{ref.blob} already exists at {ref.account_url}; "
                "it is not overwritten")
    if isinstance(exc, azure_errors.ResourceNotFoundError):
        what = _code(exc) or "not found"
        return f"{name}: blob {ref.container}/{ref.blob} not found at {ref.account_url} ({what})"
    if isinstance(exc, azure_errors.ClientAuthenticationError) or (
            isinstance(exc, azure_errors.HttpResponseError) and exc.status_code == 403):
        return (f"{name}: storage at {ref.account_url} refused the credentials to {verb} "
                f"{ref.container}/{ref.blob}; check the AccountKey or SAS token")
    if isinstance(exc, azure_errors.ServiceRequestError):
        return f"{name}: cannot reach storage at {ref.account_url} to {verb} {ref.container}/" \
               f"{ref.blob}"
    if isinstance(exc, azure_errors.HttpResponseError):
        code = _code(exc) or exc.status_code
        return (f"{name}: storage at {ref.account_url} answered {exc.status_code} ({code}) "
                f"when asked to {verb} {ref.container}/{ref.blob}")
    return logs.scrub(f"{name}: could not {verb} {ref.container}/{ref.blob}: "
                      f"{type(exc).__name__}")


def _code(exc: BaseException) -> str | None:
    code = getattr(exc, "error_code", None)
    return None if code is None else str(getattr(code, "value", code))


def read_sas(ref: BlobRef, *, lifetime_s: float) -> str:
    """`?sv=...&sig=...`: read-only for this blob when the account key is known, else the
    token the request gave (the service cannot sign without the key)."""
    if ref.account_key and ref.account_name:
        token = azblob.generate_blob_sas(
            ref.account_name, ref.container, ref.blob, account_key=ref.account_key,
            permission=azblob.BlobSasPermissions(read=True),
            start=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5),
            expiry=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lifetime_s),
        )
        return "?" + token
    return "?" + (ref.sas_token or "")


def result_reference(ref: BlobRef, *, lifetime_s: float) -> dict[str, str | None]:
    return {
        "ConnectionString": None,
        "BaseLocation": ref.account_url + "/",
        "RelativeLocation": f"{ref.container}/{quote(ref.blob)}",
        "SasBlobToken": read_sas(ref, lifetime_s=lifetime_s),
    }
