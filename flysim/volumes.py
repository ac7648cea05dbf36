"""The `/v1/apps/{app_name}/volumes` routes, and the rules machines follow to mount volumes.

As the 2026 spec gives them (create and list on the collection; get, delete and
`PUT .../extend` on one volume), and as fly-go's flaps client reads them: `null` for an
unset field of a create (fly-go sends every field), a destroyed volume answers 404, a
volume attached to a machine that is not destroyed cannot be deleted, and a machine can
only mount an existing, unattached volume of its own region.
"""

from __future__ import annotations

import re
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flysim._http import ApiError, SimContext, json_body, path_app
from flysim.state import App, Machine, Volume
from flysim.validation import REGION_RE

# Fly's rule for volume names: lowercase letters, digits and underscores, at most 30.
VOLUME_NAME_RE = re.compile(r"^[a-z0-9_]{1,30}$")
MAX_SIZE_GB = 500
_DEFAULT_SIZE_GB = 1


def check_mounts(app: App, config: dict[str, Any], region: str, machine: Machine | None) -> None:
    """Refuse (422) a config whose mounts the platform could not attach to this machine."""
    mounts = config.get("mounts")
    if mounts is None:
        return
    if not isinstance(mounts, list):
        raise ApiError(422, "config.mounts must be a list")
    if len(mounts) > 1:
        raise ApiError(422, "a machine can mount only one volume")
    for index, mount in enumerate(mounts):
        where = f"config.mounts[{index}]"
        if not isinstance(mount, dict):
            raise ApiError(422, f"{where} must be an object")
        volume_id = mount.get("volume")
        if not isinstance(volume_id, str) or not volume_id:
            raise ApiError(422, f"{where}.volume is required (the id of an existing volume)")
        path = mount.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ApiError(422, f"{where}.path must be an absolute path")
        volume = app.volumes.get(volume_id)
        if volume is None:
            raise ApiError(422, f"{where}: volume {volume_id} not found in app {app.name}")
        if volume.region != region:
            raise ApiError(
                422,
                f"{where}: volume {volume_id} is in region {volume.region}, the machine in "
                f"{region}",
            )
        holder = volume.attached_to(app)
        if holder is not None and (machine is None or holder.id != machine.id):
            raise ApiError(
                422, f"{where}: volume {volume_id} is already attached to machine {holder.id}"
            )


class _Volumes:
    def __init__(self, sim: SimContext) -> None:
        self.sim = sim

    def _volume(self, request: Request) -> tuple[App, Volume]:
        app = path_app(self.sim.world, request)
        volume_id = request.path_params["volume_id"]
        volume = app.volumes.get(volume_id)
        if volume is None:
            raise ApiError(404, f"volume not found: {volume_id}")
        return app, volume

    async def create(self, request: Request) -> Response:
        app = path_app(self.sim.world, request)
        body = await json_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not VOLUME_NAME_RE.match(name):
            raise ApiError(
                400,
                f"invalid volume name {name!r}: lowercase letters, digits and underscores, "
                "at most 30 characters",
            )
        region = body.get("region")
        if not isinstance(region, str) or not REGION_RE.match(region):
            raise ApiError(400, f"invalid region {region!r}")
        size = body.get("size_gb")
        size = _DEFAULT_SIZE_GB if size is None else size
        if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SIZE_GB:
            raise ApiError(400, f"size_gb must be an integer from 1 to {MAX_SIZE_GB}")
        volume = Volume(
            id=self.sim.world.new_volume_id(),
            name=name,
            region=region,
            size_gb=size,
            created_at=time.time(),
        )
        for key, kind in (
            ("encrypted", bool),
            ("snapshot_retention", int),
            ("auto_backup_enabled", bool),
            ("fstype", str),
        ):
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ApiError(400, f"{key} must be a {kind.__name__}")
            setattr(volume, key, value)
        if volume.fstype not in ("ext4", "raw"):
            raise ApiError(400, 'fstype must be "ext4" or "raw"')
        app.volumes[volume.id] = volume
        return JSONResponse(volume.to_json(app))

    async def list(self, request: Request) -> Response:
        app = path_app(self.sim.world, request)
        volumes = sorted(app.volumes.values(), key=lambda v: (v.created_at, v.id))
        return JSONResponse([v.to_json(app) for v in volumes])

    async def show(self, request: Request) -> Response:
        app, volume = self._volume(request)
        return JSONResponse(volume.to_json(app))

    async def delete(self, request: Request) -> Response:
        app, volume = self._volume(request)
        holder = volume.attached_to(app)
        if holder is not None:
            raise ApiError(
                412,
                f"volume {volume.id} is attached to machine {holder.id} ({holder.state}); "
                "destroy the machine first",
            )
        del app.volumes[volume.id]
        volume.state = "destroyed"
        return JSONResponse(volume.to_json(app))

    async def extend(self, request: Request) -> Response:
        app, volume = self._volume(request)
        body = await json_body(request)
        size = body.get("size_gb")
        if not isinstance(size, int) or isinstance(size, bool) or size > MAX_SIZE_GB:
            raise ApiError(400, f"size_gb must be an integer up to {MAX_SIZE_GB}")
        if size <= volume.size_gb:
            raise ApiError(
                400, f"size_gb must be larger than the current size ({volume.size_gb} GB)"
            )
        volume.size_gb = size
        # The platform grows the filesystem of a running machine online.
        return JSONResponse({"needs_restart": False, "volume": volume.to_json(app)})


def volume_routes(sim: SimContext) -> list[Route]:
    api = _Volumes(sim)
    v = "/v1/apps/{app_name}/volumes"
    return [
        Route(v, api.list, methods=["GET"]),
        Route(v, api.create, methods=["POST"]),
        Route(f"{v}/{{volume_id}}", api.show, methods=["GET"]),
        Route(f"{v}/{{volume_id}}", api.delete, methods=["DELETE"]),
        Route(f"{v}/{{volume_id}}/extend", api.extend, methods=["PUT"]),
    ]
