"""An app whose fly.toml has `[mounts]`: the first deploy creates a volume per machine in
the machine's region and mounts it; later deploys and rollbacks keep those volumes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from harness import ACTIVITY_TIMINGS, held_leases, rollout_input
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.restore import ReleaseActivities, RestoreInput, SnapshotInput
from activities.rollout import RolloutActivities, RolloutInput, RolloutResult
from core.flytoml import render_fly_toml
from flyapi import FlyClient, Machine

FAILING = ACTIVITY_TIMINGS.model_copy(update={"machine_wait_timeout": timedelta(milliseconds=300)})
MOUNTS = '[mounts]\nsource = "data"\ndestination = "/data"\ninitial_size = "3gb"\n'


@pytest.fixture
def unhealthy(flysim: Any) -> Iterator[set[str]]:
    """Images added here fail their health checks in the emulator."""
    added: set[str] = set()
    yield added
    flysim.config.unhealthy_images.difference_update(added)


def _fly_toml(app: str) -> str:
    return render_fly_toml(app_name=app, region="iad", env={}, existing=MOUNTS)


async def _release(
    env: ActivityEnvironment, rollout: RolloutActivities, request: RolloutInput
) -> RolloutResult:
    return await env.run(rollout.roll_out, request)


def _volume_of(machine: Machine) -> str:
    (mount,) = machine.config["mounts"]
    assert mount["path"] == "/data" and mount["name"] == "data"
    return str(mount["volume"])


async def _volumes_by_machine(fly: FlyClient, app: str) -> dict[str, str]:
    return {m.id: _volume_of(m) for m in await fly.list_machines(app)}


async def test_mounts_get_volumes_that_deploys_and_rollbacks_keep(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    unhealthy: set[str],
    app: str,
    image: str,
) -> None:
    releases = ReleaseActivities(fly)
    fly_toml = _fly_toml(app)

    # First deploy: one new volume per machine, in the machine's region, as fly.toml sizes it.
    first = await _release(
        env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2, fly_toml=fly_toml)
    )
    attached = await _volumes_by_machine(fly, app)
    assert set(attached) == set(first.machine_ids) and len(set(attached.values())) == 2
    volumes = {v.id: v for v in await fly.list_volumes(app)}
    assert set(volumes) == set(attached.values())
    for machine_id, volume_id in attached.items():
        volume = volumes[volume_id]
        assert (volume.name, volume.region, volume.size_gb) == ("data", "iad", 3)
        assert volume.attached_machine_id == machine_id

    # A redeploy updates the machines in place, each keeping its volume.
    await _release(
        env, rollout, rollout_input(app, f"{image}:v2", "d-2", machine_count=2, fly_toml=fly_toml)
    )
    assert await _volumes_by_machine(fly, app) == attached
    assert {v.id for v in await fly.list_volumes(app)} == set(attached.values())

    # A failed release, then the rollback to v2: same machines, same volumes, none new.
    snapshot = await env.run(releases.snapshot, SnapshotInput(app_name=app))
    bad = f"{image}:broken"
    unhealthy.add(bad)
    flysim.config.unhealthy_images.add(bad)
    with pytest.raises(ApplicationError) as caught:
        await _release(
            env,
            rollout,
            rollout_input(app, bad, "d-3", machine_count=2, fly_toml=fly_toml, timings=FAILING),
        )
    assert caught.value.type == "MachineUnhealthy"
    restore = RestoreInput(
        app_name=app,
        deployment_id="d-3",
        snapshot=snapshot,
        reason="test",
        timings=ACTIVITY_TIMINGS,
    )
    await env.run(releases.restore, restore)
    machines = await fly.list_machines(app)
    assert {m.image for m in machines} == {f"{image}:v2"}
    assert await _volumes_by_machine(fly, app) == attached
    assert {v.id for v in await fly.list_volumes(app)} == set(attached.values())
    assert held_leases(flysim, app) == []


async def test_a_retried_first_deploy_mounts_the_volume_it_already_created(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    app: str,
    image: str,
) -> None:
    # A volume left free by an attempt whose machine create failed is used, not doubled.
    leftover = await fly.create_volume(app, "data", "iad", 3)
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", fly_toml=_fly_toml(app)))
    assert list((await _volumes_by_machine(fly, app)).values()) == [leftover.id]
    assert [v.id for v in await fly.list_volumes(app)] == [leftover.id]


@pytest.mark.parametrize("strategy", ["rolling", "immediate", "canary"])
async def test_mounts_added_to_an_app_whose_machines_have_no_volume_are_refused_untouched(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
    strategy: str,
) -> None:
    plain = render_fly_toml(app_name=app, region="iad", env={}, existing=None)
    await _release(
        env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2, fly_toml=plain)
    )
    before = {m.id: m.version for m in await fly.list_machines(app)}

    with pytest.raises(ApplicationError) as caught:
        await _release(
            env,
            rollout,
            rollout_input(
                app, f"{image}:v2", "d-2", machine_count=2, fly_toml=_fly_toml(app),
                strategy=strategy,
            ),
        )  # fmt: skip
    assert caught.value.type == "MountsNeedNewMachines" and caught.value.non_retryable
    assert all(machine_id in caught.value.message for machine_id in before)
    # Refused before anything changed: no machine updated or created, no canary, no volume.
    assert {m.id: m.version for m in await fly.list_machines(app)} == before
    assert await fly.list_volumes(app) == []
    assert held_leases(flysim, app) == []

    # What the message says to do works: without the old machines, new ones get volumes.
    for machine_id in before:
        await fly.delete_machine(app, machine_id, force=True)
    await _release(
        env,
        rollout,
        rollout_input(app, f"{image}:v2", "d-3", machine_count=2, fly_toml=_fly_toml(app)),
    )
    attached = await _volumes_by_machine(fly, app)
    assert len(set(attached.values())) == 2 and not set(attached) & set(before)
