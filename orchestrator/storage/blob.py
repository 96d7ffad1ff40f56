"""Blob storage: input uploads (plain Put Blob / Put Block with a cached container SAS, or the SDK
without an account key), submit-body references (connection string or SAS), and result
downloads (plain aiohttp on the SAS URL: about 3× faster than the SDK's `download_blob`, measured
on small and large files) written atomically by `backends.results`.

The result URL comes from the BES service, so it is a trust boundary: only the configured storage
endpoint (or an explicitly allowed host) is ever fetched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import io
import os
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from azure.core import exceptions as azure_errors
from azure.core.pipeline.transport import AioHttpTransport
from azure.storage import blob as azblob
from azure.storage.blob import aio as azblob_aio

from orchestrator import clock, config, errors, redact
from orchestrator.backends import results
from orchestrator.backends.bes import protocol

#: Download read size: big enough for throughput, small enough to keep memory flat.
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
#: A download may take long, but not stall: abort when no byte came for this long.
DOWNLOAD_READ_TIMEOUT_S = 120.0
DOWNLOAD_CONNECT_TIMEOUT_S = 30.0
#: SAS start time is set this far back, so a clock a little behind still accepts it.
SAS_CLOCK_SKEW_S = 300.0
#: The SDK's own retries before an error reaches our backoff.
SDK_RETRY_TOTAL = 2
#: Files up to this size go up in one plain PUT (below aiohttp's large-body warning).
SMALL_PUT_BYTES = 256 * 1024
#: The cached container SAS used for those PUTs: never stored, never logged.
UPLOAD_SAS_LIFETIME_S = 4 * 3600.0
DEFAULT_PORTS = {"http": 80, "https": 443}
DEV_ACCOUNT = "devstoreaccount1"


class UrlRef(Protocol):
    """A result reference fetched by URL (BES `Results`): `url` carries the SAS token."""

    @property
    def public_url(self) -> str: ...

    @property
    def url(self) -> str: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Account:
    """What a connection string says. `key` / `sas` are secrets: never log this object."""

    name: str
    key: str | None
    sas: str | None
    endpoint: str  #: scheme://host[:port][/account], no trailing slash

    def __repr__(self) -> str:
        return f"Account(name={self.name!r}, endpoint={self.endpoint!r})"


def parse_connection_string(connection_string: str) -> Account:
    """Azurite style (`BlobEndpoint=`) and real accounts (`EndpointSuffix=`), without the SDK."""
    fields: dict[str, str] = {}
    for part in connection_string.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            fields[k.strip().lower()] = v.strip()
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        from orchestrator import azurite  # the well-known public dev account

        return Account(name=DEV_ACCOUNT, key=azurite.ACCOUNT_KEY, sas=None,
                       endpoint=f"http://127.0.0.1:10000/{DEV_ACCOUNT}")
    name = fields.get("accountname", "")
    endpoint = fields.get("blobendpoint", "").rstrip("/")
    if not endpoint:
        if not name:
            raise errors.PermanentError(
                "storage connection string has neither AccountName nor BlobEndpoint",
                code="BadConnectionString",
            )
        scheme = fields.get("defaultendpointsprotocol", "https").lower()
        suffix = fields.get("endpointsuffix", "core.windows.net")
        endpoint = f"{scheme}://{name}.blob.{suffix}"
    if not endpoint.startswith(("http://", "https://")):
        raise errors.PermanentError("storage BlobEndpoint must be an http(s) URL",
                                    code="BadConnectionString")
    if not name:
        name = urllib.parse.urlsplit(endpoint).path.strip("/").split("/", 1)[0]
    sas = fields.get("sharedaccesssignature") or None
    return Account(name=name, key=fields.get("accountkey") or None, sas=sas, endpoint=endpoint)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme, 0)
    except ValueError:
        port = -1
    return scheme, host, port


def _storage_error(action: str, exc: Exception) -> errors.OrchestratorError:
    """An SDK error as ours: connection trouble and 5xx are transient, other refusals are not."""
    if isinstance(exc, azure_errors.HttpResponseError) and exc.status_code is not None:
        status = exc.status_code
        code = str(getattr(exc, "error_code", None) or "") or f"HTTP{status}"
        message = f"storage {action} failed: HTTP {status} {code}"
        if protocol.is_transient(status):
            return errors.TransientError(message, code=code, status=status)
        return errors.PermanentError(message, code=code, status=status)
    return errors.TransientError(
        f"storage {action} failed: {type(exc).__name__}", code="StorageUnavailable"
    )


PUT_SLICE_BYTES = 256 * 1024


async def _slices(view: memoryview) -> AsyncIterator[memoryview]:
    for start in range(0, len(view), PUT_SLICE_BYTES):
        yield view[start:start + PUT_SLICE_BYTES]


async def _run_workers(worker: Callable[[], Coroutine[Any, Any, None]], n: int) -> None:
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(worker()) for _ in range(n)]
    try:
        # Plain gather (not a TaskGroup): the first error surfaces as itself, not a group.
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class BlobStore:
    """The daemon's one storage account and container."""

    def __init__(self, storage: config.StorageConfig, session: aiohttp.ClientSession, *,
                 sdk_retries: int = SDK_RETRY_TOTAL) -> None:
        self.storage = storage
        self.session = session
        connection_string = self._connection_string()
        self.account = parse_connection_string(connection_string)
        self._secrets = [s for s in (connection_string, self.account.key, self.account.sas) if s]
        self._service = azblob_aio.BlobServiceClient.from_connection_string(
            connection_string,
            transport=AioHttpTransport(session=session, session_owner=False),
            # Short SDK retries (its default waits 15 s, 18 s, 24 s): a block that hiccups is
            # retried in place; an outage reaches our own backoff within seconds.
            retry_policy=azblob_aio.ExponentialRetry(
                initial_backoff=1, increment_base=2, retry_total=sdk_retries,
                random_jitter_range=1,
            ),
            max_block_size=storage.upload_chunk_bytes,
            max_single_put_size=storage.upload_chunk_bytes,
        )
        self._container = self._service.get_container_client(storage.container)
        self._put_sas: tuple[str, dt.datetime] | None = None

    def _connection_string(self) -> str:
        if self.storage.connection_string is None:
            raise errors.ConfigError("storage.account_url",
                                     "Entra ID storage access is not available in this build;"
                                     " use connection_string_env")
        return self.storage.connection_string.get()

    @property
    def endpoint(self) -> str:
        """scheme://host[:port][/account]: the configured blob endpoint."""
        return self.account.endpoint

    @property
    def container(self) -> str:
        return self.storage.container

    async def ensure_container(self) -> None:
        """Create the container unless it exists."""
        try:
            await self._container.create_container()
        except azure_errors.ResourceExistsError:
            pass
        except azure_errors.AzureError as exc:
            raise _storage_error("create container", exc) from None

    async def close(self) -> None:
        await self._service.close()

    # ---- upload ---------------------------------------------------------------------------

    async def upload_file(self, path: Path, blob_name: str) -> int:
        """Upload `path` to `blob_name` (overwriting: a repeat after a crash is harmless).

        Streamed in blocks of `upload_chunk_bytes`, `upload_parallelism` at a time, read from
        disk in a thread: memory stays at about chunk × parallelism whatever the file size.
        """
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise errors.PermanentError(f"cannot read input {path.name!r}: {exc.strerror}",
                                        code="InputUnreadable") from None
        try:
            size = os.fstat(fd).st_size
            chunk = self.storage.upload_chunk_bytes
            if self.account.key is not None:  # plain HTTP with our own SAS: fewer copies, less CPU
                if size <= SMALL_PUT_BYTES:
                    data = await asyncio.to_thread(os.pread, fd, size, 0)
                    await self._put(blob_name, "", data, {"x-ms-blob-type": "BlockBlob"})
                    return len(data)
                await self._upload_blocks_http(blob_name, fd, size, chunk)
                return size
            client = self._container.get_blob_client(blob_name)
            if size <= chunk:
                data = await asyncio.to_thread(os.pread, fd, size, 0)
                await client.upload_blob(io.BytesIO(data), length=len(data), overwrite=True)
                return len(data)
            await self._upload_blocks(client, fd, size, chunk)
            return size
        except azure_errors.AzureError as exc:
            raise _storage_error("upload", exc) from None
        finally:
            os.close(fd)

    def _upload_sas(self) -> str:
        """A container SAS allowing create/write, cached until an hour before it expires."""
        now = clock.now()
        if self._put_sas is None or now >= self._put_sas[1]:
            assert self.account.key is not None
            token = azblob.generate_container_sas(
                account_name=self.account.name, container_name=self.storage.container,
                account_key=self.account.key,
                permission=azblob.ContainerSasPermissions(write=True, create=True),
                start=now - dt.timedelta(seconds=SAS_CLOCK_SKEW_S),
                expiry=now + dt.timedelta(seconds=UPLOAD_SAS_LIFETIME_S),
            )
            refresh_at = now + dt.timedelta(seconds=UPLOAD_SAS_LIFETIME_S - 3600)
            self._put_sas = (token, refresh_at)
        return self._put_sas[0]

    async def _put(self, blob_name: str, query: str, data: bytes | memoryview,
                   headers: dict[str, str]) -> None:
        """One PUT to our blob with plain aiohttp (Put Blob, Put Block, Put Block List): the
        SDK's client construction and policy pipeline cost more CPU than a small transfer
        (bench/throughput.py profile) and held extra copies of each block (bench/large.py)."""
        url = f"{self.blob_url(blob_name)}?{query}{'&' if query else ''}{self._upload_sas()}"
        try:
            # Slices of the caller's buffer: nothing copied, no big-bytes warning from aiohttp;
            # the explicit Content-Length keeps it from chunked encoding, which storage refuses.
            async with self.session.put(
                url, data=_slices(memoryview(data)),
                headers={**headers, "Content-Length": str(len(data))}, allow_redirects=False,
            ) as resp:
                if resp.status >= 300:
                    status = resp.status
                    code = resp.headers.get("x-ms-error-code", "") or f"HTTP{status}"
                    message = f"storage upload failed: HTTP {status} {code}"
                    if protocol.is_transient(status):
                        raise errors.TransientError(message, code=code, status=status)
                    raise errors.PermanentError(message, code=code, status=status)
        except aiohttp.InvalidURL:  # no retry fixes a malformed endpoint
            raise errors.PermanentError(
                "storage upload failed: the blob endpoint is not a usable URL", code="BadUrl"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise errors.TransientError(
                f"storage upload failed: {type(exc).__name__}", code="StorageUnavailable"
            ) from None

    async def _upload_blocks_http(self, blob_name: str, fd: int, size: int, chunk: int) -> None:
        """Put Block × n (upload_parallelism at a time, each block read just before it is
        sent), then Put Block List: memory stays at about chunk × parallelism."""
        count = (size + chunk - 1) // chunk
        ids = [base64.b64encode(f"{i:08d}".encode()).decode() for i in range(count)]
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            buf = bytearray(chunk)  # one buffer per worker, reused for every block it sends
            while next_index < count:
                i = next_index
                next_index += 1
                offset = i * chunk
                want = min(chunk, size - offset)
                view = memoryview(buf)[:want]
                got = await asyncio.to_thread(os.preadv, fd, [view], offset)
                if got != want:
                    raise errors.PermanentError("input file changed while uploading",
                                                code="InputChanged")
                block = urllib.parse.quote(ids[i], safe="")
                await self._put(blob_name, f"comp=block&blockid={block}", view, {})

        await _run_workers(worker, min(self.storage.upload_parallelism, count))
        body = ("<?xml version=\"1.0\" encoding=\"utf-8\"?><BlockList>"
                + "".join(f"<Latest>{b}</Latest>" for b in ids) + "</BlockList>").encode()
        await self._put(blob_name, "comp=blocklist", body,
                        {"Content-Type": "application/xml"})

    async def _upload_blocks(self, client: azblob_aio.BlobClient, fd: int, size: int,
                             chunk: int) -> None:
        count = (size + chunk - 1) // chunk
        # Fixed-width ids: every block id of a blob must have the same length.
        ids = [base64.b64encode(f"{i:08d}".encode()).decode() for i in range(count)]
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                i = next_index
                next_index += 1
                offset = i * chunk
                data = await asyncio.to_thread(os.pread, fd, min(chunk, size - offset), offset)
                if len(data) != min(chunk, size - offset):
                    raise errors.PermanentError("input file changed while uploading",
                                                code="InputChanged")
                # A file object: aiohttp streams it instead of warning about a big bytes body.
                await client.stage_block(ids[i], io.BytesIO(data), length=len(data))

        await _run_workers(worker, min(self.storage.upload_parallelism, count))
        await client.commit_block_list([azblob.BlobBlock(block_id=b) for b in ids])

    # ---- references -----------------------------------------------------------------------

    def reference(self, blob_name: str, *, write: bool) -> dict[str, Any]:
        """The submit-body reference of a blob in our container."""
        return self.reference_for(self.storage.container, blob_name, write=write)

    def reference_for(self, container: str, blob_name: str, *, write: bool) -> dict[str, Any]:
        """A submit-body reference in the configured form (`storage.reference`)."""
        if self.storage.reference != "sas":
            return protocol.blob_reference_connection_string(
                self._connection_string(), container, blob_name
            )
        return protocol.blob_reference_sas(
            self.endpoint, container, blob_name, self.sas_token(container, blob_name, write=write)
        )

    def sas_token(self, container: str, blob_name: str, *, write: bool,
                  lifetime_s: float | None = None) -> str:
        """A blob SAS: read, or write+create for outputs. Secret: never log it."""
        if self.account.key is None:
            if self.account.sas:  # an account SAS in the connection string: reuse it
                return self.account.sas
            raise errors.PermanentError(
                "SAS references need an AccountKey in the storage connection string",
                code="BadConnectionString",
            )
        now = clock.now()
        lifetime = self.storage.sas_lifetime_s if lifetime_s is None else lifetime_s
        permission = (azblob.BlobSasPermissions(read=True, write=True, create=True) if write
                      else azblob.BlobSasPermissions(read=True))
        return azblob.generate_blob_sas(
            account_name=self.account.name,
            container_name=container,
            blob_name=blob_name,
            account_key=self.account.key,
            permission=permission,
            start=now - dt.timedelta(seconds=SAS_CLOCK_SKEW_S),
            expiry=now + dt.timedelta(seconds=lifetime),
        )

    def blob_url(self, blob_name: str) -> str:
        """The token-free URL of a blob in our container."""
        quoted = urllib.parse.quote(blob_name)
        return f"{self.endpoint}/{self.storage.container}/{quoted}"

    # ---- download -------------------------------------------------------------------------

    def check_result_url(self, ref: UrlRef) -> None:
        """Refuse a result that points anywhere but our storage endpoint or an allowed host."""
        scheme, host, port = _origin(ref.public_url)
        if scheme not in ("http", "https") or not host:
            raise errors.PermanentError(
                f"result URL {redact.redact_url(ref.public_url)!r:.200} is not an http(s) URL;"
                " refused", code="ResultRefused",
            )
        own = _origin(self.endpoint)
        if (scheme, host, port) == own:
            return
        allowed = {h.lower() for h in self.storage.allowed_result_hosts}
        # Plain http only when our own endpoint is plain http (a development setup).
        scheme_ok = scheme == "https" or own[0] == "http"
        if scheme_ok and (host in allowed or f"{host}:{port}" in allowed):
            return
        raise errors.PermanentError(
            f"result points to host {host}:{port}, not the configured storage endpoint; refused",
            code="ResultRefused",
        )

    async def download(self, ref: UrlRef, dest: Path) -> int:
        """Fetch a result to `dest` atomically (replacing it); returns the byte count."""
        total, _ = await self.download_unique(ref, dest, None)
        return total

    async def download_unique(self, ref: UrlRef, dest: Path, alt: Path | None
                              ) -> tuple[int, Path]:
        """Fetch a result atomically (`backends.results.write`: temp name, fsync, rename, the
        unique-name rule with `alt`); returns the byte count and where it landed."""
        return await results.write(self.open_download(ref), dest, alt)

    @contextlib.asynccontextmanager
    async def open_download(self, ref: UrlRef) -> AsyncIterator[AsyncIterator[bytes]]:
        """GET the result's SAS URL: entering checks the host and the answer; the iterator
        yields the body in chunks and raises `Truncated` if it ends short. Every network error
        comes out as ours (transient, or permanent for a refusal)."""
        self.check_result_url(ref)
        where = redact.redact_url(ref.public_url)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=DOWNLOAD_CONNECT_TIMEOUT_S,
            sock_read=DOWNLOAD_READ_TIMEOUT_S,
        )
        try:
            async with self.session.get(ref.url, timeout=timeout, allow_redirects=False,
                                        auto_decompress=False) as resp:
                if resp.status != 200:
                    raise self._download_error(resp, where)

                async def chunks() -> AsyncIterator[bytes]:
                    total = 0
                    try:
                        async for data in resp.content.iter_chunked(DOWNLOAD_CHUNK_BYTES):
                            total += len(data)
                            yield data
                    except (TimeoutError, aiohttp.ClientError) as exc:
                        raise errors.TransientError(
                            f"download of {where} failed: {type(exc).__name__}",
                            code="DownloadFailed",
                        ) from None
                    expected = resp.content_length
                    if expected is not None and total != expected:
                        raise errors.TransientError(
                            f"download of {where} ended after {total} of {expected} bytes",
                            code="Truncated",
                        )

                yield chunks()
        except (TimeoutError, aiohttp.InvalidURL) as exc:
            if isinstance(exc, aiohttp.InvalidURL):
                raise errors.PermanentError(f"result URL {where!r:.200} is not usable",
                                            code="BadUrl") from None
            raise errors.TransientError(
                f"download of {where} failed: {type(exc).__name__}", code="DownloadFailed"
            ) from None
        except aiohttp.ClientError as exc:
            raise errors.TransientError(
                f"download of {where} failed: {type(exc).__name__}", code="DownloadFailed"
            ) from None

    def _download_error(self, resp: aiohttp.ClientResponse, where: str
                        ) -> errors.OrchestratorError:
        status = resp.status
        code = resp.headers.get("x-ms-error-code", "") or f"HTTP{status}"
        retry_after = protocol.parse_retry_after(resp.headers.get("Retry-After"))
        if status in (401, 403):
            return errors.PermanentError(
                f"download of {where} refused (HTTP {status} {code}): the SAS token expired or"
                " was refused", code=code, status=status,
            )
        if status == 404:
            return errors.PermanentError(
                f"download of {where}: result blob not found (HTTP 404)", code=code, status=status
            )
        if protocol.is_transient(status):
            return errors.TransientError(
                f"download of {where} failed: HTTP {status} {code}", code=code, status=status,
                retry_after_s=retry_after,
            )
        return errors.PermanentError(
            f"download of {where} failed: HTTP {status} {code}", code=code, status=status
        )

    # ---- clean-up -------------------------------------------------------------------------

    async def delete_blobs(self, names: Sequence[str]) -> None:
        """Delete blobs of our container; missing ones are fine."""

        async def one(name: str) -> None:
            with contextlib.suppress(azure_errors.ResourceNotFoundError):
                await self._container.delete_blob(name)

        try:
            await asyncio.gather(*(one(n) for n in names))
        except azure_errors.AzureError as exc:
            raise _storage_error("delete", exc) from None
