"""Keep training alive when the tracking server is not.

A tracking outage must cost the training loop almost nothing: every call is retried a few times with
exponential backoff, then the server is considered down and further attempts are skipped until
`retry_interval_s` has passed (a circuit breaker), so a dead server costs one short attempt per
interval instead of a stall per step. Errors that cannot succeed on retry (an invalid value, a
missing run) are not retried. A failure is reported once as a warning line; later ones are counted
and summarised. With `strict=True` the first failure is raised instead.
"""
from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("vitscale.tracking")
T = TypeVar("T")

# MLflow error codes that describe the request, not the server's health: retrying cannot help.
PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "BAD_REQUEST",
})


class TrackingError(RuntimeError):
    """Raised only in strict mode: tracking failed and the user asked for that to be fatal."""


class Outcome(enum.Enum):
    OK = "ok"
    DOWN = "down"  # transient failure: keep the work and try again later
    DROPPED = "dropped"  # permanent failure: retrying cannot help, the work is discarded (and counted)


def is_permanent(exc: BaseException) -> bool:
    """True for errors a retry cannot fix (bad value, unknown run, vanished local file), False for outages."""
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, TypeError, ValueError)):
        return True
    return getattr(exc, "error_code", None) in PERMANENT_ERROR_CODES


@dataclass
class RetryPolicy:
    attempts: int = 3
    backoff_s: float = 0.25
    retry_interval_s: float = 30.0
    strict: bool = False


class Resilient:
    """Run tracking calls under a RetryPolicy; remembers whether the server is currently down."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._sleep = sleep
        self.failures = 0  # calls that failed after all their attempts (or permanently)
        self.down_since: float | None = None
        self._last_attempt = float("-inf")
        self._warned = False

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def ready(self) -> bool:
        """Whether a call should be attempted now (False while down and inside the retry interval)."""
        if self.down_since is None:
            return True
        return self._clock() - self._last_attempt >= self.policy.retry_interval_s

    def allow_now(self) -> None:
        """Let the next call through even inside the retry interval (used for the final flush)."""
        self._last_attempt = float("-inf")

    def call(self, what: str, fn: Callable[[], T]) -> tuple[Outcome, T | None]:
        """Run `fn` with retries; return (outcome, result). Raises only in strict mode."""
        self._last_attempt = self._clock()
        attempts = max(1, self.policy.attempts)
        for attempt in range(attempts):
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - any client/transport failure must not stop training
                if is_permanent(exc):
                    self._fail(what, exc, permanent=True)
                    return Outcome.DROPPED, None
                if attempt + 1 < attempts:
                    self._sleep(self.policy.backoff_s * 2**attempt)
                    continue
                self._fail(what, exc, permanent=False)
                return Outcome.DOWN, None
            self._recovered()
            return Outcome.OK, result
        raise AssertionError("unreachable")

    def permanent_failure(self, what: str, exc: BaseException) -> None:
        """Record a failure detected by the caller (e.g. a value MLflow would reject)."""
        self._fail(what, exc, permanent=True)

    def _fail(self, what: str, exc: BaseException, *, permanent: bool) -> None:
        self.failures += 1
        message = f"MLflow tracking: {what} failed ({type(exc).__name__}: {_one_line(exc)})"
        if self.policy.strict:
            raise TrackingError(message + "; tracking.strict=true makes this fatal") from exc
        if not permanent and self.down_since is None:
            self.down_since = self._clock()
        if not self._warned:
            self._warned = True
            hint = ("dropped (a retry cannot fix it)" if permanent else
                    f"buffering and retrying every {self.policy.retry_interval_s:g}s; training continues")
            log.warning("%s: %s. Further tracking failures are counted, not repeated.", message, hint)
        else:
            log.debug(message)

    def _recovered(self) -> None:
        if self.down_since is not None:
            log.warning("MLflow tracking reachable again after %.0fs (%d failed calls so far)",
                        self._clock() - self.down_since, self.failures)
            self.down_since = None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
