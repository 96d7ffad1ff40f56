"""The ARM read budget: pure decisions driven with numbers (seconds on a made-up clock)."""

from __future__ import annotations

import collections
import itertools
import math

import pytest

from orchestrator.backends.batch_endpoint import budget


def per_second(slots: list[float]) -> collections.Counter[int]:
    return collections.Counter(math.floor(s) for s in slots)


def test_ten_thousand_polls_due_at_once_are_spread_within_the_rate() -> None:
    b = budget.ReadBudget(20)
    slots = [b.reserve(0.0, now=0.0) for _ in range(10_000)]
    counts = per_second(slots)
    assert max(counts.values()) == 20
    assert max(slots) == pytest.approx(500 - 1 / 20)
    assert slots == sorted(slots)  # first come, first served


def test_reads_inside_a_second_are_spaced_not_bursted() -> None:
    b = budget.ReadBudget(20)
    slots = [b.reserve(10.0, now=0.0) for _ in range(20)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(slots)]
    assert min(gaps) == pytest.approx(0.05)


def test_a_poll_never_runs_before_it_wants_to() -> None:
    b = budget.ReadBudget(5)
    for _ in range(50):
        b.reserve(0.0, now=0.0)
    assert b.reserve(3.5, now=0.0) >= 10.0  # seconds 0..9 are full
    assert 100.0 <= b.reserve(100.0, now=0.0) < 101.0


def test_a_429_pauses_every_read_until_retry_after_and_slows_down() -> None:
    b = budget.ReadBudget(20)
    resume = b.on_throttled(now=50.0, retry_after_s=30.0)
    assert resume == 80.0
    assert b.reserve(51.0, now=50.0) >= 80.0
    assert b.rate_per_s == 10.0
    assert b.throttle_count == 1


def test_low_remaining_reads_slow_the_budget_and_recovery_restores_it() -> None:
    b = budget.ReadBudget(20)
    b.on_remaining(25)
    assert b.rate_per_s == pytest.approx(5.0)
    slots = [b.reserve(0.0, now=0.0) for _ in range(100)]
    assert max(per_second(slots).values()) == 5
    b.on_remaining(12_000)
    assert b.rate_per_s == 20.0
    b.on_remaining(None)  # a response without the header changes nothing
    assert b.rate_per_s == 20.0


def test_effective_interval_is_the_policy_until_the_budget_cannot_carry_it() -> None:
    b = budget.ReadBudget(20)
    assert b.effective_interval_s(100, 30.0) == 30.0
    assert b.effective_interval_s(10_000, 30.0) == 500.0
    assert b.effective_interval_s(0, 30.0) == 30.0


def test_past_bins_are_forgotten() -> None:
    b = budget.ReadBudget(20)
    for t in range(0, 1000, 10):
        b.reserve(float(t), now=float(t))
    assert len(b._used) < 20


def test_polls_held_up_past_their_slots_are_spread_again_not_sent_together() -> None:
    """5,000 jobs got slots over 250 s, but their executors were busy (an intake) until 300 s:
    at 300 s all of them come at once. Each takes a fresh slot, so the reads still go out at
    the rate instead of all at 300 s."""
    b = budget.ReadBudget(20)
    old = [b.reserve(0.0, now=0.0) for _ in range(5_000)]
    fresh = [b.slot_for_poll(s, 300.0, may_reslot=True) for s in old]
    assert min(fresh) >= 300.0
    assert max(per_second(fresh).values()) == 20
    assert max(fresh) == pytest.approx(550 - 1 / 20)


def test_a_little_late_or_already_reslotted_polls_keep_their_slot() -> None:
    b = budget.ReadBudget(20)
    slot = b.reserve(10.0, now=0.0)
    # Ordinary lateness: the slot is used as it is (no second reservation).
    assert b.slot_for_poll(slot, slot + budget.MISSED_SLOT_S, may_reslot=True) == slot
    # Late a second time after a fresh slot: it goes, so no job waits for ever.
    assert b.slot_for_poll(slot, slot + 60.0, may_reslot=False) == slot
    assert b.reserved == 1
    # No slot yet: one is reserved now.
    assert b.slot_for_poll(None, 20.0, may_reslot=False) == pytest.approx(20.0)
