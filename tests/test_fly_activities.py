"""The Fly app and rollout activities against the emulator, with credentials from moto's SSM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from harness import (
    ACTIVITY_TIMINGS,
    FLY_TOML,
    held_leases,
    rollout_input,
    ssm_settings,
    take_app_name,
)
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities._heartbeat import heartbeat_if_in_activity
from activities._machines import MachineSession
from activities.fly_apps import EnsureAppInput, FlyAppActivities
from activities.rollout import RolloutActivities
from activities.secrets import CredentialStore
from core.flytoml import machine_config
from core.models import Strategy
from core.settings import Settings
from flyapi import FlyClient, Machine
from flyapi._client import LEASE_NONCE_HEADER

# ----------------------------------------------------------------------------- helpers


def _creates(flysim: Any) -> int:
    return int(flysim.stats.by_route[("POST", "/v1/apps/{app_name}/machines")])


async def _machines(fly: FlyClient, app: str) -> dict[str, Machine]:
    return {m.id: m for m in await fly.list_machines(app)}


class _LateRefreshes(httpx.AsyncBaseTransport):
    """A network that delivers lease refreshes late: a refresh whose sender stopped waiting
    still reaches the API, after a release sent meanwhile or else after `delay` seconds."""

    def __init__(self, delay: float) -> None:
        self._network = httpx.AsyncHTTPTransport()
        self._delay = delay
        self._released = asyncio.Event()
        self.refresh_on_its_way = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        lease = request.url.path.endswith("/lease")
        if lease and request.method == "POST" and request.headers.get(LEASE_NONCE_HEADER):
            self.refresh_on_its_way.set()
            return await asyncio.shield(asyncio.ensure_future(self._late(request)))
        response = await self._send(request)
        if lease and request.method == "DELETE":
            self._released.set()
        return response

    async def _late(self, request: httpx.Request) -> httpx.Response:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), self._delay)
        return await self._send(request)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        response = await self._network.handle_async_request(request)
        content = await response.aread()
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    async def aclose(self) -> None:
        await self._network.aclose()


class _SlowLeaseAnswers(httpx.AsyncBaseTransport):
    """A network that is slow to answer a request for a new lease: the API grants it at
    once, its answer arrives `delay` seconds later, or never to a caller that gave up."""

    def __init__(self, delay: float) -> None:
        self._network = httpx.AsyncHTTPTransport()
        self._delay = delay
        self.granted = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._network.handle_async_request(request)
        content = await response.aread()
        if (
            request.url.path.endswith("/lease")
            and request.method == "POST"
            and not request.headers.get(LEASE_NONCE_HEADER)
        ):
            self.granted.set()
            await asyncio.sleep(self._delay)
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    async def aclose(self) -> None:
        await self._network.aclose()


class _LostCreateAnswer(httpx.AsyncBaseTransport):
    """A network that loses the answer to the first machine create: the API made the
    machine (and its lease), the caller sees a read timeout."""

    def __init__(self) -> None:
        self._network = httpx.AsyncHTTPTransport()
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._network.handle_async_request(request)
        if not self.lost and request.method == "POST" and request.url.path.endswith("/machines"):
            await response.aread()
            self.lost += 1
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response

    async def aclose(self) -> None:
        await self._network.aclose()


# --------------------------------------------------------------------------- ensure_app


async def test_ensure_app_creates_once_and_allocates_ips_once(
    env: ActivityEnvironment,
    fly: FlyClient,
    credentials: CredentialStore,
    settings: Settings,
    flysim: Any,
    app_name: str,
) -> None:
    acts = FlyAppActivities(fly, credentials, settings)
    request = EnsureAppInput(app_name=app_name, org_slug="personal", timings=ACTIVITY_TIMINGS)

    first = await env.run(acts.ensure_app, request)
    assert first.created
    assert first.url == flysim.app_url(app_name)
    assert len(first.ips) == 2
    assert sum(":" in ip for ip in first.ips) == 1  # one IPv6, one IPv4

    second = await env.run(acts.ensure_app, request)
    assert not second.created
    assert sorted(second.ips) == sorted(first.ips)
    assert len(await fly.list_ip_assignments(app_name)) == 2


async def test_ensure_app_completes_a_half_allocated_pair(
    env: ActivityEnvironment,
    fly: FlyClient,
    credentials: CredentialStore,
    settings: Settings,
    app: str,
) -> None:
    v6 = await fly.assign_ip(app, "v6")  # an earlier attempt stopped after the first IP
    acts = FlyAppActivities(fly, credentials, settings)
    result = await env.run(acts.ensure_app, EnsureAppInput(app_name=app, org_slug="personal"))
    assert not result.created
    assert v6.ip in result.ips and len(result.ips) == 2


async def test_name_taken_by_another_org_is_final(
    env: ActivityEnvironment,
    fly: FlyClient,
    credentials: CredentialStore,
    settings: Settings,
    flysim: Any,
    app_name: str,
) -> None:
    take_app_name(flysim, app_name)

    acts = FlyAppActivities(fly, credentials, settings)
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.ensure_app, EnsureAppInput(app_name=app_name, org_slug="personal"))
    err = caught.value
    assert err.type == "AppNameTaken"
    assert err.non_retryable
    assert app_name in err.message and "another organisation" in err.message


async def test_rejected_token_is_final_and_forgotten(
    env: ActivityEnvironment,
    ssm_endpoint: str,
    ssm: Any,
    flysim: Any,
    fly_token: str,
    app_name: str,
) -> None:
    parameter = f"/t-{uuid.uuid4().hex[:10]}/fly_token"
    revoked = f"FlyV1 fm2_revoked{uuid.uuid4().hex}"
    ssm.put_parameter(Name=parameter, Value=revoked, Type="SecureString")
    settings = ssm_settings(
        ssm_endpoint,
        fly_api_base_url=flysim.base_url,
        app_url_template=flysim.app_url_template,
        fly_token_parameter=parameter,
        token_cache_seconds=3600,
    )
    credentials = CredentialStore(settings)
    async with FlyClient(settings.fly_api_base_url, credentials.fly_token) as fly:
        acts = FlyAppActivities(fly, credentials, settings)
        request = EnsureAppInput(app_name=app_name, org_slug="personal", timings=ACTIVITY_TIMINGS)
        with pytest.raises(ApplicationError) as caught:
            await env.run(acts.ensure_app, request)
        assert caught.value.type == "FlyUnauthorized" and caught.value.non_retryable
        assert revoked not in str(caught.value) and "revoked" not in str(caught.value)

        # Rotated in SSM: the next attempt must not reuse the rejected token from the cache.
        ssm.put_parameter(Name=parameter, Value=fly_token, Type="SecureString", Overwrite=True)
        result = await env.run(acts.ensure_app, request)
        assert result.created


async def test_ensure_app_server_error_is_retryable(
    env: ActivityEnvironment,
    fly: FlyClient,
    credentials: CredentialStore,
    settings: Settings,
    faults: Any,
    app_name: str,
) -> None:
    acts = FlyAppActivities(fly, credentials, settings)
    credentials_warm = await credentials.fly_token()  # SSM is not the thing under test
    assert credentials_warm
    faults.rate_limit_rate = 1.0
    faults.retry_after = 4
    with pytest.raises(ApplicationError) as caught:
        await env.run(acts.ensure_app, EnsureAppInput(app_name=app_name, org_slug="personal"))
    err = caught.value
    assert not err.non_retryable
    assert err.type == "FlyRetryableError"
    assert err.next_retry_delay == timedelta(seconds=4)
    assert err.message.startswith(f"Look up Fly app {app_name} failed: 429")


# ------------------------------------------------------------------------------ rollout


async def test_first_deploy_creates_machines_with_metadata(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    heartbeats: list[tuple[Any, ...]],
    app: str,
    image: str,
) -> None:
    request = rollout_input(app, f"{image}:v1", "d-first", machine_count=2)
    result = await env.run(rollout.roll_out, request)

    assert [m.action for m in result.machines] == ["created", "created"]
    machines = await _machines(fly, app)
    assert set(machines) == set(result.machine_ids)
    slots = set()
    for outcome in result.machines:
        machine = machines[outcome.machine_id]
        assert machine.state == "started" and machine.region == "iad" == outcome.region
        assert machine.instance_id == outcome.instance_id
        assert machine.image == f"{image}:v1"
        meta = machine.metadata
        assert meta["fly_platform_version"] == "v2"
        assert meta["fly_process_group"] == "app"
        assert meta["fly_release_id"] == "d-first"
        assert meta["turbodeploy_deployment_id"] == "d-first"
        slots.add(meta["turbodeploy_slot"])
    assert slots == {"0", "1"}
    assert held_leases(flysim, app) == []
    assert heartbeats and heartbeats[-1][0]["done"] == result.machine_ids


async def test_repeated_rollout_creates_no_duplicates(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    request = rollout_input(app, f"{image}:v1", "d-once", machine_count=2)
    first = await env.run(rollout.roll_out, request)
    creates = _creates(flysim)

    again = await env.run(rollout.roll_out, request)  # as a retry after a lost answer
    assert again.machine_ids == first.machine_ids
    assert [m.action for m in again.machines] == ["created", "created"]
    assert _creates(flysim) == creates
    assert len(await fly.list_machines(app)) == 2


async def test_retry_adopts_a_machine_an_earlier_attempt_created(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    app: str,
    image: str,
) -> None:
    # The earlier attempt created slot 0 and crashed before it could report it.
    metadata = {
        "fly_release_id": "d-crash",
        "turbodeploy_deployment_id": "d-crash",
        "turbodeploy_slot": "0",
    }
    config = machine_config(FLY_TOML, image=f"{image}:v1", metadata=metadata)
    orphan = await fly.create_machine(app, config, "iad")

    result = await env.run(
        rollout.roll_out, rollout_input(app, f"{image}:v1", "d-crash", machine_count=2)
    )
    assert orphan.id in result.machine_ids
    assert len(result.machines) == 2
    assert len(await fly.list_machines(app)) == 2


async def test_redeploy_updates_in_place_and_releases_leases(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    first = await env.run(
        rollout.roll_out, rollout_input(app, f"{image}:v1", "d-one", machine_count=2)
    )
    before = await _machines(fly, app)

    second = await env.run(
        rollout.roll_out, rollout_input(app, f"{image}:v2", "d-two", machine_count=2)
    )
    after = await _machines(fly, app)

    assert set(second.machine_ids) == set(first.machine_ids) == set(after)
    assert [m.action for m in second.machines] == ["updated", "updated"]
    for machine_id, machine in after.items():
        assert machine.image == f"{image}:v2"
        assert machine.instance_id != before[machine_id].instance_id
        assert machine.state == "started"
        assert machine.metadata["turbodeploy_deployment_id"] == "d-two"
        # Kept from the first deploy: the slot, and where the machine came from.
        assert (
            machine.metadata["turbodeploy_slot"] == before[machine_id].metadata["turbodeploy_slot"]
        )
        assert machine.metadata["turbodeploy_created_in"] == "d-one"
    assert held_leases(flysim, app) == []


async def test_unhealthy_release_stops_after_one_machine(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-good", machine_count=2))
    bad = f"{image}:broken"
    flysim.config.unhealthy_images.add(bad)
    timings = ACTIVITY_TIMINGS.model_copy(
        update={"machine_wait_timeout": timedelta(milliseconds=300)}
    )
    try:
        with pytest.raises(ApplicationError) as caught:
            await env.run(
                rollout.roll_out,
                rollout_input(app, bad, "d-bad", machine_count=2, timings=timings),
            )
    finally:
        flysim.config.unhealthy_images.discard(bad)
    err = caught.value
    assert err.type == "MachineUnhealthy" and err.non_retryable
    images = sorted(m.image or "" for m in await fly.list_machines(app))
    assert images == sorted([bad, f"{image}:v1"])  # the second machine was not touched
    broken = next(m for m in await fly.list_machines(app) if m.image == bad)
    assert broken.id in err.message
    assert "500 Internal Server Error" in err.message  # the failing check's output
    assert held_leases(flysim, app) == []


async def test_stopped_machine_is_updated_without_waking_it(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    first = await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-awake"))
    machine_id = first.machine_ids[0]
    await fly.stop_machine(app, machine_id)
    assert await fly.wait_machine(app, machine_id, "stopped", timeout=5)

    second = await env.run(rollout.roll_out, rollout_input(app, f"{image}:v2", "d-asleep"))
    assert second.machine_ids == [machine_id]
    assert second.machines[0].action == "updated"
    machine = await fly.get_machine(app, machine_id)
    assert machine.image == f"{image}:v2"
    assert machine.state == "stopped"
    assert held_leases(flysim, app) == []


async def test_lease_held_elsewhere_touches_nothing(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-base", machine_count=2))
    machines = sorted(await fly.list_machines(app), key=lambda m: m.metadata["turbodeploy_slot"])
    foreign = await fly.acquire_lease(app, machines[1].id, 30)  # e.g. someone's `fly deploy`
    try:
        with pytest.raises(ApplicationError) as caught:
            await env.run(
                rollout.roll_out, rollout_input(app, f"{image}:v2", "d-blocked", machine_count=2)
            )
        assert not caught.value.non_retryable
        assert machines[1].id in caught.value.message
        assert "still held after waiting" in caught.value.message
        assert {m.image for m in await fly.list_machines(app)} == {f"{image}:v1"}
        # Only the foreign lease is left: ours on the first machine was given back.
        assert [lease["machine_id"] for lease in held_leases(flysim, app)] == [machines[1].id]
    finally:
        await fly.release_lease(app, machines[1].id, foreign.nonce)


async def test_lease_held_elsewhere_is_waited_for_within_the_deadline(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    """Someone's lease that lapses within `lease_wait_timeout` costs a wait, not a failed
    attempt; the wait reads the lease instead of asking for it again and again."""
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-base", machine_count=2))
    machines = sorted(await fly.list_machines(app), key=lambda m: m.metadata["turbodeploy_slot"])
    await fly.acquire_lease(app, machines[1].id, 1)  # e.g. a killed `fly deploy`: lapses
    patient = ACTIVITY_TIMINGS.model_copy(update={"lease_wait_timeout": timedelta(seconds=20)})
    conflicts = flysim.stats.lease_conflicts
    result = await env.run(
        rollout.roll_out,
        rollout_input(app, f"{image}:v2", "d-waits", machine_count=2, timings=patient),
    )
    assert sorted(result.machine_ids) == sorted(m.id for m in machines)
    assert {m.image for m in await fly.list_machines(app)} == {f"{image}:v2"}
    assert flysim.stats.lease_conflicts == conflicts + 1, "asked again instead of reading"
    assert held_leases(flysim, app) == []


async def test_retried_attempt_takes_over_the_leases_of_the_one_before(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    heartbeats: list[tuple[Any, ...]],
    app: str,
    image: str,
) -> None:
    """A crashed attempt's leases (long-lived here, longer than any wait) are the next
    attempt's by the nonces its last heartbeat carried: no conflict, no wait."""
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-base", machine_count=2))
    machines = await fly.list_machines(app)
    dead = {m.id: (await fly.acquire_lease(app, m.id, 600)).nonce for m in machines}
    heartbeats.clear()
    env.info = dataclasses.replace(
        env.info,
        attempt=2,
        heartbeat_details=[{"done": [], "step": "updating machine", "leases": dead}],
    )
    conflicts = flysim.stats.lease_conflicts
    result = await env.run(
        rollout.roll_out, rollout_input(app, f"{image}:v2", "d-resumed", machine_count=2)
    )
    assert sorted(result.machine_ids) == sorted(dead)
    assert {m.image for m in await fly.list_machines(app)} == {f"{image}:v2"}
    assert flysim.stats.lease_conflicts == conflicts
    assert held_leases(flysim, app) == [], "the leases taken over were released at the end"
    # The heartbeats name what is held, so the attempt after this one could do the same.
    assert any(h[0].get("leases") == dead for h in heartbeats if isinstance(h[0], dict))
    assert heartbeats[-1][0]["leases"] == {}


