"""Keyless storage for batch endpoints: `[storage] account_url` + `[storage.credential]` (Entra
ID, scope https://storage.azure.com/.default) and no connection string anywhere in the daemon's
config or environment.

Azurite checks OAuth bearer tokens only over HTTPS, so this test starts its own Azurite with
`--oauth basic` and a self-signed certificate the daemon trusts through `SSL_CERT_FILE`. The
token comes from the emulator's managed-identity endpoint through azure-identity's own code path:
for the storage audience it is an unsigned JWT, whose `aud`, `iss` and lifetime Azurite's basic
OAuth checks (it does not check signatures). The emulator itself still reaches the datastore with
the account key (Azurite takes SharedKey alongside OAuth): only the daemon runs keyless.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator import azurite as azurite_mod
from orchestrator.emulator import process
from tests import harness
from tests.test_batch_endpoint import CONTAINER, IDENTITY_SECRET, WORKSPACE
from tests.test_daemon import TEXTS, check_hashed, csv_text

pytestmark = pytest.mark.slow


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = folder / "cert.pem", folder / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return cert_pem, key_pem


@contextlib.contextmanager
def https_azurite(folder: Path) -> Iterator[tuple[str, str, Path]]:
    """Azurite over HTTPS with basic OAuth: yields (account URL, connection string, cert)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed(folder)
    port = azurite_mod.free_port()
    log = folder / "azurite.log"
    cmd = [azurite_mod.find_binary(), "--blobHost", "127.0.0.1", "--blobPort", str(port),
           "--location", str(folder / "data"), "--disableTelemetry", "--skipApiVersionCheck",
           "--loose", "--oauth", "basic", "--cert", str(cert), "--key", str(key),
           "--debug", str(folder / "azurite-debug.log")]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + azurite_mod.READY_TIMEOUT_S
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-500:]
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", port), timeout=0.5):
                break
            assert time.monotonic() < deadline, "azurite (https) did not listen in time"
            time.sleep(0.05)
        url = f"https://127.0.0.1:{port}/{azurite_mod.ACCOUNT}"
        conn = (f"DefaultEndpointsProtocol=https;AccountName={azurite_mod.ACCOUNT};"
                f"AccountKey={azurite_mod.ACCOUNT_KEY};BlobEndpoint={url};")
        yield url, conn, cert
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_batch_endpoint_runs_with_no_storage_key_at_all(tmp_path: Path) -> None:
    with https_azurite(tmp_path / "azurite") as (account_url, conn, cert):
        emu_env = {process.BE_STORAGE_ENV: conn, process.IDENTITY_HEADER_ENV: IDENTITY_SECRET,
                   process.API_KEY_ENV: harness.API_KEY, "SSL_CERT_FILE": str(cert)}
        with process.spawn("--be-container", CONTAINER, "--prepare-s", "0.2",
                           "--run-time-s", "0.3", env=emu_env) as (emu_url, _proc):
            root = tmp_path / "run"
            root.mkdir()
            svc = {
                "kind": "batch_endpoint", "scoring_uri": f"{emu_url}/endpoints/hashing/jobs",
                "workspace_id": WORKSPACE, "arm_url": emu_url, "datastore": "workspaceblobstore",
                "input_name": "input_data", "output_name": "output1",
                "poll": {"initial_s": 0.2, "multiplier": 1.5, "max_s": 1.0, "jitter": 0.1},
                "retry": {"initial_s": 0.2, "multiplier": 2.0, "max_s": 2.0},
                "credential": {"type": "managed_identity"},
            }
            db_url = f"sqlite+aiosqlite:///{root / 'state.db'}"
            text = (harness.table("daemon", {"state_dir": "state", "heartbeat_s": 1.0,
                                             "lease_s": 5.0, "rescan_s": 2.0})
                    + harness.table("database", {"url": db_url})
                    + harness.table("storage", {"account_url": account_url})
                    + harness.table("storage.credential", {"type": "managed_identity"})
                    + harness.table("http", {"listen": ""})
                    + harness.table("services.be", svc)
                    + harness.table("[watch]", {"folder": "inbox", "service": "be",
                                                "settle_s": 0.2, "create": True}))
            cfg = root / "config.toml"
            cfg.write_text(text)
            assert "AccountKey" not in text and "connection_string" not in text
            # No storage key in the daemon's environment either: only the identity endpoint.
            env = {k: v for k, v in os.environ.items() if "STORAGE" not in k}
            env.update({"IDENTITY_ENDPOINT": f"{emu_url}/msi/token",
                        "IDENTITY_HEADER": IDENTITY_SECRET, "SSL_CERT_FILE": str(cert),
                        "PYTHONPATH": str(harness.ROOT)})
            s = harness.Setup(root=root, config=cfg, env=env, db_url=db_url)
            s.cli("migrate")
            names = [f"keyless {i}.csv" for i in range(3)]
            for n in names:
                s.drop(n, csv_text(TEXTS))
            proc = s.cli("--log-json", "run", "--once", timeout=180, check=False)
            assert proc.returncode == 0 and "3 done, 0 failed" in proc.stdout, (
                proc.stdout + proc.stderr)
            for n in names:
                check_hashed(s.results / f"{Path(n).stem}.output1.csv", TEXTS)
            rows = s.history()
            assert len(rows) == 3 and all(
                r["state"] == "done" and r["bes_job_id"].startswith("batchjob-") for r in rows)
            stats = harness.Emulator(url=emu_url, proc=_proc, args=[]).stats()["batch"]
            # The daemon's storage calls really went through Entra ID tokens.
            assert stats["tokens_by_audience"].get("https://storage.azure.com", 0) >= 1, stats
            (root / "run.log").write_text(proc.stdout + proc.stderr)
            # No token (a JWT starts "eyJ"), key, identity secret or SAS in any file of the run.
            needles = [IDENTITY_SECRET.encode(), azurite_mod.ACCOUNT_KEY.encode(), b"eyJ",
                       b"Bearer ", b"sig="]
            for path in root.rglob("*"):
                if path.is_file():
                    data = path.read_bytes()
                    for needle in needles:
                        assert needle not in data, f"{needle[:12]!r}… found in {path}"


