"""The one time source. Everything that stores or compares wall time calls `now()`.

For tests only: when `BES_ORCHESTRATOR_TEST_CLOCK_FILE` names a file, `now()` is shifted by
the number of seconds written in it (read again at most every 0.1 s), so a test can step a
running daemon's wall clock as NTP or a VM resume would. Without it `now()` is plain UTC now.
"""

from __future__ import annotations

import datetime as dt
import os
import time

TEST_CLOCK_ENV = "BES_ORCHESTRATOR_TEST_CLOCK_FILE"
_REREAD_S = 0.1

_shift_file = os.environ.get(TEST_CLOCK_ENV) or None
_shift = dt.timedelta(0)
_read_at = float("-inf")


def _shifted() -> dt.timedelta:
    global _shift, _read_at
    mono = time.monotonic()
    if mono - _read_at >= _REREAD_S and _shift_file is not None:
        _read_at = mono
        try:
            with open(_shift_file, encoding="ascii") as f:
                _shift = dt.timedelta(seconds=float(f.read().strip() or 0))
        except (OSError, ValueError):
            pass  # keep the last value while the test rewrites the file
    return _shift


def now() -> dt.datetime:
    """Timezone-aware UTC now."""
    if _shift_file is None:
        return dt.datetime.now(dt.UTC)
    return dt.datetime.now(dt.UTC) + _shifted()


def monotonic() -> float:
    return time.monotonic()


def iso(ts: dt.datetime | None) -> str | None:
    """ISO-8601 UTC text as the job history shows it, e.g. 2026-11-30T20:45:55.123Z."""
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
