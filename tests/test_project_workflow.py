"""One workflow per project: queueing, cancellation with cleanup, automatic and manual
rollback, retry, and what the Temporal UI shows. Real servers and the Fly emulator."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from harness import Rows, app_machines, by_deployment, fast_timings, held_leases
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import SearchAttributeKey

from core.models import (
    DeployRequest,
    DeployResult,
    DeployStatus,
    DeployStep,
    new_deployment_id,
)
from core.settings import Settings
from turbodeploy import embedded
from turbodeploy.client import (
    DeployFailed,
    cancel_deploy,
    deploy_handle,
    progress,
    retry_deploy,
    start_deploy,
    start_rollback,
)

FAST = fast_timings(
    health_deadline=timedelta(seconds=2),
    machine_wait_timeout=timedelta(seconds=3),
    app_visible_timeout=timedelta(seconds=2),
    lease_ttl=timedelta(seconds=60),
    heartbeat_timeout=timedelta(seconds=5),
)
V1 = "registry.fly.io/turbobackend-test:deployment-v1"
V2 = "registry.fly.io/turbobackend-test:deployment-v2"
BROKEN = "registry.fly.io/turbobackend-test:deployment-broken"


@pytest.fixture(autouse=True)
def _broken_is_unhealthy(calm_emulator: Any) -> None:
    calm_emulator.config.unhealthy_images.add(BROKEN)


@pytest.fixture
def request_defaults() -> Callable[[], dict[str, Any]]:
    # The deployment id chosen by the caller, as a handler that tracks its requests does.
    return lambda: {"image": V1, "timings": FAST, "deployment_id": new_deployment_id()}


Deploy = Callable[[DeployRequest], Awaitable[DeployResult]]
Rollback = Callable[..., Awaitable[DeployResult]]


@pytest.fixture
def deploy(temporal_client: Client, settings: Settings) -> Deploy:
    """Submit a request on the test's queue and wait for its result."""

    async def run(request: DeployRequest) -> DeployResult:
        handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
        return await handle.result()

    return run


@pytest.fixture
def rollback(temporal_client: Client, settings: Settings, project_id: str) -> Rollback:
    """Roll the test's project back (to a named deployment) and wait for the result."""

    async def run(to: str | None = None) -> DeployResult:
        handle = await start_rollback(
            temporal_client, project_id, to, timings=FAST, task_queue=settings.task_queue
        )
        return await handle.result()

    return run


def serving_image(flysim: Any, app: str) -> str | None:
    response = httpx.get(flysim.app_url(app) + "/api/health", timeout=10)
    return response.json().get("image") if response.status_code == 200 else None


async def images_of(settings: Settings, table: str, deployment_id: str) -> tuple[Any, Any]:
    """(image, serving_image) of a deployment's row or release, as stored."""
    assert settings.database_url
    conn = await asyncpg.connect(settings.database_url)
    try:
        row = await conn.fetchrow(
            f'SELECT image, serving_image FROM "{settings.db_schema}".{table}'
            " WHERE deployment_id = $1",
            deployment_id,
        )
    finally:
        await conn.close()
    assert row is not None, f"no {table} row for {deployment_id}"
    return row["image"], row["serving_image"]


async def wait_for_step(client: Client, project_id: str, step: DeployStep) -> None:
    for _ in range(400):
        try:
            if (await progress(client, project_id)).step == step:
                return
        except Exception:
            pass
        await asyncio.sleep(0.025)
    raise AssertionError(f"deploy never reached step {step}")


