"""One gate per web service: pauses on 429/quota 403 and adapts the request rate to what the
gateway (API Management) lets through.

After a throttled call the whole service pauses until `Retry-After` has passed. The gate then
caps its own rate at what the gateway let through (successful requests counted over the
gateway's window, a little below), spent through a token bucket of depth one so calls never
burst. Each further 429 lowers the cap; quiet windows raise it slowly (+10 % per window) until it
is lifted. The gateway therefore sees the first 429 of a window plus at most the calls already in
flight, and a throttled call is only ever delayed, never failed.

All decisions are methods taking `now` (monotonic seconds), so tests drive them with numbers;
`wait()` is the thin async shell that sleeps until the decision says go.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable

#: Assumed gateway window when nothing better is known (APIM rate limits count per period).
DEFAULT_WINDOW_S = 60.0
#: Retry-After to assume when a 429 comes without one.
DEFAULT_RETRY_AFTER_S = 1.0
#: Keep the cap this far below the measured allowance.
SAFETY_FACTOR = 0.9
#: Each further throttle within a cap at least halves it.
DECREASE_FACTOR = 0.5
#: Growth of the cap per window without a throttle.
RELAX_PER_WINDOW = 0.10
#: Never slower than this (one call per 100 s): a cap must not freeze a service.
MIN_RATE_PER_S = 0.01
#: Above this the cap is lifted altogether.
MAX_RATE_PER_S = 1000.0
#: Shortest window a rate is measured over (a 429 with Retry-After: 0 on the first call).
MIN_SPAN_S = 0.001
#: Longest pause honoured from one Retry-After (a broken header must not stop us for days).
MAX_PAUSE_S = 3600.0


class ServiceGate:
    """Admission control for one service's HTTP calls. Not thread-safe; one event loop."""

    def __init__(
        self,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self._clock = clock
        self.paused_until = 0.0
        #: Calls per second allowed, or None when uncapped.
        self.rate_per_s: float | None = None
        self._tokens = 1.0
        self._refilled_at = 0.0
        self._relaxed_at = 0.0
        self._first_seen: float | None = None
        #: Times of calls the gateway accepted, newest last, pruned to one window.
        self._successes: collections.deque[float] = collections.deque()
        self.throttle_count = 0

    # ---- pure decisions -------------------------------------------------------------------

    def next_allowed(self, now: float) -> float:
        """The earliest time a call may go out (== now when it may go at once)."""
        at = max(now, self.paused_until)
        if self.rate_per_s is not None:
            tokens = self._tokens_at(at)
            if tokens < 1.0:
                at += (1.0 - tokens) / self.rate_per_s
        return at

    def try_acquire(self, now: float) -> float:
        """Take a slot: 0.0 when the call may go now (a token is spent), else seconds to wait."""
        if self._first_seen is None:
            self._first_seen = now
        at = self.next_allowed(now)
        if at > now:
            return at - now
        if self.rate_per_s is not None:
            self._tokens = self._tokens_at(now) - 1.0
            self._refilled_at = now
        return 0.0

    def on_throttled(self, retry_after_s: float | None, now: float) -> None:
        """A 429 (or quota 403): pause the service and cap the rate at what got through."""
        retry_after = DEFAULT_RETRY_AFTER_S if retry_after_s is None else retry_after_s
        retry_after = min(max(0.0, retry_after), MAX_PAUSE_S)
        self.throttle_count += 1
        if now < self.paused_until:
            # Calls sent before the pause began answer 429 too: one event, not many.
            self.paused_until = max(self.paused_until, now + retry_after)
            return
        self.paused_until = now + retry_after
        measured = self._measured_rate(now, retry_after) * SAFETY_FACTOR
        if self.rate_per_s is not None:
            measured = min(measured, self.rate_per_s * DECREASE_FACTOR)
        self.rate_per_s = max(MIN_RATE_PER_S, measured)
        # The first call after the pause may go at once, the next waits 1/rate.
        self._tokens = 1.0
        self._refilled_at = self.paused_until
        self._relaxed_at = self.paused_until

    def on_success(self, now: float | None = None) -> None:
        """The gateway accepted a call: count it and let the cap grow with quiet time."""
        if now is None:
            now = self._clock()
        if self._first_seen is None:
            self._first_seen = now
        self._successes.append(now)
        self._prune(now)
        if self.rate_per_s is not None and now > self._relaxed_at:
            quiet_windows = (now - self._relaxed_at) / self.window_s
            grown = self.rate_per_s * math.pow(1.0 + RELAX_PER_WINDOW, quiet_windows)
            # Tokens accrued at the old rate stay; the new rate applies from now.
            self._tokens = self._tokens_at(now)
            self._refilled_at = now
            self._relaxed_at = now
            self.rate_per_s = None if grown > MAX_RATE_PER_S else grown
            if self.rate_per_s is None:
                self._tokens = 1.0

    def now(self) -> float:
        """The gate's clock (monotonic seconds unless a test gave another)."""
        return self._clock()

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    # ---- helpers --------------------------------------------------------------------------

    def _tokens_at(self, now: float) -> float:
        if self.rate_per_s is None:
            return 1.0
        elapsed = max(0.0, now - self._refilled_at)
        return min(1.0, self._tokens + elapsed * self.rate_per_s)

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._successes and self._successes[0] < horizon:
            self._successes.popleft()

    def _measured_rate(self, now: float, retry_after_s: float) -> float:
        """Calls per second the gateway let through: successes in the last window over the
        window length. When we have watched for less than a window, the window is taken to end
        when Retry-After says it renews (APIM counts per fixed period)."""
        self._prune(now)
        observed = now - (self._first_seen if self._first_seen is not None else now)
        span = max(MIN_SPAN_S, min(self.window_s, observed + retry_after_s))
        # Nothing got through yet (the window was spent by others): assume one call per window,
        # a probe, rather than a rate near zero that would stall the service.
        return max(1, len(self._successes)) / span

    # ---- async shell ----------------------------------------------------------------------

    async def wait(self) -> None:
        """Sleep until this service may be called, then take the slot."""
        while True:
            delay = self.try_acquire(self._clock())
            if delay <= 0:
                return
            await asyncio.sleep(delay)
