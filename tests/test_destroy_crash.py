"""A worker killed (SIGKILL) inside each step of a destroy: a fresh worker finishes it, and
the emulator holds nothing of the app afterwards.

Every Fly request is slowed down (the emulator's API latency) so that each step lasts long
enough to be seen running and killed there; the kill may land while a request is in flight,
whose answer is then lost, which is what the steps' idempotence is for.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from harness import (
    IMAGE,
    WorkerProcess,
    deploy_request,
    fast_timings,
    new_project_id,
    own_flysim,
    wait_for_activity,
    wait_for_pollers,
    worker_env,
)
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from core.models import DeployStatus
from flyapi import FlyClient
from turbodeploy.client import start_deploy, start_destroy
from turbodeploy.stack import publish_example

# Step -> the activity the kill lands in.
STEPS = {
    "machines": "destroy_fly_machines",
    "volumes": "delete_fly_volumes",
    "ips": "release_fly_ips",
    "secrets": "delete_fly_secrets",
    "app": "delete_fly_app",
}


async def _attempts(handle: Any, activity_type: str) -> int:
    """The attempt that finished `activity_type` (the started event records the last one)."""
    scheduled: dict[int, str] = {}
    attempt = 0
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            scheduled[event.event_id] = (
                event.activity_task_scheduled_event_attributes.activity_type.name
            )
        elif event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            started = event.activity_task_started_event_attributes
            if scheduled.get(started.scheduled_event_id) == activity_type:
                attempt = max(attempt, started.attempt)
    return attempt


@pytest.mark.parametrize("step", list(STEPS))
async def test_a_destroy_killed_in_each_step_is_finished_by_another_worker(
    step: str,
    temporal_client: Client,
    postgres_url: str,
    ssm_endpoint: str,
    fly_token: str,
    ssm: Any,
    tmp_path: Path,
) -> None:
    project_id = new_project_id("k")
    app = f"turbobackend-{project_id}"
    task_queue = f"kill-{step}-{uuid.uuid4().hex[:6]}"
    timings = fast_timings()
    parameter = f"/apps/{project_id}/token"
    ssm.put_parameter(Name=parameter, Value=f"v-{uuid.uuid4().hex}", Type="SecureString")
    repo = publish_example("nitro-hello", tmp_path / "repos")
    with own_flysim(fly_token) as sim:
        env = worker_env(
            temporal_address=temporal_client.service_client.config.target_host,
            task_queue=task_queue,
            database_url=postgres_url,
            db_schema=f"kill_{uuid.uuid4().hex[:8]}",
            ssm_endpoint=ssm_endpoint,
            fly_api_base_url=sim.base_url,
            app_url_template=sim.app_url_template,
            work_dir=tmp_path / "work",
        )
        workers = [WorkerProcess(env, tmp_path / "worker-1.log")]
        try:
            await wait_for_pollers(temporal_client, task_queue)
            request = deploy_request(
                project_id, repo, image=IMAGE, machine_count=2, timings=timings,
                secrets={"TOKEN": parameter},
            )  # fmt: skip
            deployed = await (
                await start_deploy(temporal_client, request, task_queue=task_queue)
            ).result()
            async with FlyClient(sim.base_url, fly_token) as fly:
                await fly.create_volume(app, "data", "iad", 1)

            sim.config.timing.api_latency = 0.25
            handle = await start_destroy(
                temporal_client, project_id, timings=timings, task_queue=task_queue
            )
            await wait_for_activity(handle.workflow, STEPS[step], timeout=60)
            workers[0].kill()
            sim.config.timing.api_latency = 0.0
            workers.append(WorkerProcess(env, tmp_path / "worker-2.log"))
            result = await handle.result()
        finally:
            for worker in workers:
                worker.stop()
        assert result.status is DeployStatus.DESTROYED, result.error
        assert deployed.status is DeployStatus.DEPLOYED
        assert await _attempts(handle.workflow, STEPS[step]) >= 2, "the kill missed the step"
        state = sim.snapshot()
        assert state["apps"] == [] and state["leases"] == []
        assert [m for m in state["machines"] if m["app"] == app] == []
        assert state["secrets"] == {}