@pytest.mark.parametrize("strategy", ["rolling", "immediate", "canary", "bluegreen"])
async def test_each_strategy_rolls_out_and_rolls_back_an_unhealthy_release(
    strategy: str,
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    deploy: Deploy,
) -> None:
    await deploy(make_request(machine_count=2))
    # A healthy release rolls out with the strategy.
    good = await deploy(make_request(image=V2, strategy=strategy, machine_count=2))
    assert serving_image(flysim, good.app_name) == V2
    assert {m["config"]["image"] for m in app_machines(flysim, good.app_name)} == {V2}
    assert held_leases(flysim, good.app_name) == []
    # Deployed: what it tried is what serves.
    assert (good.image, good.serving_image) == (V2, V2)
    for table in ("project_deployments", "releases"):
        assert await images_of(settings, table, good.deployment_id) == (V2, V2)
    before = sorted(m["id"] for m in app_machines(flysim, good.app_name))

    # An unhealthy one is rolled back: the previous release serves again.
    bad = make_request(image=BROKEN, strategy=strategy, machine_count=2)
    with pytest.raises(DeployFailed) as info:
        await deploy(bad)
    assert info.value.result.status is DeployStatus.ROLLED_BACK
    assert info.value.result.error

    assert serving_image(flysim, good.app_name) == V2
    assert {m["config"]["image"] for m in app_machines(flysim, good.app_name)} == {V2}
    assert sorted(m["id"] for m in app_machines(flysim, good.app_name)) == before
    assert held_leases(flysim, good.app_name) == []
    recorded = by_deployment(await rows_of(bad.project_id))
    assert recorded[bad.deployment_id]["status"] == "rolled_back"
    assert recorded[bad.deployment_id]["error"] == info.value.result.error
    # The records name the image that failed, and the one put back that serves.
    assert (info.value.result.image, info.value.result.serving_image) == (BROKEN, V2)
    for table in ("project_deployments", "releases"):
        assert await images_of(settings, table, bad.deployment_id) == (BROKEN, V2)
    description = await deploy_handle(temporal_client, bad.project_id).describe()
    assert description.status == WorkflowExecutionStatus.FAILED


async def test_a_machine_that_fails_to_launch_is_rolled_back_at_once(
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    deploy: Deploy,
) -> None:
    """A release whose machine fails to launch is not waited on for the machine wait
    timeout (here far longer than the test): the deploy fails on it, non-retryably, and
    the previous release serves again."""
    await deploy(make_request(machine_count=2))
    crashing = f"{V2}-no-launch"
    flysim.config.failing_images.add(crashing)
    timings = FAST.model_copy(update={"machine_wait_timeout": timedelta(minutes=10)})
    try:
        with pytest.raises(DeployFailed) as info:
            await deploy(make_request(image=crashing, machine_count=2, timings=timings))
    finally:
        flysim.config.failing_images.discard(crashing)
    result = info.value.result
    assert result.status is DeployStatus.ROLLED_BACK
    assert result.error and "will not start" in result.error and "failed" in result.error
    app = result.app_name
    assert {m["config"]["image"] for m in app_machines(flysim, app)} == {V1}
    assert all(m["state"] == "started" for m in app_machines(flysim, app))
    assert held_leases(flysim, app) == []


async def test_a_failed_first_deploy_records_that_nothing_serves(
    settings: Settings,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    deploy: Deploy,
) -> None:
    bad = make_request(image=BROKEN)
    with pytest.raises(DeployFailed) as info:
        await deploy(bad)
    assert info.value.result.status is DeployStatus.FAILED
    assert app_machines(flysim, bad.app_name) == []
    assert (info.value.result.image, info.value.result.serving_image) == (BROKEN, None)
    for table in ("project_deployments", "releases"):
        assert await images_of(settings, table, bad.deployment_id) == (BROKEN, None)


async def test_manual_rollback_restores_an_older_release(
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    deploy: Deploy,
    rollback: Rollback,
) -> None:
    one = await deploy(make_request())
    two = await deploy(make_request(image=V2, env={"GREETING": "v2"}))
    assert serving_image(flysim, two.app_name) == V2

    back = await rollback()
    assert back.status is DeployStatus.DEPLOYED
    assert serving_image(flysim, one.app_name) == V1
    assert (back.image, back.serving_image) == (V1, V1)
    [machine] = app_machines(flysim, one.app_name)
    assert machine["config"]["image"] == V1
    assert "GREETING" not in machine["config"].get("env", {}), "config restored, not only image"
    assert held_leases(flysim, one.app_name) == []

    # And forward again to a named release.
    again = await rollback(two.deployment_id)
    assert again.status is DeployStatus.DEPLOYED
    assert serving_image(flysim, one.app_name) == V2
    recorded = by_deployment(await rows_of(one.project_id))
    assert [recorded[x]["status"] for x in (back.deployment_id, again.deployment_id)] == [
        "deployed",
        "deployed",
    ]


