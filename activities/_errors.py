"""How a Fly API failure reaches the workflow: one `ApplicationError` whose type names the
failure, whose retryability follows the API's classification, and whose message a person
can act on."""

from __future__ import annotations

from datetime import timedelta

from temporalio.exceptions import ApplicationError

from flyapi import FlyAPIError, FlyError


def to_application_error(exc: FlyError, *, action: str) -> ApplicationError:
    """`action` reads like "Create Fly app turbobackend-p1"; the message becomes
    "Create Fly app turbobackend-p1 failed: 422 Name has already been taken (request id …)".
    """
    retry_after = exc.retry_after if isinstance(exc, FlyAPIError) else None
    details = []
    if isinstance(exc, FlyAPIError):
        details.append(
            {"status_code": exc.status_code, "request_id": exc.request_id, "path": exc.path}
        )
    return ApplicationError(
        f"{action} failed: {exc}",
        *details,
        type=type(exc).__name__,
        non_retryable=not exc.retryable,
        next_retry_delay=(
            timedelta(seconds=retry_after) if retry_after is not None and exc.retryable else None
        ),
    )
