"""`FlySim`: the emulator's state, its ASGI app, and the ways to serve it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from flysim._http import ApiError, error_response
from flysim.api import api_routes
from flysim.config import SimConfig
from flysim.logs import logs_routes
from flysim.proxy import proxy_routes
from flysim.secrets import SecretVault, machine_runtime_env, secret_routes
from flysim.state import World, ulid
from flysim.stats import LogEntry, SimStats
from flysim.tokens import APP_SCOPE, DeployTokens, TokenRefused, deploy_token_routes, refusal

if TYPE_CHECKING:
    from flysim.spec import SpecChecker

_LOG_LIMIT = 100_000
# The OpenAPI document every /v1 exchange is checked against, when set (`SpecChecker`).
SPEC_ENV = "FLYSIM_VALIDATE_SPEC"


class ConnectionDropped(ConnectionError):
    """Raised instead of answering when the server cannot cut the connection itself."""


class _SimApp(Starlette):
    """Starlette plus the API gate: latency, faults, rate limit, auth, counting."""

    def __init__(self, sim: FlySim) -> None:
        self._sim = sim
        self.api_routes = [
            *api_routes(sim),
            *secret_routes(sim),
            *logs_routes(sim),
            *deploy_token_routes(sim),
        ]
        routes: list[Route] = [
            *self.api_routes,
            *proxy_routes(sim),
            Route("/_sim/state", sim._control_state, methods=["GET"]),
            Route("/_sim/config", sim._control_config, methods=["POST"]),
            Route("/_sim/reset", sim._control_reset, methods=["POST"]),
        ]
        handlers = {ApiError: _api_error, 404: _http_error, 405: _http_error}
        super().__init__(routes=routes, exception_handlers=handlers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request_id = f"{ulid()}-iad"

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"fly-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        path: str = scope["path"]
        # The Machines API, and the web API's log endpoint beside it (not in the spec).
        if path == "/v1" or path.startswith(("/v1/", "/api/v1/")):
            routed = super().__call__
            checker = self._sim.spec_checker

            async def gated(scope: Scope, receive: Receive, checked_send: Send) -> None:
                await self._sim._gate(scope, receive, send, checked_send, routed)

            if checker is None or path.startswith("/api/"):
                await gated(scope, receive, send_with_id)
            else:
                await checker.serve(scope, receive, send_with_id, gated)
        else:
            await super().__call__(scope, receive, send_with_id)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = {"error": f"{exc.detail}: {request.method} {request.url.path}", "status": "unknown"}
    return JSONResponse(body, status_code=exc.status_code)


class FlySim:
    """A local Fly Machines API: `/v1` (the API), `/_apps/{app}` (public URLs), `/_sim`."""

    def __init__(
        self, config: SimConfig | None = None, *, spec_check: str | Path | None = None
    ) -> None:
        """`spec_check`: an OpenAPI document to check every /v1 exchange against
        (default: `$FLYSIM_VALIDATE_SPEC`, if set); see `spec_checker`."""
        self._config = config or SimConfig()
        spec = spec_check if spec_check is not None else os.environ.get(SPEC_ENV) or None
        self.spec_checker: SpecChecker | None = None
        if spec:
            from flysim.spec import SpecChecker

            self.spec_checker = SpecChecker(spec)
        self.world = World(self._config)
        self.secrets = SecretVault()
        # App-scoped deploy tokens it mints (`POST /v1/apps/{app}/deploy_token`).
        self.deploy_tokens = DeployTokens()
        self.stats = SimStats()
        self.request_log: list[LogEntry] = []
        self._rng = random.Random()
        self._rng_key: tuple[int, int | None] | None = None
        self._bucket = (0.0, 0.0)  # (tokens, last refill)
        self._server: uvicorn.Server | None = None
        self._serve_task: asyncio.Task[None] | None = None
        self._host = "127.0.0.1"
        self._port: int | None = None
        self.app: Starlette = _SimApp(self)

    def __repr__(self) -> str:
        return f"FlySim(apps={len(self.world.apps)}, port={self._port})"

    # ------------------------------------------------------------ configuration

    @property
    def config(self) -> SimConfig:
        return self._config

    @config.setter
    def config(self, value: SimConfig) -> None:
        self._config = value
        self.world.config = value

    def reset(self) -> None:
        """Forget all apps, machines, leases and counters; faults go back to none."""
        self.world.apps = {}
        self.secrets = SecretVault()
        self.stats = SimStats()
        self.request_log = []
        self._config.faults = type(self._config.faults)()
        self._bucket = (0.0, 0.0)

    # ------------------------------------------------------------------ serving

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the emulator is not serving: use serve_in_thread() or start()")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}/v1"

    @property
    def app_url_template(self) -> str:
        return f"http://{self._host}:{self.port}/_apps/{{app}}"

    def app_url(self, app_name: str) -> str:
        return self.app_url_template.replace("{app}", app_name)

    def _uvicorn(self, host: str, port: int) -> uvicorn.Server:
        config = uvicorn.Config(
            self.app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        return uvicorn.Server(config)

    def _bound(self, server: uvicorn.Server, host: str) -> None:
        self._host = host
        self._port = int(server.servers[0].sockets[0].getsockname()[1])

    @contextlib.contextmanager
    def serve_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[FlySim]:
        """Serve from a daemon thread with its own event loop; yields once listening."""
        server = self._uvicorn(host, port)
        thread = threading.Thread(
            target=lambda: asyncio.run(server.serve()), name="flysim", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError(f"flysim could not listen on {host}:{port}")
            time.sleep(0.01)
        self._bound(server, host)
        try:
            yield self
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            self._port = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve from the caller's event loop until `stop()`."""
        if self._serve_task is not None:
            raise RuntimeError("the emulator is already serving")
        server = self._uvicorn(host, port)
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                raise RuntimeError(f"flysim could not listen on {host}:{port}")
            await asyncio.sleep(0.01)
        self._server, self._serve_task = server, task
        self._bound(server, host)

    async def wait_closed(self) -> None:
        """Return once the server started by `start()` has shut down (e.g. on SIGINT)."""
        task = self._serve_task
        if task is not None:
            await task
            self._server = self._serve_task = None
            self._port = None

    async def stop(self) -> None:
        server, task = self._server, self._serve_task
        self._server = self._serve_task = None
        self._port = None
        if server is not None and task is not None:
            server.should_exit = True
            await task

    # --------------------------------------------------------------- API gate

    def _random(self) -> random.Random:
        # A new Faults object or a new seed restarts the sequence, so a test can replay it.
        faults = self._config.faults
        key = (id(faults), faults.seed)
        if key != self._rng_key:
            self._rng, self._rng_key = random.Random(faults.seed), key
        return self._rng

    def _route_template(self, scope: Scope) -> str:
        for route in self.app.api_routes:  # type: ignore[attr-defined]
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(route.path)
        return str(scope["path"])

    def _take_token(self, now: float) -> bool:
        rps = self._config.rate_limit_rps
        if rps is None:
            return True
        capacity = max(1.0, rps)
        tokens, last = self._bucket
        tokens = capacity if last == 0.0 else min(capacity, tokens + (now - last) * rps)
        if tokens < 1.0:
            self._bucket = (tokens, now)
            return False
        self._bucket = (tokens - 1.0, now)
        return True

    def _org_for(self, authorization: str) -> str | None:
        tokens = self._config.tokens
        value = authorization.strip()
        if value in tokens:
            return tokens[value]
        scheme, _, rest = value.partition(" ")
        if scheme.lower() in {"bearer", "flyv1"}:
            return tokens.get(rest.strip())
        return None

    async def _gate(
        self, scope: Scope, receive: Receive, raw_send: Send, send: Send, inner: Any
    ) -> None:
        now = time.time()
        stats = self.stats
        stats.arrival(now)
        method: str = scope["method"]
        path: str = scope["path"]
        stats.by_route[(method, self._route_template(scope))] += 1
        logged = False

        def log(status: int) -> None:
            nonlocal logged
            logged = True
            stats.by_status[status] += 1
            self.request_log.append((now, method, path, status))
            if len(self.request_log) > _LOG_LIMIT:
                del self.request_log[: _LOG_LIMIT // 2]

        async def counting_send(message: Message) -> None:
            # Counted before the response leaves, so a client that has its answer
            # always finds the request in the log and the counters.
            if message["type"] == "http.response.start" and not logged:
                log(int(message["status"]))
            await send(message)

        try:
            await self._gate_inner(scope, receive, raw_send, counting_send, inner)
        finally:
            if not logged:
                log(0)  # dropped connection or a handler that never answered

    async def _gate_inner(
        self, scope: Scope, receive: Receive, raw_send: Send, send: Send, inner: Any
    ) -> None:
        config = self._config
        faults = config.faults
        if config.timing.api_latency:
            await asyncio.sleep(config.timing.api_latency)
        rng = self._random()
        # Always draw the same numbers so a seed gives the same fault sequence whatever
        # the rates are.
        r_spike, r_drop, r_error, r_limit, r_code = (rng.random() for _ in range(5))
        if r_spike < faults.latency_spike_rate and faults.latency_spike:
            self.stats.faults_injected["latency_spike"] += 1
            await asyncio.sleep(faults.latency_spike)
        if r_drop < faults.drop_rate:
            self.stats.faults_injected["drop"] += 1
            _drop_connection(raw_send)
            return
        if r_error < faults.error_rate and faults.error_codes:
            code = faults.error_codes[int(r_code * len(faults.error_codes))]
            self.stats.faults_injected[f"error_{code}"] += 1
            body = {"error": f"injected server error {code}", "status": "unknown"}
            await JSONResponse(body, status_code=code)(scope, receive, send)
            return
        if r_limit < faults.rate_limit_rate or not self._take_token(time.time()):
            if r_limit < faults.rate_limit_rate:
                self.stats.faults_injected["rate_limit"] += 1
            self.stats.rate_limited += 1
            retry = str(faults.retry_after)
            body = {"error": "rate limit exceeded, slow down", "status": "unknown"}
            response = JSONResponse(body, status_code=429, headers={"retry-after": retry})
            await response(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        org = self._org_for(authorization)
        if org is None:
            # Not an organisation token: a deploy token, for its own app only.
            try:
                grant = self.deploy_tokens.grant(authorization)
                if grant is not None:
                    app_ids = {name: app.id for name, app in self.world.apps.items()}
                    self.deploy_tokens.authorize(grant, scope["path"], app_ids)
            except TokenRefused as exc:
                await refusal(exc)(scope, receive, send)
                return
            if grant is not None:
                org = grant.org
                scope[APP_SCOPE] = grant.app
        if org is None:
            body = {"error": "You must be authenticated to view this.", "status": "unknown"}
            await JSONResponse(body, status_code=401)(scope, receive, send)
            return
        scope["flysim.org"] = org
        await inner(scope, receive, send)

    # ------------------------------------------------------------ control API

    def snapshot(self, app_name: str | None = None) -> dict[str, Any]:
        """Apps, machines, leases, counters and configuration (without tokens) as JSON;
        with `app_name`, the apps, machines and leases of that app only."""
        now = time.time()
        apps, machines, leases = [], [], []
        for app in list(self.world.apps.values()):
            if app_name is not None and app.name != app_name:
                continue
            self.world.advance(app, now)
            apps.append(
                {**app.to_json(), "ips": [ip.to_json() for ip in app.ips], "org": app.org,
                 "volumes": [v.to_json(app) for v in app.volumes.values()]}
            )  # fmt: skip
            for machine in app.machines.values():
                machines.append(
                    {**machine.to_json(self._config, now), "app": app.name,
                     "cordoned": machine.cordoned}
                )  # fmt: skip
                lease = machine.active_lease(now)
                if lease is not None:
                    leases.append({"app": app.name, "machine_id": machine.id, **lease.to_json()})
        return {
            "apps": apps,
            "machines": machines,
            "leases": leases,
            "secrets": self.secrets.to_json(list(self.world.apps.values())),
            "counters": self.stats.to_json(),
            "config": self._config.public_dict(),
            "spec_check": self.spec_checker.summary() if self.spec_checker else None,
        }

    def machine_runtime_env(self, app_name: str, machine_id: str) -> dict[str, str]:
        """The machine's process environment: `config.env` plus the app's secrets as of
        its last boot. For tests only; the API never shows a secret value."""
        return machine_runtime_env(self, app_name, machine_id)

    async def _control_state(self, request: Request) -> Response:
        return JSONResponse(self.snapshot(request.query_params.get("app")))

    async def _control_config(self, request: Request) -> Response:
        try:
            patch = await request.json()
            if not isinstance(patch, dict):
                raise ValueError("the body must be a JSON object")
            self._config.apply(patch)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(self._config.public_dict())

    async def _control_reset(self, request: Request) -> Response:
        self.reset()
        return JSONResponse({"ok": True})


def _drop_connection(send: Send) -> None:
    """Close the client connection without an answer.

    uvicorn hands the app a bound method of its request cycle, which owns the transport;
    any other server gets an exception instead, which it turns into a broken response.
    """
    cycle = getattr(send, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if cycle is None or transport is None or not hasattr(cycle, "disconnected"):
        raise ConnectionDropped("connection dropped by fault injection")
    cycle.disconnected = True
    transport.abort()
