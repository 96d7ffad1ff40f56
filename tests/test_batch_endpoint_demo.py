"""`bes-orchestrator demo --once`, as the README tells people to run it: the real CLI as a
subprocess, starting its own Azurite and emulator, on the packaged sample folder. With
`--backend batch-endpoint` the same folder goes through the emulator's batch-endpoint planes
(azure-identity's managed-identity path for tokens, ARM for status)."""

from __future__ import annotations

import csv
import importlib.resources
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests import harness
from tests.test_daemon import check_hashed

pytestmark = pytest.mark.slow


def _samples() -> dict[str, list[str]]:
    """Sample file name -> its Col2 texts."""
    out = {}
    for sample in (importlib.resources.files("orchestrator") / "samples").iterdir():
        if sample.name.endswith(".csv"):
            rows = list(csv.DictReader(sample.read_text(encoding="utf-8").splitlines()))
            out[sample.name] = [r["Col2"] for r in rows]
    return out


@pytest.mark.parametrize(("backend", "id_prefix"),
                         [("batch-endpoint", "batchjob-"), ("bes", "")])
def test_demo_once_runs_the_sample_folder_to_exact_results(
    tmp_path: Path, backend: str, id_prefix: str
) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET")}
    env["PYTHONPATH"] = str(harness.ROOT)
    proc = subprocess.run([*harness.cli_cmd(), "demo", "--once", "--backend", backend,
                           "--dir", str(tmp_path / "demo")], env=env, capture_output=True,
                          text=True, timeout=240, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    samples = _samples()
    assert len(samples) == 3
    assert f"{len(samples)} done, 0 failed" in proc.stdout, proc.stdout
    results = tmp_path / "demo" / "results"
    for name, texts in samples.items():
        check_hashed(results / f"{Path(name).stem}.output1.csv", texts)
    with sqlite3.connect(tmp_path / "demo" / "state" / "state.db") as db:
        rows = db.execute("select state, bes_job_id from job_history").fetchall()
    assert len(rows) == 3 and all(state == "done" and job_id.startswith(id_prefix)
                                  for state, job_id in rows), rows