async def test_rollbacks_put_the_secrets_back(
    settings: Settings,
    ssm: Any,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    project_id: str,
    deploy: Deploy,
    rollback: Rollback,
) -> None:
    """Machines read the app's secrets when they boot, so a restored release must find the
    values it ran with, not the ones a failed or newer release set."""
    token, extra = f"/apps/{project_id}/token", f"/apps/{project_id}/extra"
    old, new = f"old-{uuid.uuid4().hex}", f"new-{uuid.uuid4().hex}"
    ssm.put_parameter(Name=token, Value=old, Type="SecureString")
    ssm.put_parameter(Name=extra, Value="extra", Type="SecureString")

    def runtime_env(app: str) -> dict[str, str]:
        [machine] = app_machines(flysim, app)
        env: dict[str, str] = flysim.machine_runtime_env(app, machine["id"])
        return env

    def secret_names(app: str) -> list[str]:
        return [s["name"] for s in flysim.snapshot()["secrets"][app]["secrets"]]

    one = await deploy(make_request(secrets={"TOKEN": token}))
    app = one.app_name
    assert runtime_env(app)["TOKEN"] == old

    # A failed release changed TOKEN and added EXTRA: both are undone before the restore.
    ssm.put_parameter(Name=token, Value=new, Type="SecureString", Overwrite=True)
    bad = make_request(image=BROKEN, secrets={"TOKEN": token, "EXTRA": extra})
    with pytest.raises(DeployFailed) as info:
        await deploy(bad)
    assert info.value.result.status is DeployStatus.ROLLED_BACK, info.value.result.error
    assert "secrets not put back" not in (info.value.result.error or "")
    assert serving_image(flysim, app) == V1
    assert runtime_env(app)["TOKEN"] == old
    assert "EXTRA" not in runtime_env(app)
    assert secret_names(app) == ["TOKEN"]

    # A healthy release takes the new value; a manual rollback puts the old one back.
    two = await deploy(make_request(image=V2, secrets={"TOKEN": token}))
    assert runtime_env(app)["TOKEN"] == new
    back = await rollback(one.deployment_id)
    assert back.status is DeployStatus.DEPLOYED
    assert serving_image(flysim, app) == V1
    assert runtime_env(app)["TOKEN"] == old
    # And forward again: the newer release's value comes back with it.
    await rollback(two.deployment_id)
    assert serving_image(flysim, app) == V2
    assert runtime_env(app)["TOKEN"] == new

    # A version SSM no longer has stops a manual rollback before any machine is touched.
    ssm.delete_parameter(Name=token)
    with pytest.raises(DeployFailed) as gone:
        await rollback(one.deployment_id)
    assert gone.value.result.status is DeployStatus.FAILED
    assert f"{token} has no version 1" in (gone.value.result.error or "")
    assert "secrets not put back" not in (gone.value.result.error or "")
    assert serving_image(flysim, app) == V2
    assert runtime_env(app)["TOKEN"] == new


async def test_a_build_and_the_flyctl_strategy_run_through_the_workflow(
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    deploy: Deploy,
) -> None:
    # No image: flyctl (the stand-in) builds the committed sha, the workflow rolls it out.
    built = await deploy(make_request(image=None))
    app = built.app_name
    assert built.image == f"registry.fly.io/{app}:{built.deployment_id}"
    assert [m["config"]["image"] for m in app_machines(flysim, app)] == [built.image]
    assert serving_image(flysim, app) == built.image

    # The whole deploy handed to flyctl, with the request's machine count kept.
    handed = await deploy(make_request(image=None, strategy="flyctl", machine_count=3))
    assert handed.image == f"registry.fly.io/{app}:{handed.deployment_id}"
    running = app_machines(flysim, app)
    assert sorted(m["id"] for m in running) == sorted(handed.machine_ids)
    assert len(running) == 3 and {m["config"]["image"] for m in running} == {handed.image}
    assert serving_image(flysim, app) == handed.image
    recorded = by_deployment(await rows_of(built.project_id))
    assert [recorded[d.deployment_id]["status"] for d in (built, handed)] == ["deployed"] * 2


