"""Delays: poll backoff, transient-error retries, Retry-After. Pure functions of their inputs."""

from __future__ import annotations

import email.utils
import random
import time

from orchestrator import config


def poll_delay_s(
    policy: config.PollPolicy, poll_count: int, *, rng: random.Random | None = None
) -> float:
    """Delay before poll number `poll_count + 1`: initial × multiplier^poll_count, capped, ±jitter.

    With the defaults (5 s ×1.1, cap 30 s) a 120 s job is polled 14 times instead of 120, and
    its end is seen a few seconds late; past the cap, at most `max_s` late.
    """
    base = min(policy.max_s, policy.initial_s * policy.multiplier ** min(poll_count, 64))
    if policy.jitter <= 0:
        return base
    r = (rng or random).uniform(-policy.jitter, policy.jitter)
    return max(0.01, base * (1.0 + r))


def retry_delay_s(
    policy: config.RetryPolicy,
    failures: int,
    *,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Delay after the `failures`-th consecutive transient failure (1-based).

    Retry-After from the server wins when it asks for longer than our own backoff.
    Full jitter on the upper half keeps many jobs from retrying in lock-step after an outage.
    """
    exp = policy.initial_s * policy.multiplier ** max(0, min(failures - 1, 64))
    capped = min(policy.max_s, exp)
    delay = (rng or random).uniform(capped / 2, capped)
    if retry_after_s is not None:
        delay = max(delay, retry_after_s)
    return delay


def retries_exhausted(policy: config.RetryPolicy, failures: int) -> bool:
    """Transient errors never fail a job unless a limit is configured."""
    return policy.max_attempts > 0 and failures >= policy.max_attempts


def parse_retry_after(value: str | None, *, now_s: float | None = None) -> float | None:
    """`Retry-After` in seconds: delta-seconds or an HTTP date; None when absent or unreadable.
    (Every backend's HTTP answers and the storage account's use it.)"""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now_s is None else now_s
    return max(0.0, when.timestamp() - now)
