"""The installed package, not the checkout: build the wheel and sdist, install the wheel with its
emulator extra into a fresh venv in a temporary folder, and run it from there only (no
PYTHONPATH, current directory outside the checkout) against real Azurite and the emulator the
same install provides. The README's install section is these commands.
"""

from __future__ import annotations

import re
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import azurite as azurite_mod
from orchestrator.db import migrate
from tests import installed

#: Building and installing takes about 25 s of CPU (build 6, venv 5, pip 12): minutes of wall
#: time on a loaded machine, and the first test pays for it.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

API_KEY = "install-test-api-key-0123456789"

#: Three inputs and their results, byte for byte. "This is a good day" gives the README tour's
#: "1 1 2 2 0 2 0 1"; the second file has Unicode and a quoted comma, the third CRLF line ends
#: and an extra column.
INPUTS: dict[str, bytes] = {
    "day.csv": b"Col1,Col2\n1,This is a good day\n",
    "café menu.csv": (
        "Col1,Col2\n1,café au lait 42 was perfect\n2,\"Best ramen in town, worth the queue\"\n"
    ).encode(),
    "crlf.csv": b"Col1,Col2,Col3\r\n7,I would not read it twice,x\r\n",
}
_FEATURES = ",".join(f"Col2 - Hashing feature {i}" for i in range(1, 9)).encode()
EXPECTED: dict[str, bytes] = {
    "day.output1.csv": b"Col1,Col2," + _FEATURES + b"\r\n1,This is a good day,1,1,2,2,0,2,0,1\r\n",
    "café menu.output1.csv": (
        b"Col1,Col2," + _FEATURES + b"\r\n"
        + "1,café au lait 42 was perfect,3,1,4,1,0,1,1,0\r\n".encode()
        + b'2,"Best ramen in town, worth the queue",1,3,4,2,1,2,0,0\r\n'
    ),
    "crlf.output1.csv": (
        b"Col1,Col2,Col3," + _FEATURES + b"\r\n7,I would not read it twice,x,1,3,1,2,1,1,2,0\r\n"
    ),
}


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> installed.Installed:
    return installed.get(tmp_path_factory.mktemp("install"))


