"""Volumes: the client's methods against the emulator, every exchange checked against the
2026 spec, and the rules the emulator enforces (attached volumes, regions)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from conftest import reference_file

from flyapi import FlyClient, FlyNotFound, FlyUnprocessable, Volume
from flyapi._errors import FlyAPIError
from flysim.spec import validate_exchange

IMAGE = "registry.fly.io/volumes-test:v1"
VOLUME_OPERATIONS = {
    "Volumes_create",
    "Volumes_list",
    "Volumes_get_by_id",
    "Volume_delete",
    "Volumes_extend",
}


class Recorder(httpx.AsyncBaseTransport):
    """Keeps every request with its response, read in full."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.exchanges: list[tuple[httpx.Request, httpx.Response]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        await response.aread()
        self.exchanges.append((request, response))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.fixture(scope="module")
def spec_2026() -> Path:
    return reference_file("fly-machines-openapi-2026.yml")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest_asyncio.fixture
async def fly(
    flysim: Any, fly_token: str, recorder: Recorder, spec_2026: Path
) -> AsyncIterator[FlyClient]:
    async with FlyClient(flysim.base_url, fly_token, transport=recorder) as client:
        yield client
    # Every volume exchange, request and response, as the 2026 spec gives it.
    checked = {
        validate_exchange(spec_2026, request, response)
        for request, response in recorder.exchanges
        if "/volumes" in request.url.path
    }
    assert checked <= VOLUME_OPERATIONS | {None}


@pytest_asyncio.fixture
async def app(fly: FlyClient) -> str:
    name = f"turbobackend-v{uuid.uuid4().hex[:12]}"
    await fly.create_app(name, "personal")
    return name


def _config(volume: Volume | None = None, path: str = "/data") -> dict[str, Any]:
    config: dict[str, Any] = {"image": IMAGE}
    if volume is not None:
        config["mounts"] = [{"volume": volume.id, "path": path, "name": volume.name}]
    return config


async def test_create_list_get_extend_delete(
    fly: FlyClient, app: str, recorder: Recorder, spec_2026: Path
) -> None:
    created = await fly.create_volume(app, "data", "ams", 3, snapshot_retention=7)
    assert created.id.startswith("vol_")
    assert (created.name, created.region, created.size_gb) == ("data", "ams", 3)
    assert created.snapshot_retention == 7 and created.encrypted is True
    assert created.state == "created" and not created.attached

    other = await fly.create_volume(app, "data", "ams", 1)  # names are not unique
    assert [v.id for v in await fly.list_volumes(app)] == [created.id, other.id]
    assert (await fly.get_volume(app, created.id)).size_gb == 3

    extended, needs_restart = await fly.extend_volume(app, created.id, 10)
    assert extended.size_gb == 10 and needs_restart is False
    assert (await fly.get_volume(app, created.id)).size_gb == 10

    deleted = await fly.delete_volume(app, created.id)
    assert deleted is not None and deleted.id == created.id
    assert [v.id for v in await fly.list_volumes(app)] == [other.id]
    # Already gone: the classified not-found error, for the caller to judge.
    with pytest.raises(FlyNotFound):
        await fly.delete_volume(app, created.id)
    with pytest.raises(FlyNotFound):
        await fly.get_volume(app, created.id)

    ops = {validate_exchange(spec_2026, q, r) for q, r in recorder.exchanges}
    assert ops >= VOLUME_OPERATIONS
    create = next(
        q for q, _ in recorder.exchanges if q.method == "POST" and "volumes" in str(q.url)
    )
    assert json.loads(create.content) == {
        "name": "data",
        "region": "ams",
        "size_gb": 3,
        "snapshot_retention": 7,
    }
    extend = next(q for q, _ in recorder.exchanges if q.url.path.endswith("/extend"))
    assert extend.method == "PUT" and json.loads(extend.content) == {"size_gb": 10}


async def test_invalid_requests_are_refused_clearly(fly: FlyClient, app: str) -> None:
    with pytest.raises(FlyAPIError, match="invalid volume name"):
        await fly.create_volume(app, "Data-Volume", "ams", 1)
    with pytest.raises(FlyAPIError, match="size_gb"):
        await fly.create_volume(app, "data", "ams", 0)
    volume = await fly.create_volume(app, "data", "ams", 5)
    with pytest.raises(FlyAPIError, match="larger than the current size"):
        await fly.extend_volume(app, volume.id, 5)
    with pytest.raises(FlyNotFound):
        await fly.list_volumes(f"turbobackend-missing{uuid.uuid4().hex[:6]}")
    assert await fly.list_volumes(app) != []


