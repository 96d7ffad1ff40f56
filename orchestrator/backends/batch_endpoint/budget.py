"""One subscription's Azure Resource Manager read budget, spent by reserving time slots.

ARM limits reads per subscription and principal (a token bucket of about 250 reads refilling at
25/s) and answers 429 past it. Every status poll of every batch-endpoint job of one subscription
is an ARM read, so 10,000 jobs in flight cannot each be polled every 30 s. Instead of letting
polls burst into 429s, each poll reserves a slot in a calendar of one-second bins, each holding at
most `reads_per_s` reads spread evenly inside it: a poll that wants to run at `t` runs at the
first free slot at or after `t`. The calendar slows down when the service reports few remaining
reads (`x-ms-ratelimit-remaining-subscription-reads`) and stops until `Retry-After` after a 429.

Pure: every method takes `now` (monotonic seconds) and returns numbers; the poll step turns a
slot into its reschedule delay, so a waiting job holds no executor while it waits for its slot.
"""

from __future__ import annotations

import math

#: Width of a calendar bin (seconds).
BIN_S = 1.0
#: Below this many remaining reads the budget slows down in proportion.
LOW_REMAINING_READS = 100
#: Never slower than this share of the configured rate because of a low remaining count.
MIN_FACTOR = 0.1
#: Longest pause honoured from one Retry-After (a broken header must not stop polling for days).
MAX_PAUSE_S = 600.0
#: A poll that comes more than this late for its slot (its executor was held up) does not use
#: it. Lateness below it is ordinary scheduling (the daemon's own target is under 2 s) and goes
#: out as is: at worst a few seconds' slots in one, well inside ARM's bucket of about 250.
MISSED_SLOT_S = 2.0


class ReadBudget:
    """Reads per second for one subscription, as a calendar of future slots. One event loop."""

    def __init__(self, reads_per_s: float) -> None:
        if reads_per_s <= 0:
            raise ValueError("reads_per_s must be positive")
        self.reads_per_s = reads_per_s
        #: Scales the rate down when the service says few reads remain (1.0 = full rate).
        self.factor = 1.0
        #: No slot starts before this (after a 429).
        self.paused_until = -math.inf
        #: Reads reserved per bin index (bin = floor(t / BIN_S)); bins in the past are pruned.
        self._used: dict[int, int] = {}
        #: For a full bin: a bin at or before the next one with room (path-compressed jumps).
        self._next: dict[int, int] = {}
        self._oldest = 0
        self.throttle_count = 0
        self.reserved = 0

    # ---- the rate -------------------------------------------------------------------------

    @property
    def rate_per_s(self) -> float:
        return self.reads_per_s * self.factor

    def _capacity(self) -> int:
        return max(1, int(self.rate_per_s * BIN_S))

    def effective_interval_s(self, jobs_polling: int, wanted_s: float) -> float:
        """How often each of `jobs_polling` jobs can be polled: the policy's interval, or longer
        when the budget cannot carry that many (what `status` shows)."""
        if jobs_polling <= 0:
            return wanted_s
        return max(wanted_s, jobs_polling / self.rate_per_s)

    # ---- reserving ------------------------------------------------------------------------

    def reserve(self, want_at: float, now: float) -> float:
        """The time of the first free read slot at or after `want_at` (and after any pause)."""
        self._prune(now)
        start = max(want_at, now, self.paused_until)
        b = self._find(math.floor(start / BIN_S))
        used = self._used.get(b, 0)
        cap = self._capacity()
        self._used[b] = used + 1
        if used + 1 >= cap:
            self._next[b] = b + 1
        self.reserved += 1
        slot = b * BIN_S + (used % cap) * BIN_S / cap  # spread evenly inside the bin
        return max(start, slot)

    def slot_for_poll(self, slot: float | None, now: float, *, may_reslot: bool) -> float:
        """The slot a poll about to run goes out at: a fresh one when it has none, or when it
        missed its slot by more than MISSED_SLOT_S and `may_reslot`; else its own.

        A missed slot is not used late: polls held up together (the executors busy with an
        intake of thousands of files) would otherwise all go out the moment they are freed, a
        burst far over the rate, and ARM answers 429. A fresh slot puts each at the end of the
        calendar. The caller allows this once per slot it reserved, so a job whose executor is
        always a little late still polls on its second try."""
        if slot is None or (may_reslot and slot < now - MISSED_SLOT_S):
            return self.reserve(now, now)
        return slot

    def _find(self, b: int) -> int:
        """First bin at or after `b` with room, compressing the jump chain behind it."""
        path = []
        cap = self._capacity()
        while True:
            nxt = self._next.get(b)
            if nxt is None:
                if self._used.get(b, 0) < cap:
                    break
                nxt = b + 1  # full under a lowered capacity
                self._next[b] = nxt
            path.append(b)
            b = nxt
        for p in path:
            self._next[p] = b
        return b

    def _prune(self, now: float) -> None:
        current = math.floor(now / BIN_S)
        if current - self._oldest < 64:
            return
        for b in range(self._oldest, current):
            self._used.pop(b, None)
            self._next.pop(b, None)
        self._oldest = current

    # ---- what the service says ------------------------------------------------------------

    def on_remaining(self, remaining_reads: int | None) -> None:
        """The `x-ms-ratelimit-remaining-subscription-reads` header of an ARM answer."""
        if remaining_reads is None:
            return
        if remaining_reads >= LOW_REMAINING_READS:
            self.factor = 1.0
        else:
            self.factor = max(MIN_FACTOR, remaining_reads / LOW_REMAINING_READS)

    def on_throttled(self, now: float, retry_after_s: float | None) -> float:
        """A 429: no read before `Retry-After` has passed. Returns when reads may resume."""
        self.throttle_count += 1
        pause = min(MAX_PAUSE_S, retry_after_s if retry_after_s is not None else 5.0)
        self.paused_until = max(self.paused_until, now + max(0.0, pause))
        self.factor = MIN_FACTOR if self.factor <= MIN_FACTOR else self.factor / 2
        return self.paused_until