def run(inst: installed.Installed, *args: str, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`bes-orchestrator ARGS` from the test venv, in a clean environment, outside the checkout."""
    assert not cwd.resolve().is_relative_to(installed.ROOT)
    return subprocess.run([str(inst.exe), *args], cwd=cwd, env=installed.clean_env(env),
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_wheel_holds_the_package_data_and_nothing_else(inst: installed.Installed) -> None:
    with zipfile.ZipFile(inst.wheel) as whl:
        names = set(whl.namelist())
        metadata = whl.read(f"bes_orchestrator-{installed.version()}.dist-info/METADATA").decode()
    versions = installed.ROOT / "orchestrator" / "db" / "migrations" / "versions"
    migrations = {f"orchestrator/db/migrations/versions/{p.name}" for p in versions.glob("*.py")}
    assert migrations, "no migrations in the checkout?"
    must = {"orchestrator/py.typed", "orchestrator/alembic.ini",
            "orchestrator/db/migrations/env.py", "orchestrator/db/migrations/script.py.mako",
            "orchestrator/samples/reviews-books.csv", *migrations}
    assert must <= names, f"missing from the wheel: {sorted(must - names)}"
    # Every file of the package in git, code or data, is in the wheel (a new kind of data file
    # needs a package-data pattern in pyproject.toml).
    tracked = subprocess.run(["git", "ls-files", "-z", "orchestrator"], cwd=installed.ROOT,
                             capture_output=True, text=True, check=True).stdout.split("\0")
    tracked_files = {t for t in tracked if t and (installed.ROOT / t).is_file()}
    assert tracked_files - names == set(), "in git, not in the wheel"
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"orchestrator", f"bes_orchestrator-{installed.version()}.dist-info"}, tops
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert f"Version: {installed.version()}" in metadata
    assert "Provides-Extra: emulator" in metadata
    requires = re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)
    assert any(r.startswith("mmh3") and 'extra == "emulator"' in r for r in requires), requires
    assert not any(r.startswith("mmh3") and "extra" not in r for r in requires), requires
    # The sdist: the wheel above was built from it, so it holds the migrations; plus what an
    # operator needs beside the code, and no tests or benchmarks.
    with tarfile.open(inst.sdist) as sdist:
        snames = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"constraints.txt", "systemd/bes-orchestrator.service", "config/example.toml",
            "CHANGELOG.md", "orchestrator/db/migrations/env.py"} <= snames
    assert not [n for n in snames if n.startswith(("tests/", "bench/"))]
    size_kib = inst.wheel.stat().st_size / 1024
    print(f"\nwheel {inst.wheel.name}: {len(names)} files, {size_kib:.0f} KiB; "
          f"sdist {inst.sdist.stat().st_size / 1024:.0f} KiB; "
          + ", ".join(f"{k} {v:.1f} s" for k, v in inst.timings_s.items()))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


@pytest.fixture
def emulator(inst: installed.Installed, work: Path) -> Iterator[str]:
    with installed.emulator(inst, work, API_KEY) as url:
        yield url


def write_config(work: Path, emulator_url: str) -> Path:
    return installed.write_config(work, emulator_url)


def daemon_env(az: azurite_mod.Azurite) -> dict[str, str]:
    return installed.daemon_env(az.connection_string, API_KEY)


def test_installed_wheel_migrates_and_processes_files(
    inst: installed.Installed, azurite: azurite_mod.Azurite, emulator: str, work: Path
) -> None:
    # The program runs from the venv, not from the checkout.
    where = subprocess.run(
        [str(inst.python), "-c", "import orchestrator; print(orchestrator.__file__)"],
        cwd=work, env=installed.clean_env(), capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(inst.site_packages()), where

    proc = run(inst, "--version", cwd=work)
    assert (proc.returncode, proc.stdout) == (0, f"bes-orchestrator {installed.version()}\n")

    cfg = write_config(work, emulator)
    env = daemon_env(azurite)
    proc = run(inst, "config", "check", "-c", str(cfg), cwd=work, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert API_KEY not in proc.stdout + proc.stderr

    proc = run(inst, "migrate", "-c", str(cfg), cwd=work, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == f"database at revision {migrate.head_revision()}\n"

    inbox = work / "inbox"
    for name, data in INPUTS.items():
        (inbox / f".{name}.tmp").write_bytes(data)
        (inbox / f".{name}.tmp").rename(inbox / name)
    proc = run(inst, "run", "--once", "-c", str(cfg), cwd=work, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 done, 0 failed" in proc.stdout, proc.stdout
    results = {p.name: p.read_bytes() for p in (work / "results").iterdir()}
    assert results == EXPECTED
    assert sorted(p.name for p in (work / "archive").iterdir()) == sorted(INPUTS)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.stdout == "", proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_install_without_its_migrations_exits_78_on_one_line(
    inst: installed.Installed, work: Path
) -> None:
    cfg = write_config(work, "http://127.0.0.1:9")
    env = {"BES_API_KEY": API_KEY, "BES_STORAGE": azurite_mod.connection_string("127.0.0.1", 9)}
    aside = installed.move_aside(inst.site_packages() / "orchestrator" / "db" / "migrations")
    try:
        for command in (["migrate"], ["run", "--once"]):
            proc = run(inst, *command, "-c", str(cfg), cwd=work, env=env)
            assert proc.returncode == 78, proc.stdout + proc.stderr
            line = one_line_error(proc)
            assert "migrations are missing" in line and "reinstall" in line, line
    finally:
        installed.move_back(aside)
    proc = run(inst, "migrate", "-c", str(cfg), cwd=work, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_demo_and_emulator_without_the_extra_name_the_pip_command(
    inst: installed.Installed, work: Path
) -> None:
    site = inst.site_packages()
    mmh3 = [p for p in site.iterdir() if p.name.split(".")[0] == "mmh3"]  # module and stubs
    assert mmh3
    asides = [installed.move_aside(p) for p in mmh3]  # as if installed without [emulator]
    try:
        for command in (["emulator", "--port", "0"], ["demo", "--once"]):
            proc = run(inst, *command, cwd=work)
            assert proc.returncode == 1, proc.stdout + proc.stderr
            line = one_line_error(proc)
            assert "pip install 'bes-orchestrator[emulator]'" in line, line
        proc = run(inst, "--help", cwd=work)  # the commands are still listed, with the hint
        assert proc.returncode == 0 and "emulator" in proc.stdout, proc.stdout + proc.stderr
    finally:
        for aside in asides:
            installed.move_back(aside)


def test_readme_install_section_is_what_these_tests_run(inst: installed.Installed) -> None:
    readme = (installed.ROOT / "README.md").read_text()
    section = readme.split("\n## Install", 1)[1].split("\n## ", 1)[0]
    cfg = Path("/nonexistent/config.toml")
    commands = [inst.readme_form(c) for c in inst.commands] + [
        inst.readme_form([str(inst.exe), *args], config=cfg)
        for args in (["--version"], ["config", "check", "-c", str(cfg)],
                     ["migrate", "-c", str(cfg)])
    ]
    missing = [c for c in commands if c not in section]
    assert not missing, f"the README's install section lacks: {missing}"
    assert "bes-orchestrator[emulator]" in section


def test_demo_without_azurite_says_how_to_get_it(inst: installed.Installed, work: Path) -> None:
    # The installed package has no node_modules beside it, and neither has `work` nor PATH.
    proc = run(inst, "demo", "--once", "--dir", str(work / "demo"), cwd=work)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = one_line_error(proc)
    assert "azurite-blob not found" in line and "npm install -g azurite@" in line, line
    assert "AZURITE_BLOB" in line, line
    assert not (work / "demo").exists()  # refused before anything was written
