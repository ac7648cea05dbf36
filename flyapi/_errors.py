"""The exceptions raised by the client, and how a response becomes one."""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import Any

import httpx

_MAX_MESSAGE_CHARS = 500
_RETRYABLE_STATUS = frozenset({408, 409, 429})


class FlyError(Exception):
    """Base class of everything the client raises."""

    @property
    def retryable(self) -> bool:
        return False


class FlyTransportError(FlyError):
    """No response arrived: connection refused or dropped, or a timeout. Worth retrying."""

    def __init__(self, message: str, *, method: str = "", path: str = "") -> None:
        super().__init__(message)
        self.method = method
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_transport_error, (str(self), self.method, self.path))

    @property
    def retryable(self) -> bool:
        return True


class FlyAPIError(FlyError):
    """The API answered with an error status.

    `str()` reads `"<status> <message> (request id <id>)"`; the request id is what Fly's
    support asks for.
    """

    def __init__(
        self,
        status_code: int,
        message: str,
        request_id: str | None = None,
        retry_after: float | None = None,
        *,
        method: str = "",
        path: str = "",
    ) -> None:
        self.status_code = status_code
        self.message = message
        self.request_id = request_id
        self.retry_after = retry_after
        self.method = method
        self.path = path
        text = f"{status_code} {message}"
        if request_id:
            text += f" (request id {request_id})"
        super().__init__(text)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_api_error,
            (
                type(self),
                self.status_code,
                self.message,
                self.request_id,
                self.retry_after,
                self.method,
                self.path,
            ),
        )

    @property
    def retryable(self) -> bool:
        return self.status_code in _RETRYABLE_STATUS or self.status_code >= 500


class FlyRetryableError(FlyAPIError):
    """408 (timed out: a create may have happened anyway), 409 (lease held, version
    mismatch, no capacity), 429 (rate limited) and 5xx."""


class FlyClientError(FlyAPIError):
    """A 4xx other than 408/409/429: repeating the request will not help."""


class FlyBadRequest(FlyClientError):
    """400."""


class FlyUnauthorized(FlyClientError):
    """401: the token is missing, malformed, expired or revoked."""


class FlyForbidden(FlyClientError):
    """403: e.g. the app exists in an organisation the token cannot see."""


class FlyNotFound(FlyClientError):
    """404."""


class FlyUnprocessable(FlyClientError):
    """422: validation failed (app name taken, invalid config, machine limit)."""


_BY_STATUS: dict[int, type[FlyClientError]] = {
    400: FlyBadRequest,
    401: FlyUnauthorized,
    403: FlyForbidden,
    404: FlyNotFound,
    422: FlyUnprocessable,
}


def _rebuild_transport_error(message: str, method: str, path: str) -> FlyTransportError:
    return FlyTransportError(message, method=method, path=path)


def _rebuild_api_error(
    cls: type[FlyAPIError],
    status_code: int,
    message: str,
    request_id: str | None,
    retry_after: float | None,
    method: str,
    path: str,
) -> FlyAPIError:
    return cls(status_code, message, request_id, retry_after, method=method, path=path)


def error_class(status_code: int) -> type[FlyAPIError]:
    if status_code in _RETRYABLE_STATUS or status_code >= 500:
        return FlyRetryableError
    if 400 <= status_code < 500:
        return _BY_STATUS.get(status_code, FlyClientError)
    # A 1xx/3xx that reached us is not something a retry fixes.
    return FlyAPIError


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """`Retry-After` as seconds to wait: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(seconds, 0.0)


def _body_message(response: httpx.Response) -> str:
    text = response.text
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("message", "error"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    if text.strip():
        return text.strip()
    return response.reason_phrase or "no error message"


def error_from_response(
    response: httpx.Response, *, method: str, path: str, secret: str | None
) -> FlyAPIError:
    message = _body_message(response)
    if secret and secret in message:
        # Some proxies echo request headers into error pages.
        message = message.replace(secret, "[redacted]")
    if len(message) > _MAX_MESSAGE_CHARS:
        message = message[:_MAX_MESSAGE_CHARS] + "…"
    status = response.status_code
    return error_class(status)(
        status,
        message,
        response.headers.get("fly-request-id"),
        parse_retry_after(response.headers.get("retry-after")),
        method=method,
        path=path,
    )
