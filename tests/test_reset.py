"""`temporal workflow reset` after the cause of a failure is fixed: the reset run deploys
the same deployment again and its row ends true, while the same request sent again in a new
run (a caller's retry) still makes no second deployment. With the real `temporal` CLI."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from harness import deployment_rows
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.common import SearchAttributeKey

from core.models import DeployRequest, DeployStatus
from core.settings import Settings
from turbodeploy import embedded
from turbodeploy.client import DeployFailed, deploy_handle, start_deploy

BROKEN = "registry.fly.io/turbobackend-test:deployment-reset-broken"


@pytest.fixture(autouse=True)
def _broken_image(calm_emulator: Any) -> None:
    calm_emulator.config.unhealthy_images.add(BROKEN)


def _temporal(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [embedded.temporal_cli(), *args, "--address", settings.temporal_address],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_reset_after_the_fix_deploys_the_same_deployment(
    temporal_client: Client,
    settings: Settings,
    worker: None,
    calm_emulator: Any,
    project_id: str,
    make_request: Callable[..., DeployRequest],
) -> None:
    request = make_request(image=BROKEN, deployment_id=f"reset-{uuid.uuid4().hex[:8]}")
    handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    with pytest.raises(DeployFailed):
        await handle.result()
    assert settings.database_url
    [failed] = await deployment_rows(settings.database_url, settings.db_schema, project_id)
    assert failed["status"] == "failed" and failed["error"]
    first_run = (await deploy_handle(temporal_client, project_id).describe()).run_id

    # The image is fixed; the operator resets the run to its start.
    calm_emulator.config.unhealthy_images.discard(BROKEN)
    reset = await asyncio.to_thread(
        _temporal,
        settings,
        "workflow", "reset",
        "--workflow-id", request.workflow_id,
        "--type", "FirstWorkflowTask",
        "--reason", "image fixed",
    )  # fmt: skip
    assert reset.returncode == 0, reset.stdout + reset.stderr
    latest = deploy_handle(temporal_client, project_id)
    result = await asyncio.wait_for(latest.result(), 60)
    assert result.status is DeployStatus.DEPLOYED
    assert result.deployment_id == request.deployment_id
    description = await latest.describe()
    assert description.run_id != first_run
    assert description.status == WorkflowExecutionStatus.COMPLETED
    status = description.typed_search_attributes.get(SearchAttributeKey.for_keyword("DeployStatus"))
    assert status == "deployed"
    [row] = await deployment_rows(settings.database_url, settings.db_schema, project_id)
    assert row["status"] == "deployed" and row["error"] is None
    assert row["run_id"] == description.run_id and row["finished_at"] is not None

    # The same request again (the server answers its update id from the reset run, or a
    # new run finds the record): the deployment stands, nothing is redeployed.
    again = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    assert (await again.result()).status is DeployStatus.DEPLOYED
    rows = await deployment_rows(settings.database_url, settings.db_schema, project_id)
    assert [(r["deployment_id"], r["run_id"]) for r in rows] == [
        (request.deployment_id, description.run_id)
    ]


async def test_a_request_sent_again_after_a_failure_is_not_retried(
    temporal_client: Client,
    settings: Settings,
    worker: None,
    project_id: str,
    make_request: Callable[..., DeployRequest],
) -> None:
    """Only a reset re-runs a finished deployment: a retry of the same request reports it."""
    request = make_request(image=BROKEN, deployment_id=f"again-{uuid.uuid4().hex[:8]}")
    first = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    with pytest.raises(DeployFailed) as failed:
        await first.result()
    again = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    with pytest.raises(DeployFailed) as reported:
        await again.result()
    assert reported.value.result == failed.value.result
    with pytest.raises(WorkflowFailureError):
        await deploy_handle(temporal_client, project_id, again.run_id).result()
    assert settings.database_url
    rows = await deployment_rows(settings.database_url, settings.db_schema, project_id)
    assert [r["status"] for r in rows] == ["failed"]