def test_a_bes_service_with_keyless_storage_stops_with_one_config_line(tmp_path: Path) -> None:
    """Classic BES hands the service a key or SAS for every blob, which Entra ID cannot give:
    with `account_url` the daemon refuses to start (exit 78), before touching anything."""
    svc = {"base_url": "http://127.0.0.1:9", "workspace": "ws1", "service": "hashing",
           "api_key_env": harness.API_KEY_ENV}
    text = (harness.table("daemon", {"state_dir": "state"})
            + harness.table("database", {"url": f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"})
            + harness.table("storage", {"account_url": "https://127.0.0.1:9/devstoreaccount1",
                                        "reference": "sas"})
            + harness.table("http", {"listen": ""}) + harness.table("services.svc", svc)
            + harness.table("[watch]", {"folder": "inbox", "service": "svc", "create": True}))
    cfg = tmp_path / "config.toml"
    cfg.write_text(text)
    env = {**os.environ, harness.API_KEY_ENV: harness.API_KEY, "PYTHONPATH": str(harness.ROOT)}
    s = harness.Setup(root=tmp_path, config=cfg, env=env, db_url="")
    for command in (("config", "check"), ("run", "--once")):  # refused already by the config
        proc = s.cli(*command, check=False, timeout=60)
        assert proc.returncode == 78, proc.stdout + proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if "config error" in ln]
        assert len(lines) == 1 and "storage.account_url" in lines[0], proc.stderr
        assert "services.svc" in lines[0] and "connection string" in lines[0], lines
    assert not (tmp_path / "state.db").exists()
