"""The bad-input catalogue (issue 5, part 4): each case has a defined outcome, the daemon keeps
running, and the good file dropped beside them is unaffected. The outcomes are listed in the
README's "What happens when…" section."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from tests import harness
from tests import test_crash as crash

pytestmark = pytest.mark.slow

GOOD = crash.texts_for(5)
LONG = "L" * 251 + ".csv"  # 255 bytes


def test_bad_inputs_each_have_a_defined_outcome(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with harness.emulator("--run-time-s", "0.1") as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string)
        s.cli("migrate")
        good = crash.csv_text(GOOD)
        s.drop("good.csv", good)
        s.drop("empty.csv", b"")
        s.drop("header-only.csv", "Col1,Col2\n")
        s.drop("binary.csv", bytes(range(256)) * 8)
        s.drop("latin1.csv", "Col1,Col2\n1,\"caf\xe9 cr\xe8me\"\n".encode("latin-1"))
        s.drop("oneline.csv", b"Col1,Col2\n1," + b"x" * (10 * 1024 * 1024))
        weird = ["with space.csv", "ünï cødé ☕.csv", "-leading-dash.csv", "quo'te\".csv",
                 "new\nline.csv"]
        for n in weird:
            s.drop(n, good)
        (s.inbox / LONG).write_text(good)
        s.drop("same-content-a.csv", good)
        s.drop("same-content-b.csv", good)
        outside = tmp_path / "outside.csv"
        outside.write_text(good)
        (s.inbox / "link.csv").symlink_to(outside)
        (s.inbox / "adir.csv").mkdir()
        (s.inbox / "adir.csv" / "inner.csv").write_text(good)
        unreadable = s.drop("unreadable.csv", good)
        unreadable.chmod(0)
        s.drop("UPPER.CSV", good)  # the pattern ignores case
        s.drop("notes.txt", "not an input\n")  # no pattern takes it: said once, left alone
        proc = s.cli("run", "--once", check=False, timeout=110)
        assert proc.returncode == 1, proc.stdout + proc.stderr  # some inputs fail, by design
        hist = {h["input_name"]: h for h in s.history()}

        # Unaffected good inputs: exact results.
        for n in ["good.csv", *weird, LONG, "same-content-a.csv", "same-content-b.csv",
                  "UPPER.CSV"]:
            assert hist[n]["state"] == "done", (n, hist[n])
            out = Path(hist[n]["outputs"]["output1"])
            assert out.parent == s.results and out.exists()
            crash.check_result(out, GOOD)
            assert (s.archive / n).exists()
        assert Path(hist["UPPER.CSV"]["outputs"]["output1"]).name == "UPPER.output1.csv"
        # Never taken, never silent: one line names it.
        assert "notes.txt" not in hist and (s.inbox / "notes.txt").exists()
        ignored = [ln for ln in proc.stderr.splitlines() if "input_ignored" in ln]
        assert len(ignored) == 1 and "notes.txt" in ignored[0], proc.stderr[-2000:]
        assert len(Path(hist[LONG]["outputs"]["output1"]).name.encode()) <= 255
        # Data the model cannot use: failed with the service's reason, input kept.
        for n in ["empty.csv", "binary.csv", "latin1.csv"]:
            h = hist[n]
            assert h["state"] == "failed" and h["error_code"] == "BesJobFailed", h
            assert (s.failed / n).exists() and (s.failed / f"{n}.error.txt").exists()
        # A header-only CSV is valid: a header-only result.
        assert hist["header-only.csv"]["state"] == "done"
        rows = harness.read_csv(Path(hist["header-only.csv"]["outputs"]["output1"]))
        assert len(rows) == 1 and "Col2 - Hashing feature 1" in rows[0]
        # 10 MB on one line: the service refuses a field that large, with its reason.
        h = hist["oneline.csv"]
        assert h["state"] == "failed" and "field larger than field limit" in h["error"], h
        for n in ["empty.csv", "binary.csv", "latin1.csv", "oneline.csv"]:
            assert "jobs retry" in (s.failed / f"{n}.error.txt").read_text()
        # Not taken at all: symlink (not followed), directory, unreadable file; they stay put.
        assert "link.csv" not in hist and (s.inbox / "link.csv").is_symlink()
        assert "adir.csv" not in hist and "inner.csv" not in hist
        assert "unreadable.csv" not in hist and unreadable.exists()
        assert outside.read_text() == good
        rejected = [ln for ln in proc.stderr.splitlines() if "input_rejected" in ln]
        assert any("unreadable.csv" in ln for ln in rejected), proc.stderr[-2000:]


def test_same_name_twice_keeps_both_results(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    with harness.emulator("--run-time-s", "0.1") as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string)
        s.cli("migrate")
        first, second = crash.texts_for(10), crash.texts_for(11)
        s.drop("twice.csv", crash.csv_text(first))
        s.cli("run", "--once", timeout=60)
        s.drop("twice.csv", crash.csv_text(second))
        s.cli("run", "--once", timeout=60)
        hist = sorted(s.history(), key=lambda h: h["created_at"])
        assert [h["state"] for h in hist] == ["done", "done"]
        a, b = (Path(h["outputs"]["output1"]) for h in hist)
        assert a == s.results / "twice.output1.csv"
        assert b == s.results / f"twice.{hist[1]['job_id'][:8]}.output1.csv"
        crash.check_result(a, first)
        crash.check_result(b, second)
        archived = sorted(p.name for p in s.archive.iterdir())
        assert archived == sorted(["twice.csv", f"twice.{hist[1]['job_id'][:8]}.csv"])


def test_unknown_key_missing_secret_and_unwritable_database(tmp_path: Path) -> None:
    s = harness.make_setup(tmp_path, emulator_url="http://127.0.0.1:1",
                           storage_connection_string="x", extra="[daemon2]\nfoo = 1\n")
    proc = s.cli("config", "check", check=False)
    assert proc.returncode == 78 and proc.stderr.count("\n") == 1 and "daemon2" in proc.stderr
    s.config.write_text(s.config.read_text().replace("[daemon2]\nfoo = 1\n", ""))
    env = dict(s.env)
    del env[harness.STORAGE_ENV]
    s.env = env
    proc = s.cli("run", "--once", check=False)
    assert proc.returncode == 78 and proc.stderr.count("\n") == 1
    assert harness.STORAGE_ENV in proc.stderr or "connection_string" in proc.stderr
    # A database path that cannot be written: its folder is a file.
    (tmp_path / "notadir").write_text("x")
    s.env = {**env, harness.STORAGE_ENV: "UseDevelopmentStorage=true"}
    s.config.write_text(s.config.read_text().replace(
        str(tmp_path / "state.db"), str(tmp_path / "notadir" / "state.db")))
    proc = s.cli("migrate", check=False)
    assert proc.returncode == 78 and proc.stderr.count("\n") == 1, proc.stderr
    assert "database.url" in proc.stderr
    assert os.path.isfile(tmp_path / "notadir")


def test_followed_symlink_takes_the_target_bytes_and_leaves_the_target(
    tmp_path: Path, azurite: azurite_mod.Azurite
) -> None:
    """With follow_symlinks, a link to a file inside the inbox's tree is processed: its
    target's bytes are copied into the spool, the link is removed, the target is untouched.
    A link pointing outside the inbox is still refused."""
    with harness.emulator("--run-time-s", "0.1") as emu:
        s = harness.make_setup(tmp_path, emulator_url=emu.url,
                               storage_connection_string=azurite.connection_string,
                               watch={"follow_symlinks": True})
        s.cli("migrate")
        (s.inbox / "store").mkdir(parents=True)
        target = s.inbox / "store" / "real.csv"  # a subfolder: not itself watched
        target.write_text(crash.csv_text(GOOD))
        (s.inbox / "linked.csv").symlink_to(target)
        outside = tmp_path / "outside.csv"
        outside.write_text(crash.csv_text(GOOD))
        (s.inbox / "escape.csv").symlink_to(outside)
        s.cli("run", "--once", timeout=60)
        hist = {h["input_name"]: h for h in s.history()}
        assert set(hist) == {"linked.csv"}
        assert hist["linked.csv"]["state"] == "done"
        crash.check_result(s.results / "linked.output1.csv", GOOD)
        assert not (s.inbox / "linked.csv").exists()
        assert target.read_text() == crash.csv_text(GOOD)  # the link's target is not ours
        assert (s.inbox / "escape.csv").is_symlink() and outside.exists()
