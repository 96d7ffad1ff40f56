"""What a step's exception means for its job (orchestrator/step_errors.py): pure, with numbers."""

from __future__ import annotations

import random

from orchestrator import config, errors, steps
from orchestrator import step_errors as se

POLICY = config.RetryPolicy(initial_s=1.0, multiplier=2.0, max_s=8.0, max_attempts=0)
LIMITED = config.RetryPolicy(initial_s=1.0, multiplier=2.0, max_s=8.0, max_attempts=3)
RNG = random.Random(7)


def test_kinds() -> None:
    assert se.kind_of(errors.PermanentError("x")) is se.Kind.PERMANENT
    assert se.kind_of(errors.ThrottledError("x")) is se.Kind.THROTTLED
    assert se.kind_of(errors.TransientError("x")) is se.Kind.TRANSIENT
    assert se.kind_of(KeyError("x")) is se.Kind.INTERNAL


def test_permanent_fails_at_once_with_its_code() -> None:
    got = se.decide(errors.PermanentError("bad input", code="BadArgument"), failures=0,
                    policy=POLICY, rng=RNG)
    assert got == steps.Fail(code="BadArgument", message="bad input")


def test_throttled_waits_what_the_service_asked_and_never_fails() -> None:
    assert se.decide(errors.ThrottledError("slow", retry_after_s=12.0), failures=10_000,
                     policy=LIMITED, rng=RNG) == se.Retry(delay_s=12.0)
    assert se.decide(errors.ThrottledError("slow"), failures=1, policy=POLICY,
                     rng=RNG) == se.Retry(delay_s=se.THROTTLE_DEFAULT_S)


def test_transient_backs_off_and_fails_only_past_a_configured_limit() -> None:
    for n in (1, 2, 3, 4, 50):
        got = se.decide(errors.TransientError("503"), failures=n, policy=POLICY, rng=RNG)
        assert isinstance(got, se.Retry)
        cap = min(8.0, 2.0 ** (n - 1))
        assert cap / 2 <= got.delay_s <= cap
    got = se.decide(errors.TransientError("503", retry_after_s=30.0), failures=1,
                    policy=POLICY, rng=RNG)
    assert got == se.Retry(delay_s=30.0)  # Retry-After wins when longer
    assert isinstance(se.decide(errors.TransientError("503"), failures=2, policy=LIMITED,
                                rng=RNG), se.Retry)
    assert se.decide(errors.TransientError("503", code="ServiceUnavailable"), failures=3,
                     policy=LIMITED, rng=RNG) == steps.Fail(code="ServiceUnavailable",
                                                            message="503")


def test_a_bug_is_retried_four_times_then_fails_internal_error() -> None:
    for n in range(1, se.MAX_INTERNAL_ERRORS):
        assert isinstance(se.decide(KeyError("k"), failures=n, policy=POLICY, rng=RNG),
                          se.Retry)
    assert se.decide(KeyError("k"), failures=se.MAX_INTERNAL_ERRORS, policy=POLICY,
                     rng=RNG) == steps.Fail(code="InternalError", message="KeyError: 'k'")
