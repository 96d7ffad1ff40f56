"""One exception tree. Transient vs Permanent drives every retry decision."""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error this package raises on purpose. Messages never hold secrets."""


class ConfigError(OrchestratorError):
    """A bad configuration: names the key. The CLI exits with EX_CONFIG (78)."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key
        self.problem = problem


class DatabaseVersionError(OrchestratorError):
    """The database schema is older or newer than this program."""


class NotFound(OrchestratorError):
    """No job with that id (or id prefix)."""


class InvalidState(OrchestratorError):
    """The job is not in a state that allows the requested action."""


class TransientError(OrchestratorError):
    """Worth retrying with backoff: timeouts, 5xx, dropped connections, storage hiccups."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        code: str = "",
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.code = code
        self.status = status


class ThrottledError(TransientError):
    """429 / quota 403 with Retry-After: pause the whole service, never fail the job."""


class PermanentError(OrchestratorError):
    """Retrying cannot help: the job fails with this code and message."""

    def __init__(self, message: str, *, code: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
