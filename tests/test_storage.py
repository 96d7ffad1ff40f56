"""Blob storage against a real Azurite, and the naming rules. Real files, real HTTP."""

from __future__ import annotations

import datetime as dt
import gc
import os
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiohttp import web

from orchestrator import azurite as azurite_mod
from orchestrator import config, errors
from orchestrator.backends.bes import protocol
from orchestrator.storage import blob, naming

MiB = 1024 * 1024

# ---- naming ---------------------------------------------------------------------------------


def test_blob_names_are_deterministic() -> None:
    assert naming.input_blob_name("abc123", "input1", ".csv") == "jobs/abc123/in/input1.csv"
    assert naming.input_blob_name("abc123", "input1", ".csv") == naming.input_blob_name(
        "abc123", "input1", ".csv")
    assert naming.output_blob_name("abc123", "output1", ".csv") == "jobs/abc123/out/output1.csv"
    assert naming.output_blob_name("j", "model", ".ILearner") == "jobs/j/out/model.ilearner"


def test_output_blob_name_refuses_extension_bes_rejects() -> None:
    with pytest.raises(errors.PermanentError):
        naming.output_blob_name("j", "output1", ".txt")


@pytest.mark.parametrize("bad", ["../x", "a/b", ""])
def test_blob_names_refuse_path_tricks(bad: str) -> None:
    with pytest.raises(errors.PermanentError):
        naming.input_blob_name(bad or "", "input1", ".csv")
    with pytest.raises(errors.PermanentError):
        naming.output_blob_name("j", bad, ".csv")


def test_result_file_name() -> None:
    assert naming.result_file_name("data.csv", "output1", ".csv") == "data.output1.csv"
    assert naming.result_file_name("reviews", "scored", ".tsv") == "reviews.scored.tsv"
    assert naming.result_file_name("a.b.csv", "output1", ".csv") == "a.b.output1.csv"


def test_error_file_name() -> None:
    assert naming.error_file_name("data.csv") == "data.csv.error.txt"


@pytest.mark.parametrize(
    "bad", ["..", ".", "", "../etc/passwd", "a/b", "a\\b", "/etc/passwd", "x\0y", "C:evil",
            "x" * 300],
)
def test_safe_child_refuses_escapes(tmp_path: Path, bad: str) -> None:
    with pytest.raises(errors.PermanentError):
        naming.safe_child(tmp_path, bad)


def test_safe_child_accepts_plain_names(tmp_path: Path) -> None:
    assert naming.safe_child(tmp_path, "data.output1.csv") == tmp_path / "data.output1.csv"
    assert naming.safe_child(tmp_path, "..hidden..csv") == tmp_path / "..hidden..csv"


def test_temp_name_is_hidden_unique_same_folder_and_short(tmp_path: Path) -> None:
    final = tmp_path / "data.output1.csv"
    a, b = naming.temp_name(final), naming.temp_name(final)
    assert a != b
    assert a.parent == tmp_path
    assert a.name.startswith(".") and a.name.endswith(".part")
    assert naming.is_temp_name(a.name)
    long = naming.temp_name(tmp_path / ("é" * 127 + ".csv"))  # 258 bytes
    assert len(long.name.encode()) <= naming.NAME_MAX_BYTES


# ---- connection strings ---------------------------------------------------------------------


def test_parse_azurite_connection_string() -> None:
    acct = blob.parse_connection_string(azurite_mod.connection_string("127.0.0.1", 12345))
    assert acct.name == "devstoreaccount1"
    assert acct.key == azurite_mod.ACCOUNT_KEY
    assert acct.endpoint == "http://127.0.0.1:12345/devstoreaccount1"
    assert azurite_mod.ACCOUNT_KEY not in repr(acct)


def test_parse_real_account_connection_string() -> None:
    acct = blob.parse_connection_string(
        "DefaultEndpointsProtocol=https;AccountName=myacct;AccountKey=a2V5PT0=;"
        "EndpointSuffix=core.windows.net"
    )
    assert acct.name == "myacct"
    assert acct.key == "a2V5PT0="  # the '=' inside the value survives
    assert acct.endpoint == "https://myacct.blob.core.windows.net"


