"""Per-service slots (orchestrator/slots.py): pure bookkeeping, checked with plain numbers."""

from __future__ import annotations

from orchestrator import slots


def test_reserve_up_to_the_limit_then_park_in_order() -> None:
    s = slots.Slots({"a": 2})
    assert s.reserve("a", "j1") and s.reserve("a", "j2")
    assert not s.reserve("a", "j3") and not s.reserve("a", "j4")
    assert s.used("a") == 2 and s.parked("a") == 2
    assert s.is_parked("j3") and s.is_parked("j4")
    assert s.release("a") == "j3"  # first parked, first woken
    assert s.used("a") == 1 and s.parked("a") == 1
    assert s.reserve("a", "j3")  # the woken job reserves when it runs
    assert not s.is_parked("j3")
    assert s.release("a") == "j4"


def test_parking_twice_keeps_one_place() -> None:
    s = slots.Slots({"a": 1})
    assert s.reserve("a", "j1")
    assert not s.reserve("a", "j2")
    assert not s.reserve("a", "j2")
    assert s.parked("a") == 1
    assert s.release("a") == "j2"
    assert s.release("a") is None


def test_a_forgotten_job_is_skipped() -> None:
    s = slots.Slots({"a": 1})
    s.reserve("a", "j1")
    s.reserve("a", "j2")
    s.reserve("a", "j3")
    s.forget("j2")
    assert s.parked("a") == 1
    assert s.release("a") == "j3"


def test_occupy_counts_remote_jobs_past_the_limit() -> None:
    """A job taken over with its remote job already running holds a slot whatever the limit."""
    s = slots.Slots({"a": 1})
    s.occupy("a")
    s.occupy("a")
    assert s.used("a") == 2
    assert not s.reserve("a", "j1")
    assert s.release("a") is None  # 1 used, limit 1: still no room
    assert s.release("a") == "j1"


def test_submit_reservation_then_remote_state() -> None:
    """The worker's sequence: reserve for the submit step, occupy on SUBMITTED, release the
    reservation; the slot stays taken until the job leaves its remote states."""
    s = slots.Slots({"a": 1})
    assert s.reserve("a", "j1")
    s.occupy("a")  # SUBMITTED
    assert s.release("a") is None  # the reservation ends
    assert s.used("a") == 1
    assert not s.reserve("a", "j2")
    assert s.release("a") == "j2"  # j1 finished remotely


def test_services_are_independent_and_unknown_ones_unlimited() -> None:
    s = slots.Slots({"a": 1, "b": 1})
    assert s.reserve("a", "j1")
    assert s.reserve("b", "j2")
    assert not s.reserve("a", "j3")
    assert all(s.reserve("zzz", f"k{i}") for i in range(100))
    assert s.limit("zzz") is None


def test_release_never_goes_below_zero() -> None:
    s = slots.Slots({"a": 1})
    assert s.release("a") is None
    assert s.used("a") == 0
    assert s.reserve("a", "j1")


def test_raising_a_limit_wakes_as_many_parked_jobs_as_fit() -> None:
    s = slots.Slots({"a": 1})
    s.reserve("a", "j0")
    for i in range(1, 6):
        assert not s.reserve("a", f"j{i}")
    assert s.set_limits({"a": 4}) == ["j1", "j2", "j3"]
    assert s.parked("a") == 2
    assert s.set_limits({"a": 1}) == []  # lowering wakes nobody; running jobs finish