async def test_the_next_run_closes_what_a_bare_terminate_left_open(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    deploy: Deploy,
) -> None:
    flysim.config.timing.start_delay = 2.0  # the rollout waits for the machine to start
    stuck = make_request()
    handle = await start_deploy(temporal_client, stuck, task_queue=settings.task_queue)
    await wait_for_step(temporal_client, stuck.project_id, DeployStep.ROLLOUT)
    # `temporal workflow terminate`: no cleanup, no record of the end.
    await handle.workflow.terminate(reason="operator")
    flysim.config.timing.start_delay = 0.0
    assert (
        by_deployment(await rows_of(stuck.project_id))[stuck.deployment_id]["status"] == "deploying"
    )

    after = await deploy(make_request(image=V2))
    recorded = by_deployment(await rows_of(stuck.project_id))
    assert recorded[after.deployment_id]["status"] == "deployed"
    left = recorded[stuck.deployment_id]
    assert left["status"] == "failed" and left["finished_at"] is not None
    assert f"its workflow run {handle.run_id} ended without recording" in left["error"]
    assert serving_image(flysim, after.app_name) == V2


async def test_cancel_with_the_temporal_cli_cleans_up(
    temporal_client: Client,
    temporal_env: Any,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    deploy: Deploy,
) -> None:
    tq = settings.task_queue
    first = await deploy(make_request())

    flysim.config.timing.start_delay = 2.0  # the rollout waits for the machine to start
    second = make_request(image=V2)
    handle = await start_deploy(temporal_client, second, task_queue=tq)
    await wait_for_step(temporal_client, second.project_id, DeployStep.ROLLOUT)
    await asyncio.sleep(0.3)
    address = temporal_client.service_client.config.target_host
    subprocess.run(
        [embedded.temporal_cli(), "workflow", "cancel", "--address", address,
         "--workflow-id", second.workflow_id],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    flysim.config.timing.start_delay = 0.0
    with pytest.raises(DeployFailed) as info:
        await handle.result()
    assert info.value.result.status is DeployStatus.CANCELLED

    description = await handle.workflow.describe()
    assert description.status == WorkflowExecutionStatus.CANCELED
    recorded = by_deployment(await rows_of(second.project_id))
    assert recorded[second.deployment_id]["status"] == "cancelled"
    assert held_leases(flysim, first.app_name) == []
    # The previous release was put back.
    assert {m["config"]["image"] for m in app_machines(flysim, first.app_name)} == {V1}


async def test_cancelled_first_deploy_leaves_nothing_running(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
) -> None:
    flysim.config.timing.start_delay = 2.0
    request = make_request(machine_count=2)
    handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    await wait_for_step(temporal_client, request.project_id, DeployStep.ROLLOUT)
    await asyncio.sleep(0.3)
    await cancel_deploy(temporal_client, request.project_id)
    flysim.config.timing.start_delay = 0.0
    with pytest.raises(DeployFailed):
        await handle.result()
    assert app_machines(flysim, request.app_name) == []
    assert held_leases(flysim, request.app_name) == []
    assert (
        by_deployment(await rows_of(request.project_id))[request.deployment_id]["status"]
        == "cancelled"
    )


async def test_concurrent_requests_queue_and_only_the_newest_runs(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
) -> None:
    flysim.config.timing.start_delay = 1.0  # the first deploy runs while the rest queue
    conflicts_before = flysim.stats.lease_conflicts
    requests = [make_request(image=f"{V1}-{i}") for i in range(10)]
    first = await start_deploy(temporal_client, requests[0], task_queue=settings.task_queue)
    await wait_for_step(temporal_client, requests[0].project_id, DeployStep.FLY_CONFIG)
    handles = [first]
    for request in requests[1:]:  # in order, so "newest" is well defined
        handles.append(await start_deploy(temporal_client, request, task_queue=settings.task_queue))
    # While the first one runs, the platform finds every waiting request as `queued`.
    waiting = {r.deployment_id for r in requests[1:]}
    seen: dict[str, str] = {}
    for _ in range(200):
        seen = {
            d: r["status"]
            for d, r in by_deployment(await rows_of(requests[0].project_id)).items()
            if d in waiting
        }
        if len(seen) == len(waiting):
            break
        await asyncio.sleep(0.02)
    assert seen == dict.fromkeys(waiting, "queued")
    assert (await progress(temporal_client, requests[0].project_id)).deployment_id == (
        requests[0].deployment_id
    )
    outcomes: list[Any] = []
    for handle in handles:
        try:
            outcomes.append(await handle.result())
        except DeployFailed as failed:
            outcomes.append(failed.result)
    statuses = [o.status for o in outcomes]
    assert statuses[0] is DeployStatus.DEPLOYED
    assert statuses[-1] is DeployStatus.DEPLOYED
    assert all(s is DeployStatus.SUPERSEDED for s in statuses[1:-1]), statuses
    assert all(requests[-1].deployment_id in (o.error or "") for o in outcomes[1:-1])

    app = requests[0].app_name
    assert {m["config"]["image"] for m in app_machines(flysim, app)} == {requests[-1].image}
    assert flysim.stats.lease_conflicts == conflicts_before, "two rollouts overlapped"
    recorded = by_deployment(await rows_of(requests[0].project_id))
    assert len(recorded) == 10
    assert {r["status"] for r in recorded.values()} == {"deployed", "superseded"}


async def test_retry_runs_the_last_request_again(
    temporal_client: Client,
    settings: Settings,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
) -> None:
    flysim.config.unhealthy_images.add(V2)
    failed_request = make_request(image=V2)
    with pytest.raises(DeployFailed):
        await (
            await start_deploy(temporal_client, failed_request, task_queue=settings.task_queue)
        ).result()
    flysim.config.unhealthy_images.discard(V2)  # the provider recovered
    retried = await (
        await retry_deploy(
            temporal_client, failed_request.project_id, task_queue=settings.task_queue
        )
    ).result()
    assert retried.status is DeployStatus.DEPLOYED
    assert retried.deployment_id != failed_request.deployment_id
    assert retried.image == V2


async def test_ui_shows_summaries_details_and_search_attributes(
    temporal_client: Client,
    settings: Settings,
    worker: None,
    make_request: Callable[..., DeployRequest],
) -> None:
    request = make_request()
    handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    await handle.result()
    description = await handle.workflow.describe()
    attributes = description.typed_search_attributes
    assert attributes.get(SearchAttributeKey.for_keyword("ProjectId")) == request.project_id
    assert attributes.get(SearchAttributeKey.for_keyword("FlyApp")) == request.app_name
    assert attributes.get(SearchAttributeKey.for_keyword("DeployStatus")) == "deployed"
    assert request.project_id in (await description.static_summary() or "")
    assert request.repo_url in (await description.static_details() or "")

    history = await handle.workflow.fetch_history()
    summaries = [
        e.user_metadata.summary.data.decode()
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert any(f"Ensure Fly app {request.app_name}" in s for s in summaries), summaries
    assert any(f"Roll out {V1} to {request.app_name}" in s for s in summaries), summaries

    found = [
        w.id
        async for w in temporal_client.list_workflows(
            f"ProjectId = '{request.project_id}' AND DeployStatus = 'deployed'"
        )
    ]
    for _ in range(50):  # visibility is eventually consistent
        if found:
            break
        await asyncio.sleep(0.1)
        found = [
            w.id
            async for w in temporal_client.list_workflows(f"ProjectId = '{request.project_id}'")
        ]
    assert found == [request.workflow_id]
