"""Volumes for new machines: a `[mounts]` entry of fly.toml names a volume; a machine
created for it gets one of that name in its region, created when the app has none free
(as `fly deploy` does on a first deploy).

Updated machines keep the volume they mount (`core.flytoml.overlay_managed` carries the
id over), and a restore puts back whole configs, volume ids included: a rollback never
detaches a volume. A volume created for a machine whose create then failed stays, free,
and the next attempt mounts it instead of creating another.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from typing import Any

from temporalio import activity

from activities._machines import MachineSession
from core.flytoml import mount_specs

_DEFAULT_SIZE_GB = 1


class VolumeAttacher:
    """Gives each machine config of one rollout a volume of its own for its mount."""

    def __init__(self, session: MachineSession, fly_toml: str, process_group: str) -> None:
        self._s = session
        self._fly_toml = fly_toml
        self._group = process_group
        self._lock = asyncio.Lock()
        self._claimed: set[str] = set()

    async def attach(self, config: Mapping[str, Any], region: str) -> dict[str, Any]:
        """`config` with a volume id on each mount that lacks one."""
        out = copy.deepcopy(dict(config))
        mounts = out.get("mounts") or []
        if not any(isinstance(m, dict) and not m.get("volume") for m in mounts):
            return out
        sizes = {m.source: m.initial_size_gb for m in mount_specs(self._fly_toml, self._group)}
        # One at a time, so two machines created together never pick the same volume.
        async with self._lock:
            for mount in mounts:
                if not mount.get("volume"):
                    name = str(mount.get("name") or "")
                    mount["volume"] = await self._volume_for(name, region, sizes.get(name))
        return out

    async def _volume_for(self, name: str, region: str, size_gb: int | None) -> str:
        s, app = self._s, self._s.app
        volumes = await s.read(
            f"List the volumes of Fly app {app}", lambda: s.fly.list_volumes(app)
        )
        for volume in volumes:
            if (
                volume.name == name
                and volume.region == region
                and not volume.attached
                and volume.id not in self._claimed
            ):
                self._claimed.add(volume.id)
                return volume.id
        s.set_progress(name, "creating volume")
        created = await s.call(
            f"Create volume {name} of Fly app {app} in {region}",
            s.fly.create_volume(app, name, region, size_gb or _DEFAULT_SIZE_GB),
        )
        activity.logger.info(
            "Created volume %s (%s, %d GB) of Fly app %s in %s",
            created.id,
            name,
            created.size_gb or size_gb or _DEFAULT_SIZE_GB,
            app,
            region,
        )
        self._claimed.add(created.id)
        return created.id