async def test_an_attached_volume_cannot_be_deleted_until_its_machine_is_destroyed(
    fly: FlyClient, app: str
) -> None:
    volume = await fly.create_volume(app, "data", "ams", 1)
    machine = await fly.create_machine(app, _config(volume), "ams")
    assert machine.config["mounts"][0]["volume"] == volume.id
    attached = await fly.get_volume(app, volume.id)
    assert attached.attached_machine_id == machine.id

    with pytest.raises(FlyAPIError, match="attached to machine") as refused:
        await fly.delete_volume(app, volume.id)
    assert refused.value.status_code == 412
    # Also while the machine is stopped: only a destroyed machine lets go of it.
    await fly.stop_machine(app, machine.id)
    await fly.wait_machine(app, machine.id, "stopped", instance_id=machine.instance_id, timeout=10)
    with pytest.raises(FlyAPIError, match="attached to machine"):
        await fly.delete_volume(app, volume.id)

    await fly.delete_machine(app, machine.id, force=True)
    await fly.wait_machine(app, machine.id, "destroyed", timeout=10)
    assert not (await fly.get_volume(app, volume.id)).attached
    await fly.delete_volume(app, volume.id)
    assert await fly.list_volumes(app) == []


async def test_a_mount_needs_an_existing_free_volume_in_the_machines_region(
    fly: FlyClient, app: str
) -> None:
    volume = await fly.create_volume(app, "data", "ams", 1)
    with pytest.raises(FlyUnprocessable, match="region ams, the machine in fra"):
        await fly.create_machine(app, _config(volume), "fra")
    missing = _config()
    missing["mounts"] = [{"volume": "vol_doesnotexist0000", "path": "/data"}]
    with pytest.raises(FlyUnprocessable, match="not found"):
        await fly.create_machine(app, missing, "ams")
    unnamed = _config()
    unnamed["mounts"] = [{"name": "data", "path": "/data"}]
    with pytest.raises(FlyUnprocessable, match="volume is required"):
        await fly.create_machine(app, unnamed, "ams")

    first = await fly.create_machine(app, _config(volume), "ams")
    with pytest.raises(FlyUnprocessable, match="already attached"):
        await fly.create_machine(app, _config(volume), "ams")
    # The machine holding it may keep it through an update.
    await fly.wait_machine(app, first.id, "started", instance_id=first.instance_id, timeout=10)
    updated = await fly.update_machine(app, first.id, _config(volume), "ams", nonce=None)
    assert updated.config["mounts"][0]["volume"] == volume.id


async def test_fly_go_create_body_with_nulls_is_accepted(
    flysim: Any, fly_token: str, app: str
) -> None:
    # fly-go's CreateVolumeRequest has no omitempty: unset fields arrive as null.
    body = {
        "name": "pg_data",
        "region": "ams",
        "size_gb": 2,
        "encrypted": None,
        "require_unique_zone": None,
        "unique_zone_app_wide": None,
        "snapshot_retention": None,
        "auto_backup_enabled": None,
        "fstype": None,
        "snapshot_id": None,
        "source_volume_id": None,
        "compute": None,
    }
    headers = {"Authorization": f"Bearer {fly_token}"}
    async with httpx.AsyncClient(base_url=flysim.base_url, headers=headers) as api:
        created = await api.post(f"/apps/{app}/volumes", json=body)
        assert created.status_code == 200, created.text
        volume = created.json()
        # What fly-go's fly.Volume reads: created_at as RFC 3339, ids as strings.
        assert volume["created_at"].endswith("Z") and volume["fstype"] == "ext4"
        assert "attached_machine_id" not in volume
        deleted = await api.delete(f"/apps/{app}/volumes/{volume['id']}")
        assert deleted.status_code == 200 and deleted.json()["state"] == "destroyed"


async def test_a_restarted_emulator_keeps_volumes_and_their_mounts(
    fly: FlyClient, app: str, flysim: Any
) -> None:
    from flysim import FlySim, SimConfig
    from flysim.persist import dump, restore

    volume = await fly.create_volume(app, "data", "ams", 2)
    machine = await fly.create_machine(app, _config(volume), "ams")
    saved = json.loads(json.dumps(dump(flysim)))  # what the state file holds

    restarted = FlySim(SimConfig(tokens=dict(flysim.config.tokens)))
    restore(restarted, saved)
    with restarted.serve_in_thread():
        async with FlyClient(restarted.base_url, next(iter(flysim.config.tokens))) as again:
            (kept,) = await again.list_volumes(app)
            assert (kept.id, kept.region, kept.size_gb) == (volume.id, "ams", 2)
            assert kept.attached_machine_id == machine.id
            with pytest.raises(FlyAPIError):  # still attached: the emulator still knows it
                await again.delete_volume(app, volume.id)
