"""Chaos run by hand (issue 5): the crash-safety scenario of tests/test_crash.py, longer and with
more kills. Starts its own Azurite; prints what it survived.

    .venv/bin/python -m bench.chaos --files 1000 --kills 50
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from orchestrator import azurite as azurite_mod
from tests import test_crash


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--min-gap-s", type=float, default=0.3)
    ap.add_argument("--max-gap-s", type=float, default=3.0)
    ap.add_argument("--run-time-s", default="0.2,2")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="Work in this folder and keep it.")
    args = ap.parse_args()
    with azurite_mod.running() as az, tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        report = test_crash.run_chaos(
            root, azurite_cs=az.connection_string, files=args.files, kills=args.kills,
            gap_s=(args.min_gap_s, args.max_gap_s), run_time_s=args.run_time_s,
            seed=args.seed, log=print, drain_timeout_s=3600)
    print(f"survived {report.kills} SIGKILLs; {report.files} files all done and exact in "
          f"{report.seconds:.0f} s; emulator: submits {report.stats['submits']}, starts "
          f"{report.stats['starts']}, double_starts {report.stats['double_starts']}")


if __name__ == "__main__":
    main()
