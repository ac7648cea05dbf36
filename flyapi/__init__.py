"""A typed async client of the Fly Machines API (https://api.machines.dev/v1).

    async with FlyClient(base_url, token=credentials.fly_token) as fly:
        app = await fly.get_app("turbobackend-p1")      # None when it does not exist
        machines = await fly.list_machines("turbobackend-p1")

`token` is a string or an async callable returning one (awaited per request). The token is
sent as `Authorization: Bearer <token>` and appears in no exception, repr or log line.
Pass `transport=` (any `httpx.AsyncBaseTransport`, e.g. `httpx.ASGITransport`) to talk to an
in-process server, and one shared `RateLimiter` to every client of a process so that they
stay within one API budget together.

Errors
------
Every failure is a `FlyError`; `exc.retryable` says whether sending the same request later
may succeed::

    FlyError
    ├── FlyTransportError        no response: refused, dropped, timed out   (retryable)
    └── FlyAPIError              an error status: status_code, message, request_id,
        │                        retry_after (seconds, from Retry-After, or None)
        ├── FlyRetryableError    408, 409 (lease held, version mismatch), 429, 5xx
        └── FlyClientError       any other 4xx                           (not retryable)
            ├── FlyBadRequest        400
            ├── FlyUnauthorized      401
            ├── FlyForbidden         403
            ├── FlyNotFound          404
            └── FlyUnprocessable     422

The client does not retry on its own: retry policy belongs to the caller. The one exception
is a GET whose connection dropped before any response; it is sent once more, immediately.
"""

from flyapi._client import FlyClient, IPType, TokenSource, WaitHook, WaitState, web_base_url_for
from flyapi._errors import (
    FlyAPIError,
    FlyBadRequest,
    FlyClientError,
    FlyError,
    FlyForbidden,
    FlyNotFound,
    FlyRetryableError,
    FlyTransportError,
    FlyUnauthorized,
    FlyUnprocessable,
)
from flyapi._models import (
    FAILED_STATES,
    App,
    AppSecret,
    CheckStatus,
    DeployToken,
    IPAssignment,
    Lease,
    LogEntry,
    LogPage,
    Machine,
    MachineEvent,
    Organization,
    Volume,
)
from flyapi._ratelimit import RateLimiter
from flyapi._retry import RequestRetry

__all__ = [
    "FAILED_STATES",
    "App",
    "AppSecret",
    "CheckStatus",
    "DeployToken",
    "FlyAPIError",
    "FlyBadRequest",
    "FlyClient",
    "FlyClientError",
    "FlyError",
    "FlyForbidden",
    "FlyNotFound",
    "FlyRetryableError",
    "FlyTransportError",
    "FlyUnauthorized",
    "FlyUnprocessable",
    "IPAssignment",
    "IPType",
    "Lease",
    "LogEntry",
    "LogPage",
    "Machine",
    "MachineEvent",
    "Organization",
    "RateLimiter",
    "RequestRetry",
    "TokenSource",
    "Volume",
    "WaitHook",
    "WaitState",
    "web_base_url_for",
]
