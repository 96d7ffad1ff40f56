"""Secrets and trust boundaries (issue 5, part 5): planted secrets appear nowhere the daemon
writes or prints; Results pointing elsewhere are refused; created files are private."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from orchestrator import errors
from orchestrator.storage import naming
from tests import harness
from tests import test_crash as crash

pytestmark = pytest.mark.slow


def all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


def test_planted_secrets_appear_nowhere(tmp_path: Path, azurite: azurite_mod.Azurite) -> None:
    with harness.emulator("--apim", "--run-time-s", "0.1", "--failure-rate", "0.5",
                          "--seed", "3") as emu:
        s = harness.make_setup(
            tmp_path, emulator_url=emu.url, storage_connection_string=azurite.connection_string,
            service={"apim_key_env": harness.APIM_KEY_ENV})
        s.cli("migrate")
        for i in range(6):
            s.drop(f"s{i}.csv", crash.csv_text(crash.texts_for(i)))
        run = s.cli("--log-level", "debug", "run", "--once", check=False, timeout=90)
        hist = s.history()
        assert {h["state"] for h in hist} == {"done", "failed"}  # both paths exercised
        outputs = [run.stdout, run.stderr, s.cli("config", "check").stdout,
                   s.cli("status").stdout, s.cli("status", "--json").stdout]
        for h in hist:
            outputs.append(s.cli("jobs", "show", h["job_id"]).stdout)
            outputs.append(s.cli("jobs", "show", "--json", h["job_id"]).stdout)
        account_key = azurite_mod.ACCOUNT_KEY
        secrets = [harness.API_KEY, harness.APIM_KEY, account_key]
        for text in outputs:
            for secret in secrets:
                assert secret not in text
            assert not re.search(r"sig=[A-Za-z0-9%+/=]{8,}", text), text
        # Every file the daemon wrote: the SQLite database (and WAL), error files, results.
        for path, data in all_bytes(tmp_path):
            if path.name == "config.toml":
                continue
            for secret in secrets:
                assert secret.encode() not in data, path
            assert not re.search(rb"sig=[A-Za-z0-9%+/=]{8,}", data), path


def test_results_on_another_host_are_refused(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with harness.emulator("--run-time-s", "0.1") as emu:
        # Results name another host (the emulator's own port stands in for an attacker's
        # server): nothing may be fetched from it.
        emu.configure(results_base_url=f"{emu.url}/stolen")
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string)
        s.cli("migrate")
        s.drop("r.csv", crash.csv_text(["a b"]))
        proc = s.cli("run", "--once", check=False, timeout=60)
        assert proc.returncode == 1
        [job] = s.history()
        assert job["state"] == "failed" and job["error_code"] == "ResultRefused", job
        assert "not the configured storage endpoint" in job["error"]
        assert not s.results.exists() or list(s.results.iterdir()) == []


@pytest.mark.parametrize("bad", ["../escape", "/etc/passwd", "a/b", "..", "C:\\x"])
def test_names_that_escape_the_folder_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(errors.PermanentError):
        naming.safe_child(tmp_path, bad)
    with pytest.raises(errors.PermanentError):
        naming.result_file_name("in.csv", bad, ".csv")
    with pytest.raises(errors.PermanentError):
        naming.output_blob_name("job", bad, ".csv")


def test_created_files_are_private(tmp_path: Path, azurite: azurite_mod.Azurite) -> None:
    with harness.emulator("--run-time-s", "0.1", "--failure-rate", "0.5", "--seed", "3") as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string)
        s.cli("migrate")
        for i in range(6):
            s.drop(f"p{i}.csv", crash.csv_text(crash.texts_for(i)))
        s.cli("run", "--once", check=False, timeout=60)
        assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600
        for folder in (s.results, s.failed, s.archive, tmp_path / "state"):
            assert folder.exists()
            for p in [folder, *folder.rglob("*")]:
                mode = stat.S_IMODE(p.stat().st_mode)
                assert not mode & 0o007, (p, oct(mode))
