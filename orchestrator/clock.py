"""The one time source. Everything that stores or compares wall time calls `now()`."""

from __future__ import annotations

import datetime as dt
import time


def now() -> dt.datetime:
    """Timezone-aware UTC now."""
    return dt.datetime.now(dt.UTC)


def monotonic() -> float:
    return time.monotonic()


def iso(ts: dt.datetime | None) -> str | None:
    """ISO-8601 UTC text as the job history shows it, e.g. 2026-11-27T20:45:55.123Z."""
    if ts is None:
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
