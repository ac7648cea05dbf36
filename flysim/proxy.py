"""The public side of each app (`/_apps/{app}/...`), acting as the Fly proxy.

It routes to a started, healthy machine that is registered with the proxy (not cordoned,
has services). When none runs and a service allows autostart, it starts one and holds the
request until the machine is up and healthy, as the real proxy does for scale-to-zero apps.
"""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flysim._http import SimContext
from flysim.logs import record_proxy_error, record_request
from flysim.state import App, Machine

_POLL_CAP = 0.5
_WAKEABLE = frozenset({"stopped", "suspended", "created"})


def _routable(app: App) -> list[Machine]:
    return [m for m in app.live_machines() if not m.cordoned and m.services()]


def _autostart(machine: Machine) -> bool:
    return any(s.get("autostart") is True for s in machine.services())


class _Proxy:
    def __init__(self, sim: SimContext) -> None:
        self.sim = sim

    async def handle(self, request: Request) -> Response:
        self.sim.stats.proxy_requests += 1
        name = request.path_params["app"]
        path = "/" + request.path_params.get("path", "")
        deadline = time.time() + self.sim.config.timing.proxy_wait_limit
        while True:
            app = self.sim.world.apps.get(name)
            if app is None:
                return JSONResponse({"error": f"app {name} not found"}, status_code=404)
            now = time.time()
            self.sim.world.advance(app, now)
            machines = _routable(app)
            config = self.sim.config
            healthy = [m for m in machines if m.state == "started" and m.healthy(config, now)]
            if healthy:
                machine = min(healthy, key=lambda m: m.last_request_at)
                machine.last_request_at = now
                record_request(app, machine, request.method, path, 200, now)
                return self._serve(app, machine, path)
            wake = self._next_ready(machines)
            if wake is None and not any(m.state == "started" for m in machines):
                sleeper = next(
                    (m for m in machines if m.state in _WAKEABLE and _autostart(m)), None
                )
                if sleeper is not None:
                    self.sim.stats.proxy_wakeups += 1
                    sleeper.set_state("starting", now, "start", "flyproxy")
                    sleeper.schedule(now, [(config.timing.start_delay, "started", "start")])
                    continue
            if wake is None:
                reason = (
                    "no healthy machines" if machines else "no machines registered with the proxy"
                )
                record_proxy_error(app, f"could not find a good candidate: {reason}", now)
                return JSONResponse({"error": f"{name}: {reason}"}, status_code=503)
            if now >= deadline:
                return JSONResponse({"error": f"{name}: timed out waiting for a machine"}, 503)
            pending = [m.changed for m in machines]
            sleep_for = max(0.0, min(wake, deadline, now + _POLL_CAP) - now)
            waiters = [asyncio.ensure_future(e.wait()) for e in pending]
            try:
                await asyncio.wait(waiters, timeout=sleep_for, return_when="FIRST_COMPLETED")
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def _next_ready(self, machines: list[Machine]) -> float | None:
        """The earliest time a machine that is up or coming up will pass its checks."""
        config = self.sim.config
        times: list[float] = []
        for machine in machines:
            if machine.state == "started":
                ready = machine.healthy_at(config)
            elif machine.pending and machine.pending[-1][1] == "started":
                image = str(machine.config.get("image"))
                ready = (
                    None
                    if image in config.unhealthy_images
                    else machine.pending[-1][0]
                    + (config.timing.healthy_after if machine.check_specs() else 0.0)
                )
            else:
                ready = None
            if ready is not None:
                times.append(ready)
        return min(times) if times else None

    def _serve(self, app: App, machine: Machine, path: str) -> Response:
        headers = {"fly-machine-id": machine.id}
        if path.rstrip("/") == "/api/health":
            body = {
                "status": "ok",
                "app": app.name,
                "image": machine.config.get("image"),
                "instance_id": machine.instance_id,
            }
        else:
            body = {"app": app.name, "path": path, "machine_id": machine.id}
        return JSONResponse(body, headers=headers)


def proxy_routes(sim: SimContext) -> list[Route]:
    proxy = _Proxy(sim)
    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return [
        Route("/_apps/{app}", proxy.handle, methods=methods),
        Route("/_apps/{app}/{path:path}", proxy.handle, methods=methods),
    ]
