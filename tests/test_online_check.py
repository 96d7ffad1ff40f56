"""`config check --online` through the real CLI against the real emulator and Azurite: it
passes on a matching setup and names each mismatch on an emulator started with other names."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from orchestrator import online
from tests import harness


def run_check(root: Path, emulator_url: str, conn: str, **kw: object
              ) -> tuple[int, str, str]:
    setup = harness.make_setup(root, emulator_url=emulator_url, storage_connection_string=conn,
                               **kw)  # type: ignore[arg-type]
    (root / "inbox").mkdir(exist_ok=True)
    proc = setup.cli("config", "check", "--online", check=False, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(("ok ", "MISMATCH"))]


def test_matching_setup_passes(tmp_path: Path, azurite: azurite_mod.Azurite) -> None:
    with harness.emulator() as emu:
        code, out, err = run_check(tmp_path, emu.url, azurite.connection_string,
                                   service={"global_parameters": {"Hashing bitsize": "8"}})
    assert code == 0, out + err
    table = rows(out)
    assert all(r.startswith("ok ") for r in table), table
    for needle in ("swagger.json", "input input1", "output output1",
                   "global parameter Hashing bitsize", "list container", "write probe blob",
                   "delete probe blob"):
        assert any(needle in r for r in table), needle
    assert "checks match" in out and "do not" not in out
    assert harness.API_KEY not in out + err
    assert "AccountKey" not in out + err


def test_other_names_are_each_named(tmp_path: Path, azurite: azurite_mod.Azurite) -> None:
    with harness.emulator("--inputs", "data", "--outputs", "scored,extra",
                          "--global-parameters", "Threshold") as emu:
        code, out, err = run_check(tmp_path, emu.url, azurite.connection_string,
                                   service={"global_parameters": {"Hashing bitsize": "8"}})
    assert code == 1, out + err
    bad = [r for r in rows(out) if r.startswith("MISMATCH")]
    text = "\n".join(bad)
    assert "input input1" in text and "not declared (service has: data)" in text
    assert "input data" in text  # declared by the service, missing from the config
    assert "output output1" in text and "output scored" in text and "output extra" in text
    assert "global parameter Hashing bitsize" in text
    # A declared parameter the config does not set is fine (the service's default applies).
    assert not any("global parameter Threshold" in r for r in bad)
    assert len(bad) == 6, text
    assert "; 6 do not" in out


def test_bad_key_and_storage_are_named(tmp_path: Path, azurite: azurite_mod.Azurite) -> None:
    wrong_key = azurite.connection_string.replace("AccountKey=", "AccountKey=AAAA", 1)
    with harness.emulator() as emu:
        setup = harness.make_setup(tmp_path, emulator_url=emu.url,
                                   storage_connection_string=wrong_key)
        (tmp_path / "inbox").mkdir(exist_ok=True)
        setup.env[harness.API_KEY_ENV] = "not-the-key-0123456789"
        proc = setup.cli("config", "check", "--online", check=False, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    bad = [r for r in rows(proc.stdout) if r.startswith("MISMATCH")]
    assert any("swagger.json" in r and "HTTP 401" in r for r in bad), bad
    assert any("storage" in r and "list container" in r for r in bad), bad
    assert "not-the-key-0123456789" not in proc.stdout + proc.stderr
    assert "AAAA" not in proc.stdout + proc.stderr


def test_compare_names_pure() -> None:
    got = online.compare_names("services.s", "output", ["a", "b"], ["b", "c"],
                               all_required=True)
    assert [(r.item, r.ok) for r in got] == [("output a", False), ("output b", True),
                                             ("output c", False)]
    got = online.compare_names("services.s", "global parameter", [], ["p"], all_required=False)
    assert [(r.item, r.ok) for r in got] == [("global parameter p", True)]


@pytest.mark.parametrize("ok", [True, False])
def test_render_counts(ok: bool) -> None:
    row = online.Check(subject="storage", item="list container", configured="c", found="x",
                       ok=ok)
    text = online.render([row])
    assert text.splitlines()[-1] == ("1 of 1 checks match" if ok
                                     else "0 of 1 checks match; 1 do not")


def test_rrs_service_is_checked_too(tmp_path: Path, azurite: azurite_mod.Azurite) -> None:
    with harness.emulator("--outputs", "scored") as emu:
        rrs = harness.table("services.small", {
            "kind": "rrs", "base_url": emu.url, "workspace": "ws1", "service": "hashing",
            "api_key_env": harness.API_KEY_ENV, "output_name": "output1"})
        code, out, err = run_check(tmp_path, emu.url, azurite.connection_string, extra=rrs,
                                   service={"outputs": {"scored": ".csv"}})
    assert code == 1, out + err
    bad = [r for r in rows(out) if r.startswith("MISMATCH")]
    assert len(bad) == 2, bad  # the RRS service's output name, both ways
    assert all("services.small" in r for r in bad)
    assert any("output output1" in r for r in bad) and any("output scored" in r for r in bad)
    assert any("services.svc" in r and "output scored" in r and r.startswith("ok ")
               for r in rows(out))