async def test_a_wait_inside_the_fly_client_keeps_the_leases_in_the_heartbeat(
    env: ActivityEnvironment, fly: FlyClient, heartbeats: list[tuple[Any, ...]], app: str
) -> None:
    """The client's wait hook heartbeats its reason beside the progress and the nonces,
    not instead of them."""

    async def attempt() -> None:
        session = MachineSession(fly, app, ACTIVITY_TIMINGS)
        async with session.running():
            session.leases["m-gone"] = "0123456789ab"
            heartbeat_if_in_activity("429 from the Fly API, again in 2.0s")

    await env.run(attempt)
    waited = [h[0] for h in heartbeats if isinstance(h[0], dict) and "waiting" in h[0]]
    assert waited and waited[0]["leases"] == {"m-gone": "0123456789ab"}
    assert waited[0]["waiting"].startswith("429")


async def test_server_errors_are_retryable(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    credentials: CredentialStore,
    faults: Any,
    app: str,
    image: str,
) -> None:
    await credentials.fly_token()
    faults.error_rate = 1.0
    with pytest.raises(ApplicationError) as caught:
        await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-5xx"))
    assert not caught.value.non_retryable
    assert caught.value.type == "FlyRetryableError"
    assert "injected server error" in caught.value.message


async def test_invalid_machine_config_is_final(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    app: str,
    image: str,
) -> None:
    odd_memory = FLY_TOML.replace('memory = "256mb"', 'memory = "300mb"')
    with pytest.raises(ApplicationError) as caught:
        await env.run(
            rollout.roll_out, rollout_input(app, f"{image}:v1", "d-422", fly_toml=odd_memory)
        )
    err = caught.value
    assert err.type == "FlyUnprocessable" and err.non_retryable
    assert "422" in err.message and "memory" in err.message
    assert await fly.list_machines(app) == []


