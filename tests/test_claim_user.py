"""Files dropped by another user (the README's layout): the daemon runs as its own user, the
inbox is group-writable, and a file owned by someone else is claimed by copying it into a
daemon-owned spool file, then removing the original. Real Unix users (created here when
missing; the tests need root), real processes switched to them with `setpriv`."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from tests import harness
from tests import test_crash as crash

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None
                       or shutil.which("useradd") is None,
                       reason="needs root, setpriv and useradd to create and become users"),
]

DAEMON_USER = "bes-test-daemon"
DROPPER_USER = "bes-test-dropper"
DROP_GROUP = "bes-test-drop"


def _ensure_group(name: str) -> None:
    with contextlib.suppress(KeyError):
        grp.getgrnam(name)
        return
    subprocess.run(["groupadd", "--system", name], check=False, capture_output=True)
    grp.getgrnam(name)  # raises if it still does not exist


def _ensure_user(name: str, group: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        user = pwd.getpwnam(name)
        if name not in grp.getgrnam(group).gr_mem:
            subprocess.run(["usermod", "-aG", group, name], check=True, capture_output=True)
        return user
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", "-G", group, name], check=False, capture_output=True)
    return pwd.getpwnam(name)


@dataclass
class Users:
    daemon: pwd.struct_passwd
    dropper: pwd.struct_passwd
    drop_gid: int


def ensure_users() -> Users:
    """The daemon's user and a dropper, both in the droppers' group (created when missing)."""
    _ensure_group(DROP_GROUP)
    return Users(daemon=_ensure_user(DAEMON_USER, DROP_GROUP),
                 dropper=_ensure_user(DROPPER_USER, DROP_GROUP),
                 drop_gid=grp.getgrnam(DROP_GROUP).gr_gid)


@pytest.fixture(scope="module")
def users() -> Users:
    return ensure_users()


def as_user(user: pwd.struct_passwd) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            "--inh-caps=-all"]


def python_for(user: pwd.struct_passwd) -> tuple[str, str]:
    """A Python the user may execute, and the PYTHONPATH that gives it this program and its
    dependencies (the test venv's interpreter may live under a folder only root can enter)."""
    site = sysconfig.get_paths()["purelib"]
    path = os.pathsep.join([str(harness.ROOT), site])
    candidates = [sys.executable, f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}"]
    for exe in candidates:
        probe = subprocess.run([*as_user(user), exe, "-c", "import orchestrator.cli"],
                               env={**os.environ, "PYTHONPATH": path}, capture_output=True,
                               check=False)
        if probe.returncode == 0:
            return exe, path
    pytest.skip(f"no Python {sys.version_info[:2]} that {user.pw_name} may run")


@pytest.fixture
def root() -> Iterator[Path]:
    """Outside pytest's tmp_path, which only root may enter."""
    d = Path(tempfile.mkdtemp(prefix="bes-claim-user-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@dataclass
class Layout:
    setup: harness.Setup
    python: str
    env: dict[str, str]
    daemon: pwd.struct_passwd

    def as_daemon(self, *args: str, timeout: float = 110) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_user(self.daemon), self.python, "-m", "orchestrator", *args,
             "-c", str(self.setup.config)],
            env=self.env, capture_output=True, text=True, timeout=timeout,
            cwd=self.setup.root, check=False)


def _layout(root: Path, users: Users, emulator_url: str, storage: str, *,
            sticky: bool = False) -> Layout:
    """The README's layout: state and output folders the daemon's own, the inbox group-writable
    (setgid) for the droppers' group."""
    d = users.daemon
    state = root / "state"
    s = harness.make_setup(root, emulator_url=emulator_url, storage_connection_string=storage,
                           db_url=f"sqlite+aiosqlite:///{state / 'state.db'}")
    s.config.chmod(0o644)
    for name, mode in (("state", 0o700), ("results", 0o750), ("archive", 0o750),
                       ("failed", 0o750)):
        (root / name).mkdir(mode=mode)
        os.chown(root / name, d.pw_uid, d.pw_gid)
    s.inbox.mkdir()
    # A sticky folder lets only a file's owner or the folder's owner remove a file: to keep
    # the daemon from removing droppers' files, it must not own the folder either.
    os.chown(s.inbox, 0 if sticky else d.pw_uid, users.drop_gid)
    s.inbox.chmod(0o2770 | (0o1000 if sticky else 0))
    python, path = python_for(d)
    env = {**s.env, "PYTHONPATH": path, "HOME": str(root)}
    return Layout(setup=s, python=python, env=env, daemon=d)


def _drop_as(user: pwd.struct_passwd, inbox: Path, name: str, text: str) -> Path:
    """The other user writes beside the final name, then renames it in (as writers are told)."""
    script = 'umask 027; printf "%s" "$2" > "$1/.$3.tmp" && mv "$1/.$3.tmp" "$1/$3"'
    subprocess.run([*as_user(user), "sh", "-c", script, "sh", str(inbox), text, name], check=True)
    final = inbox / name
    assert final.stat().st_uid == user.pw_uid
    return final


def test_a_file_dropped_by_another_user_is_processed(
    root: Path, users: Users, azurite: azurite_mod.Azurite
) -> None:
    texts = crash.texts_for(3)
    with harness.emulator("--run-time-s", "0.1") as emu:
        lay = _layout(root, users, emu.url, azurite.connection_string)
        s = lay.setup
        migrated = lay.as_daemon("migrate")
        assert migrated.returncode == 0, migrated.stderr
        dropped = _drop_as(users.dropper, s.inbox, "theirs.csv", crash.csv_text(texts))
        proc = lay.as_daemon("run", "--once")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        listed = lay.as_daemon("jobs", "list", "--json")
        [job] = json.loads(listed.stdout)
        assert job["state"] == "done", job
        assert not dropped.exists()  # the original was removed from the inbox
        archived = s.archive / "theirs.csv"
        assert archived.read_text() == crash.csv_text(texts)
        assert archived.stat().st_uid == users.daemon.pw_uid  # the daemon's own copy
        assert job["input_path"] == str(archived)
        crash.check_result(s.results / "theirs.output1.csv", texts)
        assert not [p for p in (root / "state" / "spool").iterdir()]


def test_a_claim_that_cannot_remove_the_original_leaves_it_where_the_history_says(
    root: Path, users: Users, azurite: azurite_mod.Azurite
) -> None:
    """A sticky inbox that the daemon does not own: it can read the file but not remove it.
    The job fails saying why, and the file is where its history says: in the inbox."""
    with harness.emulator("--run-time-s", "0.1") as emu:
        lay = _layout(root, users, emu.url, azurite.connection_string, sticky=True)
        s = lay.setup
        assert lay.as_daemon("migrate").returncode == 0
        text = crash.csv_text(crash.texts_for(4))
        dropped = _drop_as(users.dropper, s.inbox, "stuck.csv", text)
        proc = lay.as_daemon("run", "--once")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        [job] = json.loads(lay.as_daemon("jobs", "list", "--json").stdout)
        assert job["state"] == "failed" and job["error_code"] == "InputNotRemovable", job
        assert job["input_path"] == str(dropped) and dropped.read_text() == text
        assert not [p for p in (root / "state" / "spool").iterdir()]
        note = (s.failed / "stuck.csv.error.txt").read_text()
        assert str(dropped) in note and "sticky" in note
