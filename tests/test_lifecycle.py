"""A project's app after its deploys: stop, start and destroy as requests of the project's
one workflow, against the real servers and the Fly emulator."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from harness import Rows, app_machines, apps_named, by_deployment, fast_timings
from temporalio.client import Client

from core.models import DeployRequest, DeployResult, DeployStatus, DeployStep, new_deployment_id
from core.settings import Settings
from flyapi import FlyClient
from turbodeploy.client import (
    DeployFailed,
    progress,
    start_deploy,
    start_destroy,
    start_start,
    start_stop,
)

FAST = fast_timings(
    health_deadline=timedelta(seconds=3),
    machine_wait_timeout=timedelta(seconds=5),
    app_visible_timeout=timedelta(seconds=2),
    lease_ttl=timedelta(seconds=60),
    heartbeat_timeout=timedelta(seconds=5),
)
V1 = "registry.fly.io/turbobackend-test:deployment-v1"


@pytest.fixture
def request_defaults() -> Callable[[], dict[str, Any]]:
    return lambda: {"image": V1, "timings": FAST, "deployment_id": new_deployment_id()}


def health(flysim: Any, app: str) -> int:
    # No machine is woken by the proxy for a stopped app: it answers at once.
    return httpx.get(flysim.app_url(app) + "/api/health", timeout=10).status_code


def holdings(flysim: Any, app: str) -> dict[str, Any]:
    """Everything the emulator holds of `app`."""
    state = flysim.snapshot()
    return {
        "apps": [a for a in state["apps"] if a["name"] == app],
        "machines": [m for m in state["machines"] if m["app"] == app],
        "secrets": state["secrets"].get(app),
    }


async def wait_for_step(client: Client, project_id: str, step: DeployStep) -> None:
    for _ in range(600):
        try:
            if (await progress(client, project_id)).step == step:
                return
        except Exception:
            pass
        await asyncio.sleep(0.025)
    raise AssertionError(f"never reached step {step}")


async def outcome(handle: Any) -> DeployResult:
    try:
        result: DeployResult = await handle.result()
    except DeployFailed as failed:
        return failed.result
    return result


async def test_stop_then_start_keeps_the_release_and_verifies_health(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
) -> None:
    tq = settings.task_queue
    deployed = await (
        await start_deploy(temporal_client, make_request(machine_count=2), task_queue=tq)
    ).result()
    app = deployed.app_name
    ips_before = apps_named(flysim, app)[0]["ips"]
    assert health(flysim, app) == 200

    stopped = await (
        await start_stop(temporal_client, deployed.project_id, timings=FAST, task_queue=tq)
    ).result()
    assert stopped.status is DeployStatus.STOPPED
    assert sorted(stopped.machine_ids) == sorted(deployed.machine_ids)
    machines = app_machines(flysim, app)
    assert {m["state"] for m in machines} == {"stopped"}
    assert {m["config"]["image"] for m in machines} == {V1}, "the release stays"
    assert apps_named(flysim, app)[0]["ips"] == ips_before
    assert health(flysim, app) != 200, "a request does not wake a stopped app"
    assert {m["state"] for m in app_machines(flysim, app)} == {"stopped"}

    # Stopping again changes nothing and still ends stopped.
    again = await (
        await start_stop(temporal_client, deployed.project_id, timings=FAST, task_queue=tq)
    ).result()
    assert again.status is DeployStatus.STOPPED
    assert "already stopped" in (again.detail or "")

    started = await (
        await start_start(temporal_client, deployed.project_id, timings=FAST, task_queue=tq)
    ).result()
    assert started.status is DeployStatus.DEPLOYED
    assert started.serving_image == V1
    assert {m["state"] for m in app_machines(flysim, app)} == {"started"}
    assert health(flysim, app) == 200

    rows = by_deployment(await rows_of(deployed.project_id))
    assert [rows[r.deployment_id]["status"] for r in (deployed, stopped, again, started)] == [
        "deployed", "stopped", "stopped", "deployed"
    ]  # fmt: skip
    assert rows[stopped.deployment_id]["serving_image"] is None


async def test_start_of_an_app_that_was_never_deployed_fails_clearly(
    temporal_client: Client, settings: Settings, worker: None, project_id: str
) -> None:
    handle = await start_start(
        temporal_client, project_id, timings=FAST, task_queue=settings.task_queue
    )
    result = await outcome(handle)
    assert result.status is DeployStatus.FAILED
    assert "does not exist: nothing to start" in (result.error or "")


async def test_destroy_leaves_nothing_in_the_emulator_and_a_new_deploy_starts_afresh(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    fly: FlyClient,
    ssm: Any,
    project_id: str,
) -> None:
    tq = settings.task_queue
    parameter = f"/apps/{project_id}/token"
    ssm.put_parameter(Name=parameter, Value="s3cret-value", Type="SecureString")
    first = make_request(machine_count=3, secrets={"TOKEN": parameter})
    deployed = await (await start_deploy(temporal_client, first, task_queue=tq)).result()
    app = deployed.app_name
    await fly.create_volume(app, "data", "iad", 1)
    await fly.assign_ip(app, "v4")
    before = holdings(flysim, app)
    assert len(before["machines"]) == 3 and before["secrets"]
    assert len(before["apps"][0]["ips"]) == 3 and len(before["apps"][0]["volumes"]) == 1

    destroyed = await (
        await start_destroy(temporal_client, project_id, timings=FAST, task_queue=tq)
    ).result()
    assert destroyed.status is DeployStatus.DESTROYED
    assert "3 machine(s), 1 volume(s), 3 IP(s), 1 secret(s)" in (destroyed.detail or "")
    assert holdings(flysim, app) == {"apps": [], "machines": [], "secrets": None}
    assert await fly.get_app(app) is None

    rows = by_deployment(await rows_of(project_id))
    assert rows[deployed.deployment_id]["status"] == "deployed", "the history stays"
    assert rows[destroyed.deployment_id]["status"] == "destroyed"

    # Destroying again is a no-op that still records the project as destroyed.
    again = await (
        await start_destroy(temporal_client, project_id, timings=FAST, task_queue=tq)
    ).result()
    assert again.status is DeployStatus.DESTROYED
    assert "0 machine(s)" in (again.detail or "")

    # The next deploy starts from scratch: a new app, and nothing of the old release.
    fresh = await (await start_deploy(temporal_client, make_request(), task_queue=tq)).result()
    assert fresh.status is DeployStatus.DEPLOYED
    assert len(app_machines(flysim, app)) == 1
    assert health(flysim, app) == 200


async def test_destroy_of_a_project_that_never_deployed_is_a_clear_no_op(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    flysim: Any,
    project_id: str,
) -> None:
    calls = flysim.stats.total_requests
    handle = await start_destroy(
        temporal_client, project_id, timings=FAST, task_queue=settings.task_queue
    )
    result = await handle.result()
    assert result.status is DeployStatus.DESTROYED
    assert result.detail and result.detail.startswith("nothing to destroy")
    assert await rows_of(project_id) == []
    # It only looked: one GET of the app.
    assert flysim.stats.total_requests - calls == 1


async def test_destroy_cancels_a_running_deploy_with_its_cleanup_and_supersedes_a_queued_one(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    project_id: str,
) -> None:
    tq = settings.task_queue
    flysim.config.timing.start_delay = 2.0
    running = await start_deploy(temporal_client, make_request(machine_count=2), task_queue=tq)
    await wait_for_step(temporal_client, project_id, DeployStep.ROLLOUT)
    queued = await start_deploy(temporal_client, make_request(), task_queue=tq)
    destroy = await start_destroy(temporal_client, project_id, timings=FAST, task_queue=tq)
    flysim.config.timing.start_delay = 0.0

    ran, waited, destroyed = [await outcome(h) for h in (running, queued, destroy)]
    assert ran.status is DeployStatus.CANCELLED
    assert destroy.deployment_id in (ran.error or "")
    assert waited.status is DeployStatus.SUPERSEDED
    assert destroyed.status is DeployStatus.DESTROYED, destroyed.error
    app = destroyed.app_name
    assert holdings(flysim, app) == {"apps": [], "machines": [], "secrets": None}
    rows = by_deployment(await rows_of(project_id))
    assert {d: r["status"] for d, r in rows.items()} == {
        ran.deployment_id: "cancelled",
        waited.deployment_id: "superseded",
        destroyed.deployment_id: "destroyed",
    }


async def test_a_deploy_asked_for_after_a_destroy_runs_after_it(
    temporal_client: Client,
    settings: Settings,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    project_id: str,
) -> None:
    tq = settings.task_queue
    flysim.config.timing.start_delay = 1.0
    running = await start_deploy(temporal_client, make_request(), task_queue=tq)
    await wait_for_step(temporal_client, project_id, DeployStep.ROLLOUT)
    destroy = await start_destroy(temporal_client, project_id, timings=FAST, task_queue=tq)
    after = await start_deploy(temporal_client, make_request(), task_queue=tq)
    flysim.config.timing.start_delay = 0.0
    results = [await outcome(h) for h in (running, destroy, after)]
    assert [r.status for r in results] == [
        DeployStatus.CANCELLED, DeployStatus.DESTROYED, DeployStatus.DEPLOYED
    ]  # fmt: skip
    assert len(app_machines(flysim, results[2].app_name)) == 1


@pytest_asyncio.fixture
async def projects_table(settings: Settings) -> str:
    """The platform's `projects` table in the test's schema, before the worker migrates it,
    holding one project."""
    assert settings.database_url
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{settings.db_schema}"')
        await conn.execute(
            f'CREATE TABLE "{settings.db_schema}".projects (project_id VARCHAR PRIMARY KEY)'
        )
        await conn.execute(f"INSERT INTO \"{settings.db_schema}\".projects VALUES ('known')")
    finally:
        await conn.close()
    return "known"


async def test_a_deploy_of_a_project_the_platform_does_not_know_fails_before_any_side_effect(
    projects_table: str,
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    project_id: str,
) -> None:
    calls = flysim.stats.total_requests
    handle = await start_deploy(temporal_client, make_request(), task_queue=settings.task_queue)
    result = await outcome(handle)
    assert result.status is DeployStatus.FAILED
    assert f"ProjectNotRegistered: project {project_id} is not in" in (result.error or "")
    assert flysim.stats.total_requests == calls, "nothing was asked of Fly"
    assert apps_named(flysim, result.app_name) == []
    assert await rows_of(project_id) == []
