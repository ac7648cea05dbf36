"""The `/v1/apps/{app}/volumes` routes: create, list, show and destroy volumes."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flysim._http import ApiError, Handler, SimContext, json_body, path_app
from flysim.state import GONE_STATES, App, iso
from flysim.validation import REGION_RE


@dataclass
class Volume:
    id: str
    name: str
    region: str
    size_gb: int
    created_at: float
    state: str = "created"

    def to_json(self, app: App) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "size_gb": self.size_gb,
            "zone": f"{self.region}1",
            "encrypted": True,
            "fstype": "ext4",
            "created_at": iso(self.created_at),
            "host_status": "ok",
            "attached_machine_id": attached_machine(app, self.id),
        }


def attached_machine(app: App, volume_id: str) -> str | None:
    """The live machine that mounts the volume, if any."""
    for machine in app.machines.values():
        if machine.state in GONE_STATES:
            continue
        for mount in machine.config.get("mounts") or []:
            if isinstance(mount, dict) and mount.get("volume") == volume_id:
                return machine.id
    return None


class _VolumesApi:
    def __init__(self, sim: SimContext) -> None:
        self.sim = sim

    def _app(self, request: Request) -> App:
        return path_app(self.sim.world, request)

    def _volume(self, request: Request) -> tuple[App, Volume]:
        app = self._app(request)
        volume_id = request.path_params["volume_id"]
        volume = app.volumes.get(volume_id)
        if volume is None:
            raise ApiError(404, f"volume not found: {volume_id}")
        return app, volume

    async def list(self, request: Request) -> Response:
        app = self._app(request)
        return JSONResponse([v.to_json(app) for v in app.volumes.values()])

    async def create(self, request: Request) -> Response:
        app = self._app(request)
        body = await json_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "name is required")
        region = body.get("region")
        if not isinstance(region, str) or not REGION_RE.match(region):
            raise ApiError(400, f"invalid region {region!r}")
        size = body.get("size_gb", 1)
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 500:
            raise ApiError(400, "size_gb must be a whole number of GB between 1 and 500")
        volume = Volume(
            id=f"vol_{secrets.token_hex(8)}",
            name=name,
            region=region,
            size_gb=size,
            created_at=time.time(),
        )
        app.volumes[volume.id] = volume
        return JSONResponse(volume.to_json(app))

    async def show(self, request: Request) -> Response:
        app, volume = self._volume(request)
        return JSONResponse(volume.to_json(app))

    async def delete(self, request: Request) -> Response:
        app, volume = self._volume(request)
        machine = attached_machine(app, volume.id)
        if machine is not None:
            raise ApiError(412, f"volume {volume.id} is attached to machine {machine}")
        del app.volumes[volume.id]
        volume.state = "destroyed"
        return JSONResponse(volume.to_json(app))


def volume_routes(sim: SimContext) -> list[Route]:
    api = _VolumesApi(sim)
    base = "/v1/apps/{app_name}/volumes"
    table: list[tuple[str, Handler, list[str]]] = [
        (base, api.list, ["GET"]),
        (base, api.create, ["POST"]),
        (f"{base}/{{volume_id}}", api.show, ["GET"]),
        (f"{base}/{{volume_id}}", api.delete, ["DELETE"]),
    ]
    return [Route(path, handler, methods=methods) for path, handler, methods in table]
