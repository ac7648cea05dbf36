"""An app's logs, served as Fly's web API serves them to `fly logs` (polling):
`GET /api/v1/apps/{app}/logs?next_token=&instance=&region=`.

The emulated machines log what a real one shows: their boot (the runner pulling the image
and starting init, the app listening), their health checks changing state, their stops and
destroys, and one line per request the proxy sent them (method, path without its query,
status). Nothing here ever holds a secret value: lines are made from states, images and
paths only.

Lines are derived from the machines' events when read, plus the requests the proxy
recorded, ordered by time; `next_token` is the position of the last line returned, so a
poll with it gets only newer lines. Every read first applies the transitions that are due,
so a line never appears before one already returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flysim._http import ApiError, SimContext, path_app
from flysim.config import SimConfig
from flysim.state import App, Machine, ulid

PAGE_SIZE = 100
MAX_REQUEST_LINES = 1000  # per app; older request lines are forgotten


@dataclass(frozen=True)
class LogLine:
    at: float
    id: str
    message: str
    instance: str
    region: str
    provider: str  # "app", "runner" or "proxy"
    level: str = "info"
    http: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{int(self.at * 1_000_000):020d}-{self.id}"

    def to_json(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "instance": self.instance,
            "region": self.region,
            "event": {"provider": self.provider},
        }
        meta.update(self.http)
        return {
            "id": self.key,
            "type": "logs",
            "attributes": {
                "timestamp": _rfc3339(self.at),
                "message": self.message,
                "level": self.level,
                "instance": self.instance,
                "region": self.region,
                "meta": meta,
            },
        }


def record_request(
    app: App, machine: Machine, method: str, path: str, status: int, at: float
) -> None:
    """A request the proxy handed to `machine`, as the app's access log shows it."""
    request_id = ulid()
    line = LogLine(
        at=at,
        id=request_id,
        message=f"{method} {path} {status}",
        instance=machine.id,
        region=machine.region,
        provider="app",
        http={
            "http": {
                "request": {"id": request_id, "method": method, "version": "1.1"},
                "response": {"status_code": status},
            },
            "url": {"full": path},
        },
    )
    app.request_lines.append(line)
    if len(app.request_lines) > MAX_REQUEST_LINES:
        del app.request_lines[: MAX_REQUEST_LINES // 10]


def record_proxy_error(app: App, message: str, at: float) -> None:
    app.request_lines.append(
        LogLine(at=at, id=ulid(), message=message, instance="", region="", provider="proxy",
                level="error")
    )  # fmt: skip


def _machine_lines(machine: Machine, config: SimConfig, now: float) -> list[LogLine]:
    lines: list[LogLine] = []
    image = str(machine.config.get("image", ""))
    checks = [name for name, _ in machine.check_specs()]
    port = _port(machine)

    def add(at: float, suffix: str, message: str, provider: str = "runner", **kw: Any) -> None:
        if at <= now:
            lines.append(LogLine(at, suffix, message, machine.id, machine.region, provider, **kw))

    for index, event in enumerate(machine.events):
        # Ordered as the events happened, also within one timestamp.
        at, eid = event.timestamp, f"{machine.id}.{index:06d}"
        if event.status == "created":
            add(at, eid, f"Machine created with image {image}")
        elif event.status == "starting":
            add(at, eid, f"Pulling container image {image}")
            add(at, f"{eid}.1", "Starting init (commit: flysim)...")
        elif event.status == "started":
            add(at, eid, f"Listening on http://[::]:{port}", "app")
            # Checks change state while the machine runs: not after its next event.
            ends = machine.events[index + 1].timestamp if index + 1 < len(machine.events) else now
            unhealthy = image in config.unhealthy_images
            check_at = at + (1.0 if unhealthy else config.timing.healthy_after)
            if not checks or check_at > ends:
                continue
            if unhealthy:
                for name in checks:
                    add(check_at, f"{eid}.2.{name}",
                        f"Health check '{name}' on port {port} has failed: 500 Internal "
                        "Server Error", level="error")  # fmt: skip
            else:
                for name in checks:
                    add(check_at, f"{eid}.2.{name}",
                        f"Health check '{name}' on port {port} is now passing.")  # fmt: skip
        elif event.status == "stopping":
            add(at, eid, "Sending signal SIGINT to main child process")
        elif event.status == "stopped":
            add(at, eid, "Main child exited normally with code: 0")
        elif event.status == "suspended":
            add(at, eid, "Machine suspended")
        elif event.status == "destroyed":
            add(at, eid, "Machine destroyed")
        elif event.status in {"updating", "replacing"}:
            add(at, eid, f"Machine updating to image {image}")
    return lines


def _port(machine: Machine) -> int:
    for service in machine.services():
        port = service.get("internal_port")
        if isinstance(port, int):
            return port
    return 8080


def app_lines(app: App, config: SimConfig, now: float) -> list[LogLine]:
    """Every line of the app up to `now`, oldest first."""
    lines = [line for m in app.machines.values() for line in _machine_lines(m, config, now)]
    lines.extend(line for line in app.request_lines if line.at <= now)
    return sorted(lines, key=lambda line: line.key)


def _rfc3339(ts: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))
    return f"{whole}.{int(ts * 1000) % 1000:03d}Z"


class _LogsApi:
    def __init__(self, sim: SimContext) -> None:
        self.sim = sim

    async def logs(self, request: Request) -> Response:
        app = path_app(self.sim.world, request)  # applies the transitions that are due
        query = request.query_params
        token = query.get("next_token") or ""
        if token and "-" not in token:
            raise ApiError(400, f"invalid next_token {token[:40]!r}")
        instance, region = query.get("instance") or None, query.get("region") or None
        lines = [
            line
            for line in app_lines(app, self.sim.config, time.time())
            if line.key > token
            and (instance is None or line.instance == instance)
            and (region is None or line.region == region)
        ]
        page = lines[:PAGE_SIZE]
        next_token = page[-1].key if page else token
        return JSONResponse(
            {"data": [line.to_json() for line in page], "meta": {"next_token": next_token}}
        )


def logs_routes(sim: SimContext) -> list[Route]:
    api = _LogsApi(sim)
    return [Route("/api/v1/apps/{app_name}/logs", api.logs, methods=["GET"])]
