"""Rollout strategies, release snapshots and restores against the emulator.

Every test runs the activities as the worker does (ActivityEnvironment, a FlyClient whose
token comes from moto's SSM through the CredentialStore) against the Fly emulator, and
checks the result on the emulator's side: machines, configs, leases, the app's public URL.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from harness import ACTIVITY_TIMINGS, FLY_TOML, held_leases, rollout_input
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities._machines import CANARY_KEY, GREEN_KEY, RESTORED_BY_KEY, CheckPace
from activities.restore import ReleaseActivities, RestoreInput, SnapshotInput
from activities.rollout import RolloutActivities, RolloutInput, RolloutResult
from core.models import (
    CheckWindow,
    MachineOutcome,
    ReleaseSnapshot,
    Strategy,
)
from core.settings import Settings
from flyapi import FlyClient, Machine, RequestRetry

# A bad release is given up on quickly.
FAILING = ACTIVITY_TIMINGS.model_copy(update={"machine_wait_timeout": timedelta(milliseconds=300)})

ALL = list(Strategy.__members__.values())
ALL.remove(Strategy.FLYCTL)
WAITING = [Strategy.ROLLING, Strategy.CANARY, Strategy.BLUEGREEN]  # fail on an unhealthy one
UPDATING = [Strategy.ROLLING, Strategy.IMMEDIATE, Strategy.CANARY]  # keep the machine ids


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def releases(fly: FlyClient, settings: Settings) -> ReleaseActivities:
    return ReleaseActivities(fly)


@pytest.fixture
def unhealthy(flysim: Any) -> Iterator[set[str]]:
    """Images added here fail their health checks in the emulator."""
    added: set[str] = set()
    yield added
    flysim.config.unhealthy_images.difference_update(added)


@pytest.fixture
def sim_timing(flysim: Any) -> Iterator[Any]:
    saved = flysim.config.timing.model_dump()
    yield flysim.config.timing
    for name, value in saved.items():
        setattr(flysim.config.timing, name, value)


def _requests(flysim: Any, app: str, since: float) -> list[tuple[str, str]]:
    """(method, route) of the API requests about `app` since `since`: other apps' traffic
    is not counted, whatever else runs."""
    prefix = f"/v1/apps/{app}/"
    routes = []
    for at, method, path, _ in list(flysim.request_log):
        if at < since or not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        route = "machines" if len(parts) == 1 else "/".join(["machine", *parts[2:]]) or "machine"
        routes.append((method, route))
    return routes


async def _machines(fly: FlyClient, app: str) -> list[Machine]:
    return await fly.list_machines(app)


async def _health(flysim: Any, app: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(f"{flysim.app_url(app)}/api/health")


async def _release(
    env: ActivityEnvironment, rollout: RolloutActivities, request: RolloutInput
) -> RolloutResult:
    return await env.run(rollout.roll_out, request)


async def _snapshot(env: ActivityEnvironment, releases: ReleaseActivities, app: str) -> Any:
    return await env.run(releases.snapshot, SnapshotInput(app_name=app))


async def _restore(
    env: ActivityEnvironment,
    releases: ReleaseActivities,
    snapshot: ReleaseSnapshot,
    deployment: str,
) -> Any:
    request = RestoreInput(
        app_name=snapshot.app_name,
        deployment_id=deployment,
        snapshot=snapshot,
        reason="test",
        timings=ACTIVITY_TIMINGS,
    )
    return await env.run(releases.restore, request)


async def _assert_matches(fly: FlyClient, snapshot: ReleaseSnapshot) -> None:
    live = {m.id: m for m in await _machines(fly, snapshot.app_name)}
    assert set(live) == {m.machine_id for m in snapshot.machines}
    for wanted in snapshot.machines:
        assert live[wanted.machine_id].config == wanted.config
        assert live[wanted.machine_id].region == wanted.region


# ------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("strategy", ALL)
async def test_healthy_release_replaces_every_machine(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    v1 = await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-one", machine_count=3))
    before = {m.id: m for m in await _machines(fly, app)}

    v2 = await _release(
        env,
        rollout,
        rollout_input(app, f"{image}:v2", "d-two", machine_count=3, strategy=strategy),
    )
    after = await _machines(fly, app)

    assert len(after) == 3
    assert {m.image for m in after} == {f"{image}:v2"}
    assert {m.state for m in after} == {"started"}
    assert {m.id for m in after} == set(v2.machine_ids)
    assert not [m for m in after if m.metadata.get(CANARY_KEY)]
    if strategy is Strategy.BLUEGREEN:
        assert not set(before) & set(v2.machine_ids), "a blue machine is left"
        assert [m.action for m in v2.machines] == ["created"] * 3
        live = [m for m in flysim.snapshot()["machines"] if m["id"] in v2.machine_ids]
        assert live and not [m for m in live if m["cordoned"]]
    else:
        assert set(v2.machine_ids) == set(v1.machine_ids)
        assert [m.action for m in v2.machines] == ["updated"] * 3
        for outcome in v2.machines:
            old = before[outcome.machine_id]
            assert outcome.previous_instance_id == old.instance_id != outcome.instance_id
            assert outcome.previous_version == old.version
    assert v2.image_digest and v2.image_digest.startswith("sha256:")
    assert v2.image_digest != v1.image_digest
    assert held_leases(flysim, app) == []
    response = await _health(flysim, app)
    assert response.status_code == 200 and response.json()["image"] == f"{image}:v2"


@pytest.mark.parametrize("strategy", WAITING)
async def test_unhealthy_release_fails_and_restore_puts_the_old_one_back(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    releases: ReleaseActivities,
    fly: FlyClient,
    flysim: Any,
    unhealthy: set[str],
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-good", machine_count=3))
    snapshot = await _snapshot(env, releases, app)
    assert len(snapshot.machines) == 3 and snapshot.image == f"{image}:v1"
    bad = f"{image}:broken"
    unhealthy.add(bad)
    flysim.config.unhealthy_images.add(bad)

    request = rollout_input(app, bad, "d-bad", machine_count=3, strategy=strategy, timings=FAILING)
    with pytest.raises(ApplicationError) as caught:
        await _release(env, rollout, request)
    assert caught.value.type == "MachineUnhealthy" and caught.value.non_retryable
    assert held_leases(flysim, app) == []
    live = await _machines(fly, app)
    assert not [m for m in live if m.metadata.get(CANARY_KEY)], "the canary was left behind"
    assert not [m for m in live if m.metadata.get(GREEN_KEY)], "a green machine was left behind"
    if strategy is Strategy.ROLLING:
        assert sorted(m.image or "" for m in live) == sorted([bad, *[f"{image}:v1"] * 2])
    else:
        # The canary or the greens took the failure; the release was not touched.
        await _assert_matches(fly, snapshot)

    result = await _restore(env, releases, snapshot, "d-bad")
    await _assert_matches(fly, snapshot)
    assert len(result.restored) == (1 if strategy is Strategy.ROLLING else 0)
    assert result.destroyed == []
    assert held_leases(flysim, app) == []
    response = await _health(flysim, app)
    assert response.status_code == 200 and response.json()["image"] == f"{image}:v1"


async def test_immediate_does_not_wait_and_restore_recovers(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    releases: ReleaseActivities,
    fly: FlyClient,
    flysim: Any,
    unhealthy: set[str],
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-good", machine_count=2))
    snapshot = await _snapshot(env, releases, app)
    bad = f"{image}:broken"
    unhealthy.add(bad)
    flysim.config.unhealthy_images.add(bad)

    started = time.monotonic()
    result = await _release(
        env,
        rollout,
        rollout_input(
            app,
            bad,
            "d-bad",
            machine_count=2,
            strategy=Strategy.IMMEDIATE,
            timings=ACTIVITY_TIMINGS,
        ),
    )
    # Well below the 3 s a wait for the failing checks would take.
    assert time.monotonic() - started < 2
    assert [m.action for m in result.machines] == ["updated", "updated"]
    assert {m.image for m in await _machines(fly, app)} == {bad}
    assert (await _health(flysim, app)).status_code == 503
    assert held_leases(flysim, app) == []

    restored = await _restore(env, releases, snapshot, "d-bad")
    assert sorted(restored.restored) == sorted(m.machine_id for m in snapshot.machines)
    await _assert_matches(fly, snapshot)
    response = await _health(flysim, app)
    assert response.status_code == 200 and response.json()["image"] == f"{image}:v1"


@pytest.mark.parametrize("strategy", UPDATING)
async def test_stopped_machine_is_updated_without_being_started(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    first = await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    asleep = first.machine_ids[1]
    await fly.stop_machine(app, asleep)
    assert await fly.wait_machine(app, asleep, "stopped", timeout=5)

    await _release(
        env, rollout, rollout_input(app, f"{image}:v2", "d-2", machine_count=2, strategy=strategy)
    )
    machines = {m.id: m for m in await _machines(fly, app)}
    assert machines[asleep].image == f"{image}:v2"
    assert machines[asleep].state == "stopped"
    assert machines[first.machine_ids[0]].state == "started"
    assert held_leases(flysim, app) == []


@pytest.mark.parametrize("strategy", ALL)
async def test_unmanaged_config_fields_survive(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    app: str,
    image: str,
) -> None:
    first = await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    dns = {"nameservers": ["1.1.1.1"]}
    restart = {"policy": "always", "max_retries": 3}
    for machine_id in first.machine_ids:  # set by hand, e.g. with `fly machine update`
        machine = await fly.get_machine(app, machine_id)
        config = {**machine.config, "dns": dns, "restart": restart}
        config["metadata"] = {**config["metadata"], "team": "payments"}
        await fly.update_machine(app, machine_id, config, machine.region, nonce=None)

    await _release(
        env, rollout, rollout_input(app, f"{image}:v2", "d-2", machine_count=2, strategy=strategy)
    )
    machines = await _machines(fly, app)
    assert len(machines) == 2
    for machine in machines:
        assert machine.image == f"{image}:v2"
        assert machine.config["dns"] == dns
        assert machine.config["restart"] == restart
        assert machine.metadata["team"] == "payments"


@pytest.mark.parametrize("strategy", ALL)
async def test_failed_first_deploy_restored_to_nothing(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    releases: ReleaseActivities,
    fly: FlyClient,
    flysim: Any,
    unhealthy: set[str],
    app: str,
    image: str,
) -> None:
    snapshot = await _snapshot(env, releases, app)
    assert snapshot.machines == []
    bad = f"{image}:broken"
    unhealthy.add(bad)
    flysim.config.unhealthy_images.add(bad)

    request = rollout_input(
        app, bad, "d-first", machine_count=2, strategy=strategy, timings=FAILING
    )
    if strategy is Strategy.IMMEDIATE:
        await _release(env, rollout, request)  # does not wait, so it cannot tell
        assert len(await _machines(fly, app)) == 2
    else:
        with pytest.raises(ApplicationError) as caught:
            await _release(env, rollout, request)
        assert caught.value.type == "MachineUnhealthy"

    result = await _restore(env, releases, snapshot, "d-first")
    assert await _machines(fly, app) == []
    assert result.restored == [] and result.unchanged == []
    assert held_leases(flysim, app) == []
    again = await _restore(env, releases, snapshot, "d-first")
    assert again.destroyed == [] and again.restored == []


@pytest.mark.parametrize("strategy", ALL)
async def test_first_deploy_creates_the_machines(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    result = await _release(
        env, rollout, rollout_input(app, f"{image}:v1", "d-new", machine_count=2, strategy=strategy)
    )
    machines = await _machines(fly, app)
    assert sorted(m.id for m in machines) == sorted(result.machine_ids)
    assert [m.action for m in result.machines] == ["created", "created"]
    assert {m.metadata["turbodeploy_slot"] for m in machines} == {"0", "1"}
    assert not [m for m in machines if m.metadata.get(CANARY_KEY)]
    assert held_leases(flysim, app) == []
    if strategy is not Strategy.IMMEDIATE:
        assert (await _health(flysim, app)).status_code == 200


@pytest.mark.parametrize("strategy", ALL)
async def test_repeated_rollout_creates_no_duplicates(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    request = rollout_input(app, f"{image}:v2", "d-2", machine_count=2, strategy=strategy)
    first = await _release(env, rollout, request)
    since = time.time()

    again = await _release(env, rollout, request)  # as a retry after a lost answer
    assert sorted(again.machine_ids) == sorted(first.machine_ids)
    assert ("POST", "machines") not in _requests(flysim, app, since)
    assert ("POST", "machine") not in _requests(flysim, app, since)  # no update either
    machines = await _machines(fly, app)
    assert sorted(m.id for m in machines) == sorted(first.machine_ids)
    assert {m.image for m in machines} == {f"{image}:v2"}
    assert held_leases(flysim, app) == []


async def test_retry_adopts_a_canary_an_earlier_attempt_left(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    model = (await _machines(fly, app))[0]
    # The earlier attempt created its canary and crashed.
    config = {**model.config, "image": f"{image}:v2"}
    config["metadata"] = {
        **config["metadata"],
        "turbodeploy_deployment_id": "d-2",
        CANARY_KEY: "d-2",
    }
    del config["metadata"]["turbodeploy_slot"]
    left = await fly.create_machine(app, config, "iad")
    since = time.time()

    request = rollout_input(app, f"{image}:v2", "d-2", machine_count=2, strategy=Strategy.CANARY)
    result = await _release(env, rollout, request)
    assert ("POST", "machines") not in _requests(flysim, app, since)  # adopted, not created
    machines = await _machines(fly, app)
    assert left.id not in {m.id for m in machines}
    assert sorted(m.id for m in machines) == sorted(result.machine_ids)
    assert len(machines) == 2


async def test_bluegreen_retry_adopts_greens_an_earlier_attempt_created(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    blues = await _machines(fly, app)
    green = {**blues[0].config, "image": f"{image}:v2"}
    green["metadata"] = {
        **green["metadata"],
        "turbodeploy_deployment_id": "d-2",
        "turbodeploy_slot": "0",
        GREEN_KEY: "d-2",
    }
    orphan = await fly.create_machine(app, green, "iad", skip_service_registration=True)
    since = time.time()

    request = rollout_input(app, f"{image}:v2", "d-2", machine_count=2, strategy=Strategy.BLUEGREEN)
    result = await _release(env, rollout, request)
    assert orphan.id in result.machine_ids
    assert _requests(flysim, app, since).count(("POST", "machines")) == 1
    machines = await _machines(fly, app)
    assert sorted(m.id for m in machines) == sorted(result.machine_ids)
    assert not {m.id for m in blues} & {m.id for m in machines}


async def test_bluegreen_needs_a_health_check(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1"))
    since = time.time()
    no_checks = (
        FLY_TOML.split("  [[http_service.checks]]")[0] + '[[vm]]\n  size = "shared-cpu-1x"\n'
    )
    request = rollout_input(
        app, f"{image}:v2", "d-2", strategy=Strategy.BLUEGREEN, fly_toml=no_checks
    )
    with pytest.raises(ApplicationError) as caught:
        await _release(env, rollout, request)
    assert caught.value.type == "BlueGreenNeedsChecks" and caught.value.non_retryable
    assert _requests(flysim, app, since) == []  # nothing was touched, nothing even read


@pytest.mark.parametrize("strategy", ALL)
async def test_lease_held_elsewhere_touches_nothing(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    machines = await _machines(fly, app)
    foreign = await fly.acquire_lease(app, machines[1].id, 30)
    since = time.time()
    try:
        request = rollout_input(app, f"{image}:v2", "d-2", machine_count=2, strategy=strategy)
        with pytest.raises(ApplicationError) as caught:
            await _release(env, rollout, request)
        assert not caught.value.non_retryable
        assert machines[1].id in caught.value.message
        touched = {r for r in _requests(flysim, app, since) if r[0] != "GET"}
        assert touched <= {("POST", "machine/lease"), ("DELETE", "machine/lease")}
        assert [lease["machine_id"] for lease in held_leases(flysim, app)] == [machines[1].id]
    finally:
        await fly.release_lease(app, machines[1].id, foreign.nonce)


@pytest.mark.parametrize(("max_unavailable", "batches"), [(2, [1, 2, 2]), (0.5, [1, 3, 1])])
async def test_rolling_updates_max_unavailable_at_a_time(
    max_unavailable: float,
    batches: list[int],
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    flysim: Any,
    sim_timing: Any,
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=5))
    sim_timing.start_delay = 0.2  # each batch waits this long for its machines
    since = time.time()
    await _release(
        env,
        rollout,
        rollout_input(app, f"{image}:v2", "d-2", machine_count=5, max_unavailable=max_unavailable),
    )
    updates = sorted(
        at
        for at, method, path, _ in list(flysim.request_log)
        if at >= since
        and method == "POST"
        and path.startswith(f"/v1/apps/{app}/machines/")
        and path.count("/") == 5
    )
    sizes = [1]
    for earlier, later in itertools.pairwise(updates):
        if later - earlier > 0.15:
            sizes.append(1)
        else:
            sizes[-1] += 1
    assert sizes == batches


async def test_machine_that_never_starts_fails_after_the_wait_timeout(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    sim_timing: Any,
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    since = time.time()
    sim_timing.start_delay = 3.0  # longer than the 1 s the rollout waits
    one_second = ACTIVITY_TIMINGS.model_copy(update={"machine_wait_timeout": timedelta(seconds=1)})
    request = rollout_input(app, f"{image}:v2", "d-2", machine_count=2, timings=one_second)
    with pytest.raises(ApplicationError) as caught:
        await _release(env, rollout, request)
    assert caught.value.type == "MachineUnhealthy" and caught.value.non_retryable
    assert "did not start within 1s" in caught.value.message
    assert ("GET", "machine/wait") in _requests(flysim, app, since)
    assert flysim.stats.by_status[408] >= 1
    assert sorted(m.image or "" for m in await _machines(fly, app)) == sorted(
        [f"{image}:v1", f"{image}:v2"]
    )
    assert held_leases(flysim, app) == []


# ---------------------------------------------------------------------------- cancel


@pytest.mark.parametrize("strategy", [Strategy.CANARY, Strategy.BLUEGREEN])
async def test_cancelled_rollout_removes_new_machines_and_releases_leases(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    heartbeats: list[tuple[Any, ...]],
    unhealthy: set[str],
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    before = sorted(m.id for m in await _machines(fly, app))
    heartbeats.clear()
    bad = f"{image}:hangs"
    unhealthy.add(bad)
    flysim.config.unhealthy_images.add(bad)
    slow = ACTIVITY_TIMINGS.model_copy(update={"machine_wait_timeout": timedelta(minutes=5)})
    task = asyncio.create_task(
        _release(
            env,
            rollout,
            rollout_input(app, bad, "d-cancel", machine_count=2, strategy=strategy, timings=slow),
        )
    )
    for _ in range(500):
        if heartbeats and heartbeats[-1][0]["step"] == "waiting for health checks":
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the rollout never reached the health checks")
    during = await _machines(fly, app)
    assert len(during) > 2, "the new machine exists while it is checked"
    assert held_leases(flysim, app)
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held_leases(flysim, app) == []
    assert sorted(m.id for m in await _machines(fly, app)) == before
    assert {m.image for m in await _machines(fly, app)} == {f"{image}:v1"}


async def test_cancelled_rolling_rollout_restored(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    releases: ReleaseActivities,
    fly: FlyClient,
    flysim: Any,
    heartbeats: list[tuple[Any, ...]],
    unhealthy: set[str],
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    snapshot = await _snapshot(env, releases, app)
    heartbeats.clear()
    bad = f"{image}:hangs"
    unhealthy.add(bad)
    flysim.config.unhealthy_images.add(bad)
    slow = ACTIVITY_TIMINGS.model_copy(update={"machine_wait_timeout": timedelta(minutes=5)})
    task = asyncio.create_task(
        _release(env, rollout, rollout_input(app, bad, "d-cancel", machine_count=2, timings=slow))
    )
    for _ in range(500):
        if heartbeats and heartbeats[-1][0]["step"] == "waiting for health checks":
            break
        await asyncio.sleep(0.01)
    env.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held_leases(flysim, app) == []
    assert bad in {m.image for m in await _machines(fly, app)}

    # The workflow's compensation for the cancellation, in an activity of its own.
    await _restore(ActivityEnvironment(), releases, snapshot, "d-cancel")
    await _assert_matches(fly, snapshot)
    assert (await _health(flysim, app)).json()["image"] == f"{image}:v1"


# --------------------------------------------------------------------------- restore


async def test_snapshot_of_a_missing_app_is_empty(
    env: ActivityEnvironment, releases: ReleaseActivities
) -> None:
    name = f"turbobackend-gone{uuid.uuid4().hex[:8]}"
    snapshot = await _snapshot(env, releases, name)
    assert snapshot == ReleaseSnapshot(app_name=name, app_missing=True)


async def test_snapshot_holds_the_group_as_it_runs(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    releases: ReleaseActivities,
    fly: FlyClient,
    app: str,
    image: str,
) -> None:
    result = await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    other = await fly.get_machine(app, result.machine_ids[0])
    worker = {**other.config, "metadata": {**other.metadata, "fly_process_group": "worker"}}
    await fly.create_machine(app, worker, "iad")  # another process group: not ours
    stopped = result.machine_ids[1]
    await fly.stop_machine(app, stopped)
    assert await fly.wait_machine(app, stopped, "stopped", timeout=5)

    snapshot = await _snapshot(env, releases, app)
    by_id = {m.machine_id: m for m in snapshot.machines}
    assert set(by_id) == set(result.machine_ids)
    assert by_id[stopped].state == "stopped"
    for machine in await _machines(fly, app):
        if machine.id in by_id:
            assert by_id[machine.id].config == machine.config
            assert by_id[machine.id].instance_id == machine.instance_id
            assert by_id[machine.id].region == machine.region


async def test_manual_rollback_recreates_removes_and_is_idempotent(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    releases: ReleaseActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    v1 = await _snapshot(env, releases, app)
    # Later: a new release on three machines, and one of the old machines is gone.
    await _release(env, rollout, rollout_input(app, f"{image}:v2", "d-2", machine_count=3))
    gone = v1.machines[0]
    await fly.delete_machine(app, gone.machine_id, force=True)
    kept = v1.machines[1]

    result = await _restore(env, releases, v1, "rb-1")
    live = {m.id: m for m in await _machines(fly, app)}
    assert len(live) == 2
    assert kept.machine_id in live and live[kept.machine_id].config == kept.config
    [stand_in] = [m for m in live.values() if m.id != kept.machine_id]
    assert stand_in.metadata[RESTORED_BY_KEY] == "rb-1"
    assert stand_in.region == gone.region and stand_in.image == f"{image}:v1"
    assert sorted(result.restored) == sorted([kept.machine_id, stand_in.id])
    assert len(result.destroyed) == 1
    assert held_leases(flysim, app) == []

    since = time.time()
    again = await _restore(env, releases, v1, "rb-1")  # a retry
    assert sorted(again.unchanged) == sorted(live)
    assert again.restored == [] and again.destroyed == []
    assert {m for m, _ in _requests(flysim, app, since)} <= {"GET", "POST", "DELETE"}
    assert ("POST", "machines") not in _requests(flysim, app, since)
    assert sorted(m.id for m in await _machines(fly, app)) == sorted(live)
    response = await _health(flysim, app)
    assert response.status_code == 200 and response.json()["image"] == f"{image}:v1"


async def test_restore_serves_again_after_an_interrupted_cutover(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    releases: ReleaseActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    snapshot = await _snapshot(env, releases, app)
    # A blue-green deploy cordoned and stopped the old machines, then died.
    for machine in snapshot.machines:
        await fly.cordon_machine(app, machine.machine_id)
        await fly.stop_machine(app, machine.machine_id)
        assert await fly.wait_machine(app, machine.machine_id, "stopped", timeout=5)
    assert (await _health(flysim, app)).status_code == 503

    result = await _restore(env, releases, snapshot, "d-2")
    assert sorted(result.restored) == sorted(m.machine_id for m in snapshot.machines)
    assert {m.state for m in await _machines(fly, app)} == {"started"}
    assert (await _health(flysim, app)).status_code == 200


async def test_restore_keeps_a_stopped_machine_stopped(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    releases: ReleaseActivities,
    fly: FlyClient,
    app: str,
    image: str,
) -> None:
    first = await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    asleep = first.machine_ids[1]
    await fly.stop_machine(app, asleep)
    assert await fly.wait_machine(app, asleep, "stopped", timeout=5)
    snapshot = await _snapshot(env, releases, app)
    await _release(env, rollout, rollout_input(app, f"{image}:v2", "d-2", machine_count=2))

    await _restore(env, releases, snapshot, "d-2")
    await _assert_matches(fly, snapshot)
    assert (await fly.get_machine(app, asleep)).state == "stopped"


# ------------------------------------------------------------------------------ cost


@pytest.mark.parametrize("strategy", ALL)
async def test_api_requests_per_machine(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    """What a re-deploy of three machines costs in Fly API requests (lease refreshes left
    out by a long ttl); printed for the record, bounded so that a regression shows."""
    count = 3
    long_lease = ACTIVITY_TIMINGS.model_copy(update={"lease_ttl": timedelta(seconds=60)})
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=count))
    since = time.time()
    await _release(
        env,
        rollout,
        rollout_input(
            app,
            f"{image}:v2",
            "d-2",
            machine_count=count,
            strategy=strategy,
            timings=long_lease,
        ),
    )
    requests = _requests(flysim, app, since)
    by_route = Counter(f"{m} {r}" for m, r in requests)
    print(f"\n{strategy}: {len(requests)} requests for {count} machines: {dict(by_route)}")
    per_machine = {
        Strategy.ROLLING: 5,  # lease, update, wait, get (checks), release
        Strategy.IMMEDIATE: 3,  # lease, update, release
        Strategy.CANARY: 5,
        Strategy.BLUEGREEN: 10,
    }[strategy]
    fixed = {Strategy.CANARY: 4}.get(strategy, 0) + 2  # two listings; the canary's own
    assert len(requests) <= per_machine * count + fixed


async def test_check_reads_wait_for_when_checks_passed_last_time(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    flysim: Any,
    sim_timing: Any,
    app: str,
    image: str,
) -> None:
    """Checks pass 0.6 s after each start. Without a hint the first machine reads them
    every 0.1 s; the machines after it, and every machine of the next release, read them
    when they passed before: once, or a few times at the near interval."""
    sim_timing.healthy_after = 0.6
    timings = ACTIVITY_TIMINGS.model_copy(
        update={
            "machine_poll_interval": timedelta(milliseconds=100),
            "machine_poll_near_interval": timedelta(milliseconds=20),
            "lease_ttl": timedelta(seconds=60),
        }
    )

    def check_reads(since: float) -> Counter[str]:
        return Counter(
            path.rsplit("/", 1)[1]
            for at, method, path, _ in list(flysim.request_log)
            if at >= since
            and method == "GET"
            and path.startswith(f"/v1/apps/{app}/machines/")
            and path.count("/") == 5
        )

    since = time.time()
    first = await _release(
        env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=3, timings=timings)
    )
    reads = check_reads(since)
    windows = [m.checks_passed for m in first.machines]
    assert all(w is not None and 0.5 <= w.passing_at < 5 for w in windows), windows
    unhinted, *hinted = (reads[m.machine_id] for m in first.machines)
    assert unhinted >= 5, reads  # 0, 0.1, ..., 0.5 all see the check still waiting
    assert all(n <= 3 for n in hinted), reads

    hint = CheckWindow.typical(first.machines)
    assert hint is not None and hint.passing_at >= 0.5
    since = time.time()
    second = await _release(
        env,
        rollout,
        rollout_input(
            app, f"{image}:v2", "d-2", machine_count=3, timings=timings, checks_hint=hint
        ),
    )
    reads = check_reads(since)
    assert all(reads[m.machine_id] <= 3 for m in second.machines), reads
    assert all(m.checks_passed is not None for m in second.machines)


def test_check_pace() -> None:
    unhinted = CheckPace(None, interval=1.0, near=0.2)
    # On a grid of whole intervals after the start: slow reads do not push it later.
    assert [unhinted.delay(t) for t in (0.0, 0.25, 1.5)] == [0.0, 0.75, 0.5]
    assert unhinted.delay(3.5) == 0.0  # a read that took longer than a step: next at once
    assert unhinted.observed(2.01) == 2.01

    pace = CheckPace(CheckWindow(failing_until=2.0, passing_at=3.0), interval=1.0, near=0.2)
    assert pace.delay(0.0) == 3.0  # nothing to read before the checks passed last time
    assert pace.observed(3.004) == 3.0  # passed at once: no creeping later
    # A little slower this time: every 0.2 s until a quarter of 3 s later, then each 1 s.
    assert [round(pace.delay(t), 3) for t in (3.05, 3.25, 3.45, 3.65, 3.8)] == [
        0.15, 0.15, 0.15, 0.1, 0.95
    ]  # fmt: skip
    assert pace.observed(4.6) == 4.6

    fast = CheckPace(CheckWindow(failing_until=0.0, passing_at=0.01), interval=1.0, near=0.2)
    assert [round(fast.delay(t), 3) for t in (0.0, 0.02, 0.22, 0.42)] == [0.01, 0.19, 0.19, 0.99]

    wide = CheckPace(CheckWindow(failing_until=0.0, passing_at=0.5), interval=1.0, near=5.0)
    assert wide.delay(0.7) == 0.0  # started reading after the expected time: read at once
    assert wide.delay(0.8) == 0.7  # the near interval is never longer than the interval


def test_typical_window_is_the_median_machine() -> None:
    def outcome(passing_at: float | None) -> MachineOutcome:
        window = None if passing_at is None else CheckWindow(failing_until=0, passing_at=passing_at)
        return MachineOutcome(machine_id="m", action="updated", checks_passed=window)

    assert CheckWindow.typical([]) is None
    assert CheckWindow.typical([outcome(None)]) is None
    window = CheckWindow.typical([outcome(9.0), outcome(None), outcome(1.0), outcome(3.0)])
    assert window is not None and window.passing_at == 3.0


async def test_a_create_refused_with_429_or_5xx_is_made_again_in_the_same_attempt(
    env: ActivityEnvironment,
    fly: FlyClient,
    settings: Settings,
    credentials: Any,
    flysim: Any,
    calm_emulator: Any,
    app: str,
    image: str,
) -> None:
    """Half the requests are refused (429, Retry-After 0). A create is not idempotent, so
    the client leaves it to the rollout, which lists the app and, when the refused create
    made nothing, creates again, instead of failing the whole attempt."""
    faults = flysim.config.faults
    faults.seed, faults.rate_limit_rate, faults.retry_after = 1, 0.5, 0
    retrying = FlyClient(
        settings.fly_api_base_url,
        credentials.fly_token,
        retry=RequestRetry(attempts=12, initial_delay=0.01, max_delay=0.05),
    )
    before = flysim.stats.faults_injected.get("rate_limit", 0)
    since = time.time()
    async with retrying:
        result = await env.run(
            RolloutActivities(retrying).roll_out,
            rollout_input(app, f"{image}:v1", "d-1", machine_count=3),
        )
    faults.rate_limit_rate = 0
    created = [
        s for at, m, path, s in list(flysim.request_log)
        if at >= since and m == "POST" and path == f"/v1/apps/{app}/machines"
    ]  # fmt: skip
    assert 429 in created, "no create was refused: the seed no longer exercises the retry"
    assert flysim.stats.faults_injected["rate_limit"] > before
    assert created.count(200) == 3
    assert len(result.machines) == 3
    assert len(await _machines(fly, app)) == 3


@pytest.mark.parametrize("strategy", [Strategy.ROLLING, Strategy.IMMEDIATE])
async def test_rollout_from_the_snapshot_keeps_a_change_made_after_it(
    strategy: Strategy,
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    releases: ReleaseActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    """The rollout leases the machines the snapshot read instead of listing them again;
    each update carries the version read, so a machine changed after the snapshot is read
    again and its change survives. What the rollout answers as released is what a listing
    shows afterwards."""
    await _release(env, rollout, rollout_input(app, f"{image}:v1", "d-1", machine_count=2))
    snapshot = await _snapshot(env, releases, app)
    assert all(m.version for m in snapshot.machines)
    changed = snapshot.machines[0].machine_id
    machine = await fly.get_machine(app, changed)  # by hand, after the snapshot
    config = {**machine.config, "dns": {"nameservers": ["1.1.1.1"]}}
    await fly.update_machine(app, changed, config, machine.region, nonce=None)
    since = time.time()
    result = await _release(
        env,
        rollout,
        rollout_input(
            app, f"{image}:v2", "d-2", machine_count=2, strategy=strategy, snapshot=snapshot
        ),
    )
    listings = [
        1 for at, m, path, _ in list(flysim.request_log)
        if at >= since and m == "GET" and path == f"/v1/apps/{app}/machines"
    ]  # fmt: skip
    assert listings == [], "the snapshot's machines were listed again"
    machines = {m.id: m for m in await _machines(fly, app)}
    assert machines[changed].config["dns"] == {"nameservers": ["1.1.1.1"]}
    assert {m.image for m in machines.values()} == {f"{image}:v2"}
    assert result.released is not None
    released = {m.machine_id: m for m in result.released.machines}
    assert set(released) == set(machines)
    for machine_id, snap in released.items():
        assert snap.config == machines[machine_id].config
        assert snap.version == machines[machine_id].version


def test_recent_checks_keep_only_windows_that_saw_a_failure() -> None:
    """What a first deploy borrows from other projects: windows that saw checks fail, then
    pass (a first read that passed says only "by then"), the median of them."""
    from activities._machines import RecentChecks

    recent = RecentChecks(size=5)
    assert recent.typical() is None
    recent.observe(CheckWindow(failing_until=0, passing_at=9.0))
    assert recent.typical() is None
    for at in (3.0, 2.0, 4.0):
        recent.observe(CheckWindow(failing_until=at - 0.2, passing_at=at))
    typical = recent.typical()
    assert typical is not None and typical.passing_at == 3.0
    stale = RecentChecks(keep=0.0)
    stale.observe(CheckWindow(failing_until=1.0, passing_at=1.2))
    assert stale.typical() is None
