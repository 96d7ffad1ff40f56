"""The package as an operator installs it: `python -m build`, a fresh venv in a temporary folder
outside the checkout, `pip install -c constraints.txt <wheel>[emulator]`. Built once per test
session and shared by tests/test_install.py and tests/test_systemd_unit.py.

The commands are the README's "Install" section (test_install checks the README holds them).
To stay fast and off the network, pip installs from the wheelhouse `scripts/dev-setup` fills
(`PIP_NO_INDEX`/`PIP_FIND_LINKS` in its environment, so the command line stays the README's);
if it lacks something, the missing wheels are downloaded into it first.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import orchestrator
from tests import harness

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
#: Downloaded dependency wheels, kept between runs (outside the checkout, and outside .venv so a
#: clean clone on the same machine reuses them); the same default as scripts/dev-setup, and the
#: same override, BES_TEST_WHEELHOUSE.
WHEELHOUSE = Path(os.environ.get(
    "BES_TEST_WHEELHOUSE", Path.home() / ".cache" / "bes-orchestrator" / "wheelhouse"))
#: The README's names for what the test puts in a temporary folder.
README_VENV = "/opt/bes-orchestrator"
README_DIST = "dist"
README_CONFIG = "/etc/bes-orchestrator/config.toml"


@dataclass(frozen=True, kw_only=True)
class Installed:
    root: Path  # the temporary folder: dist/, venv/, work/
    dist: Path
    wheel: Path
    sdist: Path
    venv: Path
    #: Each step's wall time in seconds (build, venv, install), for the report.
    timings_s: Mapping[str, float]
    #: Every command run, as run (absolute paths).
    commands: Sequence[Sequence[str]]

    @property
    def exe(self) -> Path:
        return self.venv / "bin" / "bes-orchestrator"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def site_packages(self) -> Path:
        (found,) = (self.venv / "lib").glob("python3*/site-packages")
        return found

    def readme_form(self, cmd: Sequence[str], config: Path | None = None) -> str:
        """`cmd` as the README writes it: /opt/bes-orchestrator, dist/, constraints.txt."""
        text = shlex.join(cmd)
        subs = {str(self.venv): README_VENV, str(self.dist): README_DIST,
                str(CONSTRAINTS): "constraints.txt", sys.executable: "python3"}
        if config is not None:
            subs[str(config)] = README_CONFIG
        for old, new in subs.items():
            text = text.replace(old, new)
        return text


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What an installed program sees under systemd: no PYTHONPATH, no virtualenv, a plain PATH."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8"}
    return {**env, **(extra or {})}


def _run(cmd: Sequence[str], *, cwd: Path, env: Mapping[str, str] | None = None,
         timeout: float = 600) -> None:
    proc = subprocess.run(list(cmd), cwd=cwd, env=dict(env) if env is not None else None,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")


def _pip_env(offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_FIND_LINKS", "PIP_NO_INDEX")}
    if offline:
        env |= {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELHOUSE)}
    return env


def _offline_or_fill(cmd: Sequence[str], *, cwd: Path, fill: Sequence[str]) -> None:
    """Run `cmd` with pip limited to the wheelhouse; if that fails, download `fill` (pip
    arguments) and its dependencies into the wheelhouse from the index, and run it again."""
    try:
        _run(cmd, cwd=cwd, env=_pip_env(offline=True))
        return
    except AssertionError:
        pass
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "-d", str(WHEELHOUSE), *fill],
         cwd=cwd, env=_pip_env(offline=False))
    for ours in WHEELHOUSE.glob("bes_orchestrator-*"):
        ours.unlink()  # only dependencies belong there: the wheel under test is built fresh
    _run(cmd, cwd=cwd, env=_pip_env(offline=True))


_cache: dict[str, Installed] = {}


def get(tmp_root: Path) -> Installed:
    """Build and install once per session (the first caller's `tmp_root` holds it)."""
    if "installed" not in _cache:
        _cache["installed"] = _build_and_install(tmp_root)
    return _cache["installed"]


def _build_and_install(root: Path) -> Installed:
    assert not root.resolve().is_relative_to(ROOT), "the install must live outside the checkout"
    dist, venv = root / "dist", root / "venv"
    timings: dict[str, float] = {}
    commands: list[list[str]] = []

    t0 = time.monotonic()
    build = [sys.executable, "-m", "build", "--outdir", str(dist)]
    commands.append(build)
    # sdist, then the wheel from the sdist; its isolated build environment gets setuptools
    # from the wheelhouse too
    _offline_or_fill(build, cwd=ROOT, fill=["setuptools>=77"])
    timings["build"] = time.monotonic() - t0
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")

    t0 = time.monotonic()
    make_venv = [sys.executable, "-m", "venv", str(venv)]
    commands.append(make_venv)
    _run(make_venv, cwd=root, env=clean_env())
    timings["venv"] = time.monotonic() - t0

    t0 = time.monotonic()
    pip = venv / "bin" / "pip"
    install = [str(pip), "install", "-c", str(CONSTRAINTS), f"{dist / wheel.name}[emulator]"]
    commands.append(install)
    _offline_or_fill(install, cwd=root, fill=["-c", str(CONSTRAINTS), f"{wheel}[emulator]"])
    timings["install"] = time.monotonic() - t0
    return Installed(root=root, dist=dist, wheel=wheel, sdist=sdist, venv=venv,
                     timings_s=timings, commands=commands)


def version() -> str:
    return orchestrator.__version__


def move_aside(path: Path) -> Path:
    """Rename `path` to `<path>.aside` (a deliberately broken install); undo with move_back."""
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    return aside


def move_back(aside: Path) -> None:
    target = aside.with_name(aside.name.removesuffix(".aside"))
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    aside.rename(target)


@contextlib.contextmanager
def emulator(inst: Installed, cwd: Path, api_key: str) -> Iterator[str]:
    """`bes-orchestrator emulator` from the test venv (its emulator extra); yields its URL."""
    proc = subprocess.Popen(
        [str(inst.exe), "emulator", "--host", "127.0.0.1", "--port", "0"], cwd=cwd,
        env=clean_env({"BES_EMULATOR_API_KEY": api_key}), stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield line.strip().rsplit(" ", 1)[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()


def write_config(work: Path, emulator_url: str) -> Path:
    """A config for the installed daemon: everything under `work`, secrets from the env
    (daemon_env), the HTTP endpoint off (its fixed default port may be taken by another test)."""
    (work / "inbox").mkdir(exist_ok=True)
    text = (
        harness.table("daemon", {"state_dir": str(work / "state"), "heartbeat_s": 1.0,
                                 "lease_s": 5.0, "rescan_s": 2.0})
        + harness.table("database", {"url": f"sqlite+aiosqlite:///{work / 'state' / 'state.db'}"})
        + harness.table("storage", {"connection_string_env": "BES_STORAGE",
                                    "container": "bes-install"})
        + harness.table("http", {"listen": ""})
        + harness.table("services.svc", {
            "base_url": emulator_url, "workspace": "ws1", "service": "hashing",
            "api_key_env": "BES_API_KEY",
            "poll": {"initial_s": 0.2, "multiplier": 1.5, "max_s": 1.0, "jitter": 0.1}})
        + harness.table("[watch]", {
            "folder": str(work / "inbox"), "pattern": "*.csv", "service": "svc",
            "output_dir": str(work / "results"), "archive_dir": str(work / "archive"),
            "failed_dir": str(work / "failed"), "settle_s": 0.2})
    )
    path = work / "config.toml"
    path.write_text(text)
    return path


def daemon_env(storage_connection_string: str, api_key: str) -> dict[str, str]:
    return {"BES_API_KEY": api_key, "BES_STORAGE": storage_connection_string}
