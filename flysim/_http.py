"""What the route modules share: the error answer, request parsing, app lookup.

The route modules see the emulator through `SimContext` rather than `FlySim`, so that
`server.py` can build on them without them importing it back.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from flysim.config import SimConfig
from flysim.state import App, World
from flysim.stats import SimStats

Handler = Callable[[Request], Awaitable[Response]]


class SimContext(Protocol):
    # Read on every request, never captured: `FlySim.reset()` and the config setter
    # replace these objects while the routes live on.
    @property
    def world(self) -> World: ...

    @property
    def stats(self) -> SimStats: ...

    @property
    def config(self) -> SimConfig: ...


class ApiError(Exception):
    """Answered as `{"error": message, "status": "unknown"}` (the spec's ErrorResponse)."""

    def __init__(self, status_code: int, message: str, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.body = body if body is not None else {"error": message, "status": "unknown"}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body, status_code=exc.status_code)


def flag(value: str | None) -> bool:
    return (value or "").lower() in {"1", "true", "yes"}


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise ApiError(400, "invalid JSON request body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


def request_org(request: Request) -> str:
    return str(request.scope["flysim.org"])


def path_app(world: World, request: Request) -> App:
    """The app named in the path, if the caller's organization owns it."""
    name = request.path_params["app_name"]
    app = world.apps.get(name)
    if app is None:
        raise ApiError(404, f"app not found: {name}")
    if app.org != request_org(request):
        raise ApiError(403, f"app {name} belongs to another organization")
    world.advance(app)
    return app
