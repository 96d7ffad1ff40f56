"""The state machine's allowed edges and the retry resume rule: pure, tested with plain values."""

from __future__ import annotations

import pytest

from orchestrator import lifecycle

S = lifecycle.JobState
W, P = lifecycle.Actor.WORKER, lifecycle.Actor.PERSON

#: Every change the steps make today (each step's success, poll's resubmit, any failure).
STEP_EDGES = [
    (S.CLAIMED, S.ACCEPTED), (S.ACCEPTED, S.UPLOADED), (S.UPLOADED, S.SUBMITTED),
    (S.SUBMITTED, S.STARTED), (S.STARTED, S.REMOTE_FINISHED), (S.STARTED, S.ACCEPTED),
    (S.REMOTE_FINISHED, S.DOWNLOADED), (S.DOWNLOADED, S.DONE), (S.FAILING, S.FAILED),
    (S.CANCELLING, S.CANCELLED),
]


@pytest.mark.parametrize(("a", "b"), STEP_EDGES)
def test_every_step_edge_is_allowed_for_a_worker_only(a: S, b: S) -> None:
    assert lifecycle.allowed(a, b, W)
    assert not lifecycle.allowed(a, b, P)
    assert lifecycle.refusal(a, b, W) is None


@pytest.mark.parametrize("state", sorted(lifecycle.ACTIVE_STATES))
def test_any_active_job_can_fail(state: S) -> None:
    assert lifecycle.allowed(state, S.FAILING, W)


@pytest.mark.parametrize(("a", "b"), [
    (S.CLAIMED, S.DONE), (S.CLAIMED, S.STARTED), (S.UPLOADED, S.STARTED),
    (S.STARTED, S.FAILED), (S.DONE, S.CLAIMED), (S.FAILED, S.FAILING), (S.DONE, S.FAILING),
    (S.CANCELLED, S.CANCELLING), (S.ACCEPTED, S.ACCEPTED), (S.REMOTE_FINISHED, S.STARTED),
])
def test_illegal_edges_are_refused_with_a_reason(a: S, b: S) -> None:
    assert not lifecycle.allowed(a, b, W) and not lifecycle.allowed(a, b, P)
    assert lifecycle.refusal(a, b) == f"illegal state change {a} -> {b} by a worker"


def test_people_cancel_and_retry_but_never_finish_a_job() -> None:
    for state in lifecycle.ACTIVE_STATES:
        assert lifecycle.allowed(state, S.CANCELLING, P) == lifecycle.can_cancel(state)
        assert not lifecycle.allowed(state, S.CANCELLING, W)
    for state in (S.FAILED, S.CANCELLED):
        assert lifecycle.allowed(state, S.CLAIMED, P) and not lifecycle.allowed(state, S.CLAIMED, W)
    assert all(not lifecycle.allowed(a, b, P)
               for a, b in lifecycle.EDGES if b in lifecycle.TERMINAL_STATES)


def test_terminal_states_are_left_only_by_a_person() -> None:
    for (a, _), actors in lifecycle.EDGES.items():
        if a in lifecycle.TERMINAL_STATES:
            assert actors == frozenset({P})


def test_every_active_state_has_a_step_and_a_way_out() -> None:
    assert set(lifecycle.STEP_FOR_STATE) == set(lifecycle.ACTIVE_STATES)
    for state in lifecycle.ACTIVE_STATES:
        reachable, frontier = {state}, [state]
        while frontier:
            here = frontier.pop()
            for a, b in lifecycle.EDGES:
                if a is here and b not in reachable and lifecycle.allowed(a, b, W):
                    reachable.add(b)
                    frontier.append(b)
        assert reachable & lifecycle.TERMINAL_STATES, state


def test_next_state_table_is_gone() -> None:
    """The unused NEXT_STATE table was replaced by EDGES (one source of truth)."""
    assert not hasattr(lifecycle, "NEXT_STATE")


@pytest.mark.parametrize(("failed_from", "code", "resume"), [
    (S.REMOTE_FINISHED, "ResultUnwritable", S.REMOTE_FINISHED),  # a full results disk
    (S.REMOTE_FINISHED, "DownloadFailed", S.REMOTE_FINISHED),
    (S.REMOTE_FINISHED, "BesStateChanged", S.CLAIMED),  # the remote results are not valid
    (S.REMOTE_FINISHED, "NoResults", S.CLAIMED),
    (S.DOWNLOADED, "ArchiveUnwritable", S.DOWNLOADED),  # results are in place already
    (S.STARTED, "BesJobFailed", S.CLAIMED),
    (S.UPLOADED, "StorageUnavailable", S.CLAIMED),
    (None, None, S.CLAIMED),
])
def test_retry_resumes_a_local_failure_at_its_step(
    failed_from: S | None, code: str | None, resume: S
) -> None:
    assert lifecycle.resume_state(failed_from, code) is resume
    assert lifecycle.allowed(S.FAILED, resume, P)