async def test_cancelled_rollout_releases_its_leases(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    flysim: Any,
    heartbeats: list[tuple[Any, ...]],
    app: str,
    image: str,
) -> None:
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-before"))
    heartbeats.clear()
    bad = f"{image}:hangs"
    flysim.config.unhealthy_images.add(bad)
    slow = ACTIVITY_TIMINGS.model_copy(update={"machine_wait_timeout": timedelta(minutes=5)})
    try:
        task = asyncio.create_task(
            env.run(rollout.roll_out, rollout_input(app, bad, "d-cancelled", timings=slow))
        )
        for _ in range(500):
            if heartbeats and heartbeats[-1][0]["step"] == "waiting for health checks":
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the rollout never reached the health checks")
        assert held_leases(flysim, app), "the update holds a lease while it waits"
        env.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        flysim.config.unhealthy_images.discard(bad)
    assert held_leases(flysim, app) == []


async def test_a_refresh_on_its_way_is_answered_before_the_leases_are_released(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    settings: Settings,
    credentials: CredentialStore,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    """A refresh cut short as the attempt ends could reach the API after the release and
    take the lease again, with a nonce nobody holds: the session lets it finish first."""
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-one"))
    machines = await fly.list_machines(app)
    network = _LateRefreshes(delay=0.5)
    async with FlyClient(
        settings.fly_api_base_url, credentials.fly_token, transport=network
    ) as late:

        async def attempt() -> None:
            session = MachineSession(late, app, ACTIVITY_TIMINGS)
            async with session.running():
                await session.lease_all(machines)
                await network.refresh_on_its_way.wait()

        await asyncio.wait_for(env.run(attempt), 10)
    await asyncio.sleep(0.6)  # whatever the network still carried has arrived
    assert held_leases(flysim, app) == []


async def test_a_lease_granted_after_its_request_was_cancelled_is_released(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    settings: Settings,
    credentials: CredentialStore,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    """An attempt cancelled while its lease requests are on their way: the API granted
    them, so the session waits for their nonces and releases those leases too, rather
    than leave the machines held by nobody until the leases lapse."""
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-one", machine_count=2))
    machines = await fly.list_machines(app)
    network = _SlowLeaseAnswers(delay=0.3)
    async with FlyClient(
        settings.fly_api_base_url, credentials.fly_token, transport=network
    ) as slow:

        async def attempt() -> None:
            session = MachineSession(slow, app, ACTIVITY_TIMINGS)
            async with session.running():
                leasing = asyncio.create_task(session.lease_all(machines))
                await network.granted.wait()
                leasing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await leasing

        await asyncio.wait_for(env.run(attempt), 10)
    # At once, not after the ttl (3 s): a lease left behind would still be held here.
    assert held_leases(flysim, app) == []


async def test_a_machine_whose_create_answer_was_lost_is_leased_before_it_is_used(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    settings: Settings,
    credentials: CredentialStore,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    """The create's lease came with the answer that was lost: the machine found instead is
    leased once that lease lapses, so the traffic switch to it carries a nonce."""
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-one"))
    network = _LostCreateAnswer()
    async with FlyClient(
        settings.fly_api_base_url, credentials.fly_token, transport=network
    ) as lossy:
        result = await env.run(
            RolloutActivities(lossy).roll_out,
            rollout_input(app, f"{image}:v2", "d-two", strategy=Strategy.BLUEGREEN),
        )
    assert network.lost == 1
    assert [m.action for m in result.machines] == ["created"]
    assert [m.id for m in await fly.list_machines(app)] == result.machine_ids
    assert held_leases(flysim, app) == []


async def test_leases_are_refreshed_during_a_long_wait(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-quick"))
    short_lease = ACTIVITY_TIMINGS.model_copy(update={"lease_ttl": timedelta(seconds=1)})
    timing = flysim.config.timing
    saved = timing.healthy_after
    timing.healthy_after = 2.5  # checks pass well after the 1 s lease would have expired
    try:
        task = asyncio.create_task(
            env.run(
                rollout.roll_out, rollout_input(app, f"{image}:v2", "d-slow", timings=short_lease)
            )
        )
        await asyncio.sleep(1.8)
        held = held_leases(flysim, app)
        assert len(held) == 1, "the lease lapsed while the rollout still needed it"
        result = await task
    finally:
        timing.healthy_after = saved
    assert result.machines[0].action == "updated"
    assert held_leases(flysim, app) == []


async def test_undeployable_fly_toml_is_final_before_any_change(
    env: ActivityEnvironment,
    rollout: RolloutActivities,
    fly: FlyClient,
    flysim: Any,
    app: str,
    image: str,
) -> None:
    creates = _creates(flysim)
    odd_size = FLY_TOML.replace('size = "shared-cpu-1x"', 'size = "enormous"')
    with pytest.raises(ApplicationError) as caught:
        await env.run(
            rollout.roll_out, rollout_input(app, f"{image}:v1", "d-toml", fly_toml=odd_size)
        )
    assert caught.value.type == "FlyTomlError" and caught.value.non_retryable
    assert "enormous" in caught.value.message
    assert _creates(flysim) == creates
    assert await fly.list_machines(app) == []


# ------------------------------------------------------------- failed machines, secrets


LONG_WAIT = ACTIVITY_TIMINGS.model_copy(update={"machine_wait_timeout": timedelta(minutes=2)})


async def test_machine_that_fails_to_launch_ends_the_rollout_at_once(
    env: ActivityEnvironment, rollout: RolloutActivities, fly: FlyClient, flysim: Any, app: str,
    image: str,
) -> None:  # fmt: skip
    """A machine that cannot launch is not waited on for the whole machine wait timeout:
    the rollout fails non-retryably, naming the machine and its state."""
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-good", machine_count=2))
    bad = f"{image}:no-launch"
    flysim.config.failing_images.add(bad)
    try:
        with pytest.raises(ApplicationError) as caught:
            await env.run(
                rollout.roll_out,
                rollout_input(app, bad, "d-bad", machine_count=2, timings=LONG_WAIT),
            )
    finally:
        flysim.config.failing_images.discard(bad)
    err = caught.value
    assert err.type == "MachineFailed" and err.non_retryable
    failed = next(m for m in await fly.list_machines(app) if m.image == bad)
    assert failed.state == "failed" and failed.id in err.message and "failed" in err.message
    images = sorted(m.image or "" for m in await fly.list_machines(app))
    assert images == sorted([bad, f"{image}:v1"])  # the second machine was not touched
    assert held_leases(flysim, app) == []


async def test_machine_that_crashes_after_its_start_ends_the_rollout_at_once(
    env: ActivityEnvironment, rollout: RolloutActivities, flysim: Any, app: str, image: str
) -> None:
    bad = f"{image}:crashes"
    flysim.config.crashing_images.add(bad)
    flysim.config.timing.crash_after = 0.2
    flysim.config.timing.healthy_after = 30  # it would pass its checks only long after
    try:
        with pytest.raises(ApplicationError) as caught:
            await env.run(rollout.roll_out, rollout_input(app, bad, "d-crash", timings=LONG_WAIT))
    finally:
        flysim.config.crashing_images.discard(bad)
        flysim.config.timing.crash_after = 0.0
        flysim.config.timing.healthy_after = 0.0
    assert caught.value.type == "MachineFailed" and caught.value.non_retryable
    assert "failed" in caught.value.message
    assert held_leases(flysim, app) == []


async def test_region_without_capacity_is_a_retryable_provider_error(
    env: ActivityEnvironment, rollout: RolloutActivities, flysim: Any, app: str, image: str
) -> None:
    flysim.config.full_regions.add("iad")
    try:
        with pytest.raises(ApplicationError) as caught:
            await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-full"))
    finally:
        flysim.config.full_regions.discard("iad")
    assert caught.value.type == "FlyRetryableError" and not caught.value.non_retryable
    assert "503" in caught.value.message and "capacity" in caught.value.message


async def test_machines_boot_with_the_secrets_the_deploy_set(
    env: ActivityEnvironment, rollout: RolloutActivities, fly: FlyClient, flysim: Any, app: str,
    image: str,
) -> None:  # fmt: skip
    """With secrets lagging on the hosts (the stale_secrets fault), a machine created or
    updated with the secrets version the secrets step returned still boots with them."""
    await fly.set_secrets(app, {"API_KEY": "old"})
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-one", machine_count=2))
    version = await fly.set_secrets(app, {"API_KEY": "new"})
    flysim.config.faults.stale_secrets = True
    try:
        result = await env.run(
            rollout.roll_out,
            rollout_input(
                app, f"{image}:v2", "d-two", machine_count=3, min_secrets_version=version
            ),
        )
    finally:
        flysim.config.faults.stale_secrets = False
    assert [m.action for m in result.machines].count("created") == 1
    for outcome in result.machines:
        assert flysim.machine_runtime_env(app, outcome.machine_id)["API_KEY"] == "new"


async def test_machines_carry_flyctls_release_metadata(
    env: ActivityEnvironment, rollout: RolloutActivities, fly: FlyClient, app: str, image: str
) -> None:
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-one", machine_count=2))
    first = {m.metadata["fly_release_version"] for m in await fly.list_machines(app)}
    # A repeated attempt of the same deployment keeps its number; the next one counts on.
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v1", "d-one", machine_count=2))
    again = {m.metadata["fly_release_version"] for m in await fly.list_machines(app)}
    await env.run(rollout.roll_out, rollout_input(app, f"{image}:v2", "d-two", machine_count=2))
    machines = await fly.list_machines(app)
    assert first == again == {"1"}
    assert {m.metadata["fly_release_version"] for m in machines} == {"2"}
    assert all(m.metadata["fly_flyctl_version"].endswith("+turbodeploy") for m in machines)
