"""What a step's exception means for its job: fail now, or run the step again later. Pure.

Four kinds, each with its own count of consecutive failures per job (a long outage's transient
errors must not use up the few retries a bug gets):
- permanent (`errors.PermanentError`): the job fails with the error's code and message;
- throttled (`errors.ThrottledError`): the service asked us to wait; never fails a job;
- transient (`errors.TransientError`): backoff; fails only past `retry.max_attempts` (if set);
- internal (any other exception, a bug): backoff, and the job fails `InternalError` at the
  MAX_INTERNAL_ERRORS-th in a row.
"""

from __future__ import annotations

import dataclasses
import enum
import random

from orchestrator import backoff, config, errors, jobs, lifecycle, steps

MAX_INTERNAL_ERRORS = 5
#: A throttling answer without Retry-After waits this long.
THROTTLE_DEFAULT_S = 5.0


class Kind(enum.StrEnum):
    PERMANENT = "permanent"
    THROTTLED = "throttled"
    TRANSIENT = "transient"
    INTERNAL = "internal"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Retry:
    delay_s: float


def kind_of(exc: BaseException) -> Kind:
    if isinstance(exc, errors.PermanentError):
        return Kind.PERMANENT
    if isinstance(exc, errors.ThrottledError):
        return Kind.THROTTLED
    if isinstance(exc, errors.TransientError):
        return Kind.TRANSIENT
    return Kind.INTERNAL


def decide(
    exc: BaseException, *, failures: int, policy: config.RetryPolicy, rng: random.Random
) -> steps.Fail | Retry:
    """`failures`: consecutive failures of this kind for this job, this one included."""
    kind = kind_of(exc)
    if isinstance(exc, errors.PermanentError):
        return steps.Fail(code=exc.code or "Error", message=str(exc))
    if isinstance(exc, errors.ThrottledError):
        wait = exc.retry_after_s
        return Retry(delay_s=wait if wait is not None else THROTTLE_DEFAULT_S)
    if isinstance(exc, errors.TransientError):
        if backoff.retries_exhausted(policy, failures):
            return steps.Fail(code=exc.code or "TransientError", message=str(exc))
        return Retry(delay_s=backoff.retry_delay_s(
            policy, failures, retry_after_s=exc.retry_after_s, rng=rng))
    assert kind is Kind.INTERNAL
    if failures >= MAX_INTERNAL_ERRORS:
        return steps.Fail(code="InternalError", message=f"{type(exc).__name__}: {exc}")
    return Retry(delay_s=backoff.retry_delay_s(policy, failures, rng=rng))


def refusal(job: jobs.Job, settings: config.Settings) -> steps.Fail | None:
    """A job no step should run: its service is gone, or it keeps being claimed without
    finishing (a crash loop). Failing and cancelling jobs always get to end."""
    if job.service not in settings.services:
        return steps.Fail(code="UnknownService", message=f"no service named {job.service!r}")
    ending = job.state in (lifecycle.JobState.FAILING, lifecycle.JobState.CANCELLING)
    if job.attempts > settings.daemon.max_claims and not ending:
        return steps.Fail(
            code="TooManyAttempts",
            message=f"claimed {job.attempts} times without finishing (a crash loop?)")
    return None
