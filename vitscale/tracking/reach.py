"""Talking to an MLflow server that may be down: fail in seconds, with one line naming the server.

MLflow's HTTP defaults (7 retries with exponential backoff, 120 s per request) make a dead server
cost about four minutes per call before a traceback. A training job resolving ``models:/NAME@alias``
at start-up gains nothing from waiting that long, so resolution runs under ``fast_fail_http`` (no
MLflow-level retries, ``timeout_s`` per request, unless the user set those variables) and an
unreachable server becomes ``TrackingUnreachable`` with one line.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

RETRIES_VAR = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
TIMEOUT_VAR = "MLFLOW_HTTP_REQUEST_TIMEOUT"
DEFAULT_TIMEOUT_S = 10
# What requests/urllib3 say inside MLflow's "API request to ... failed with exception ..." message.
_REASONS = (
    (re.compile(r"Connection refused", re.I), "connection refused"),
    (re.compile(r"timed out|ReadTimeout|ConnectTimeout", re.I), "timed out"),
    (re.compile(r"Name or service not known|nodename nor servname|getaddrinfo failed|Temporary failure in name "
                r"resolution", re.I), "host name not found"),
    (re.compile(r"No route to host|Network is unreachable", re.I), "no route to host"),
    (re.compile(r"Connection reset|RemoteDisconnected|Connection aborted", re.I), "connection reset"),
    (re.compile(r"Max retries exceeded|Failed to establish a new connection", re.I), "cannot connect"),
    (re.compile(r"\b50[234]\b|TEMPORARILY_UNAVAILABLE", re.I), "server error (5xx)"),
)


class TrackingUnreachable(ConnectionError):
    """The MLflow server (tracking or registry) did not answer; ``str()`` is one line naming it."""


class TrackingAuthError(PermissionError):
    """The MLflow server answered 401/403 (basic-auth app or proxy): one line naming it and the fix."""


@contextlib.contextmanager
def fast_fail_http(timeout_s: int = DEFAULT_TIMEOUT_S) -> Iterator[None]:
    """No MLflow-level HTTP retries and ``timeout_s`` per request inside the block (variables the user
    set are left alone); the previous environment is restored afterwards."""
    wanted = {RETRIES_VAR: "0", TIMEOUT_VAR: str(int(timeout_s))}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def unreachable_reason(exc: BaseException) -> str | None:
    """Why the server did not answer (``connection refused``, ``timed out``, ...), or None when ``exc``
    is an answer (a missing model, a permission error) rather than an outage."""
    code = getattr(exc, "error_code", None)
    text = str(exc)
    transport = type(exc).__module__.split(".")[0] in ("requests", "urllib3") or isinstance(exc, (ConnectionError,
                                                                                                  TimeoutError))
    api_failure = "API request to" in text and "failed with exception" in text
    if not (transport or api_failure or code == "TEMPORARILY_UNAVAILABLE"):
        return None
    for pattern, reason in _REASONS:
        if pattern.search(text):
            return reason
    return "no answer"


def auth_error(exc: BaseException, server: str, what: str) -> TrackingAuthError | None:
    """A one-line TrackingAuthError when ``exc`` is the server refusing our credentials, else None."""
    text = str(exc)
    code = getattr(exc, "error_code", None)
    found = re.search(r"error code (401|403)\b", text)
    if not found and code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return None
    status = found[1] if found else code
    return TrackingAuthError(f"MLflow server {server} refused our credentials ({status}) while {what}: set "
                             f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account with access "
                             f"(docs/cluster.md)")


def server_of(uri: str) -> str:
    """``scheme://host:port`` of a tracking URI, credentials and paths removed (safe to print)."""
    m = re.match(r"^(\w+://)(?:[^@/]*@)?([^/]+)", uri)
    return f"{m[1]}{m[2]}" if m else uri