def test_parse_bad_connection_string() -> None:
    with pytest.raises(errors.PermanentError):
        blob.parse_connection_string("nonsense")


# ---- against Azurite ------------------------------------------------------------------------


def _storage_config(az: azurite_mod.Azurite, **kw: object) -> config.StorageConfig:
    return config.StorageConfig(
        connection_string=config.Secret(az.connection_string),
        container=f"t{uuid.uuid4().hex[:12]}",
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def store(azurite: azurite_mod.Azurite, session: aiohttp.ClientSession
                ) -> AsyncIterator[blob.BlobStore]:
    s = blob.BlobStore(_storage_config(azurite, upload_chunk_bytes=256 * 1024), session)
    await s.ensure_container()
    await s.ensure_container()  # idempotent
    try:
        yield s
    finally:
        await s.close()


def _read_ref(store: blob.BlobStore, name: str, **kw: float) -> protocol.ResultRef:
    return protocol.ResultRef(
        base_location=store.endpoint + "/",
        relative_location=f"{store.container}/{name}",
        sas_token="?" + store.sas_token(store.container, name, write=False, **kw),
    )


def _no_temp_files(folder: Path) -> bool:
    return not any(naming.is_temp_name(p.name) for p in folder.iterdir())


@pytest.mark.parametrize("size", [0, 1000, 256 * 1024, 3 * MiB + 17])
async def test_upload_then_download_round_trip(store: blob.BlobStore, tmp_path: Path,
                                               size: int) -> None:
    src = tmp_path / "in.csv"
    payload = os.urandom(size)
    src.write_bytes(payload)
    name = naming.input_blob_name(uuid.uuid4().hex, "input1", ".csv")
    assert await store.upload_file(src, name) == size
    out_dir = tmp_path / "results"
    dest = out_dir / "in.output1.csv"
    assert await store.download(_read_ref(store, name), dest) == size
    assert dest.read_bytes() == payload
    assert _no_temp_files(out_dir)
    mode = stat.S_IMODE(dest.stat().st_mode)
    assert mode & stat.S_IRWXO == 0, oct(mode)  # never world-readable


async def test_upload_overwrites_after_a_repeat(store: blob.BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    name = naming.input_blob_name(uuid.uuid4().hex, "input1", ".csv")
    src.write_bytes(b"first version, longer than the second" * 20000)
    await store.upload_file(src, name)
    src.write_bytes(b"second")
    await store.upload_file(src, name)
    dest = tmp_path / "out.csv"
    await store.download(_read_ref(store, name), dest)
    assert dest.read_bytes() == b"second"


async def test_download_replaces_existing_result(store: blob.BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(b"new result")
    name = naming.input_blob_name(uuid.uuid4().hex, "input1", ".csv")
    await store.upload_file(src, name)
    dest = tmp_path / "r.csv"
    dest.write_bytes(b"stale partial")
    await store.download(_read_ref(store, name), dest)
    assert dest.read_bytes() == b"new result"


async def test_upload_missing_file_is_permanent(store: blob.BlobStore, tmp_path: Path) -> None:
    with pytest.raises(errors.PermanentError, match="cannot read input"):
        await store.upload_file(tmp_path / "gone.csv", "jobs/x/in/input1.csv")


async def test_large_upload_is_streamed_not_loaded(azurite: azurite_mod.Azurite,
                                                   session: aiohttp.ClientSession,
                                                   tmp_path: Path) -> None:
    src = tmp_path / "big.csv"
    with src.open("wb") as f:
        for _ in range(40):
            f.write(os.urandom(MiB))
    s = blob.BlobStore(_storage_config(azurite), session)  # defaults: 4 MiB × 4
    try:
        await s.ensure_container()
        gc.collect()
        proc = psutil.Process()
        before = proc.memory_info().rss
        peak = before
        name = naming.input_blob_name(uuid.uuid4().hex, "input1", ".csv")
        import asyncio

        upload = asyncio.create_task(s.upload_file(src, name))
        while not upload.done():
            peak = max(peak, proc.memory_info().rss)
            await asyncio.sleep(0.005)
        assert await upload == 40 * MiB
        growth = (peak - before) / MiB
        print(f"rss growth {growth:.1f} MiB")
        assert growth < 60, f"RSS grew {growth:.1f} MiB for a 40 MiB upload"
        props = await s._container.get_blob_client(name).get_blob_properties()
        assert props.size == 40 * MiB
    finally:
        await s.close()


def test_reference_connection_string_form(azurite: azurite_mod.Azurite) -> None:
    cfg = _storage_config(azurite)
    s = blob.BlobStore.__new__(blob.BlobStore)  # reference() needs no I/O; avoid a session
    s.storage = cfg
    s.account = blob.parse_connection_string(cfg.connection_string.get())
    ref = s.reference("jobs/j/in/input1.csv", write=False)
    assert ref == {"ConnectionString": azurite.connection_string,
                   "RelativeLocation": f"/{cfg.container}/jobs/j/in/input1.csv"}


async def test_reference_sas_form_read_and_write(store: blob.BlobStore, tmp_path: Path,
                                                 session: aiohttp.ClientSession) -> None:
    sas_store = blob.BlobStore(
        config.StorageConfig(connection_string=store.storage.connection_string,
                             container=store.container, reference="sas"), session)
    try:
        out = sas_store.reference("jobs/j/out/output1.csv", write=True)
        assert out["BaseLocation"] == store.endpoint + "/"
        assert out["RelativeLocation"] == f"{store.container}/jobs/j/out/output1.csv"
        assert out["SasBlobToken"].startswith("?") and "sig=" in out["SasBlobToken"]
        url = out["BaseLocation"] + out["RelativeLocation"] + out["SasBlobToken"]
        # The write SAS really lets a service write the output blob...
        async with session.put(url, data=b"a,b\n1,2\n",
                               headers={"x-ms-blob-type": "BlockBlob"}) as resp:
            assert resp.status == 201, await resp.text()
        # ...and a read SAS lets it read, but not write.
        inp = sas_store.reference("jobs/j/out/output1.csv", write=False)
        url = inp["BaseLocation"] + inp["RelativeLocation"] + inp["SasBlobToken"]
        async with session.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == b"a,b\n1,2\n"
        async with session.put(url, data=b"x", headers={"x-ms-blob-type": "BlockBlob"}) as resp:
            assert resp.status == 403
    finally:
        await sas_store.close()


async def test_expired_sas_is_permanent_without_signature(store: blob.BlobStore,
                                                          tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(b"x,y\n")
    name = naming.input_blob_name(uuid.uuid4().hex, "input1", ".csv")
    await store.upload_file(src, name)
    # Starts 5 min back (clock skew allowance); a lifetime of 60 s ended 4 min ago.
    ref = _read_ref(store, name, lifetime_s=-240.0)
    assert "sig=" in ref.url
    dest = tmp_path / "out" / "r.csv"
    dest.parent.mkdir()
    with pytest.raises(errors.PermanentError) as info:
        await store.download(ref, dest)
    msg = str(info.value)
    assert "expired" in msg or "refused" in msg
    assert "sig=" not in msg and ref.sas_token not in msg
    assert info.value.status == 403
    assert not dest.exists()
    assert _no_temp_files(dest.parent)


async def test_missing_result_blob_is_permanent(store: blob.BlobStore, tmp_path: Path) -> None:
    ref = _read_ref(store, "jobs/none/out/output1.csv")
    with pytest.raises(errors.PermanentError, match="not found") as info:
        await store.download(ref, tmp_path / "r.csv")
    assert info.value.status == 404
    assert not (tmp_path / "r.csv").exists()
    assert _no_temp_files(tmp_path)


async def test_result_on_another_host_is_refused_and_not_fetched(
        store: blob.BlobStore, tmp_path: Path) -> None:
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"evil")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        for base in (f"http://127.0.0.1:{port}/devstoreaccount1/",
                     f"http://localhost:{port}/"):
            ref = protocol.ResultRef(base_location=base, relative_location="c/b.csv",
                                     sas_token="?sv=1&sig=SECRET")
            with pytest.raises(errors.PermanentError, match="not the configured storage") as i:
                await store.download(ref, tmp_path / "r.csv")
            assert "SECRET" not in str(i.value)
        assert hits == []
        assert not (tmp_path / "r.csv").exists()
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("base", ["file:///etc/", "ftp://127.0.0.1/", "javascript:alert(1)//"])
async def test_non_http_result_urls_refused(store: blob.BlobStore, tmp_path: Path,
                                            base: str) -> None:
    ref = protocol.ResultRef(base_location=base, relative_location="passwd")
    with pytest.raises(errors.PermanentError, match="refused"):
        await store.download(ref, tmp_path / "r.csv")


def test_allowed_result_hosts(azurite: azurite_mod.Azurite) -> None:
    cfg = _storage_config(azurite, allowed_result_hosts=("results.example.net",))
    s = blob.BlobStore.__new__(blob.BlobStore)
    s.storage = cfg
    s.account = blob.parse_connection_string(cfg.connection_string.get())
    ok = protocol.ResultRef(base_location="https://results.example.net/",
                            relative_location="c/b.csv")
    s.check_result_url(ok)
    # Same port on a different host, or a different port on our host: refused.
    for base in (f"http://localhost:{azurite.port}/", f"http://127.0.0.1:{azurite.port + 1}/"):
        with pytest.raises(errors.PermanentError):
            s.check_result_url(protocol.ResultRef(base_location=base, relative_location="c"))


async def test_storage_down_is_transient(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    port = azurite_mod.free_port()
    cfg = config.StorageConfig(
        connection_string=config.Secret(azurite_mod.connection_string("127.0.0.1", port)))
    s = blob.BlobStore(cfg, session, sdk_retries=0)
    try:
        src = tmp_path / "in.csv"
        src.write_bytes(b"x")
        with pytest.raises(errors.TransientError) as info:
            await s.upload_file(src, "jobs/j/in/input1.csv")
        assert azurite_mod.ACCOUNT_KEY not in str(info.value)
        ref = protocol.ResultRef(base_location=s.endpoint + "/", relative_location="c/b.csv",
                                 sas_token="?sig=SECRET")
        with pytest.raises(errors.TransientError) as info2:
            await s.download(ref, tmp_path / "r.csv")
        assert "SECRET" not in str(info2.value)
        assert _no_temp_files(tmp_path)
    finally:
        await s.close()


async def test_delete_blobs_ignores_missing(store: blob.BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_bytes(b"x")
    name = naming.input_blob_name(uuid.uuid4().hex, "input1", ".csv")
    await store.upload_file(src, name)
    await store.delete_blobs([name, "jobs/never/in/input1.csv"])
    with pytest.raises(errors.PermanentError, match="not found"):
        await store.download(_read_ref(store, name), tmp_path / "r.csv")


def test_sas_expiry_is_in_the_future(azurite: azurite_mod.Azurite) -> None:
    cfg = _storage_config(azurite, sas_lifetime_s=3600.0)
    s = blob.BlobStore.__new__(blob.BlobStore)
    s.storage = cfg
    s.account = blob.parse_connection_string(cfg.connection_string.get())
    token = s.sas_token(cfg.container, "b.csv", write=False)
    from urllib.parse import parse_qs

    q = parse_qs(token)
    expiry = dt.datetime.fromisoformat(q["se"][0].replace("Z", "+00:00"))
    remaining = (expiry - dt.datetime.now(dt.UTC)).total_seconds()
    assert 3500 < remaining <= 3600
    assert q["sp"] == ["r"]
