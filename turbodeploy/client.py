"""The Python API the platform's execution handler uses to start and follow deploys.

    client = await Client.connect("localhost:7233", data_converter=pydantic_data_converter)
    handle = await start_deploy(client, DeployRequest(project_id="p1", repo_url=..., image=...))
    result = await handle.result()

The request is validated when the `DeployRequest` is built, before anything is started.
"""

from __future__ import annotations

from typing import Any

from temporalio.client import Client, WorkflowExecutionDescription, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from turbodeploy.models import DeployProgress, DeployRequest, DeployResult, workflow_id_for
from turbodeploy.settings import TASK_QUEUE
from workflows.deploy_project import DEPLOY_STATUS, FLY_APP, PROJECT_ID, DeployProjectWorkflow


class DeployError(Exception):
    """A deploy could not be started or followed."""


class DeployAlreadyRunning(DeployError):
    def __init__(self, project_id: str, run_id: str | None) -> None:
        self.project_id = project_id
        self.run_id = run_id
        super().__init__(
            f"a deploy of project {project_id} is already running "
            f"(workflow {workflow_id_for(project_id)}); follow it with "
            f"`turbodeploy status {project_id}` or cancel it with `turbodeploy cancel {project_id}`"
        )


async def start_deploy(
    client: Client,
    request: DeployRequest,
    *,
    task_queue: str = TASK_QUEUE,
    search_attributes: bool = True,
) -> WorkflowHandle[DeployProjectWorkflow, DeployResult]:
    """Start `DeployProjectWorkflow` for `request`; one deploy in flight per project.

    Raises `DeployAlreadyRunning` when the project already has a deploy in flight, and
    `DeployError` when the request cannot be deployed as given.
    """
    if request.image is None:
        raise DeployError(
            "no image given: pass a prebuilt image reference (this worker does not build "
            "from source)"
        )
    attributes = (
        TypedSearchAttributes(
            [
                SearchAttributePair(PROJECT_ID, request.project_id),
                SearchAttributePair(FLY_APP, request.app_name),
                SearchAttributePair(DEPLOY_STATUS, "deploying"),
            ]
        )
        if search_attributes
        else None
    )
    try:
        return await client.start_workflow(
            DeployProjectWorkflow.run,
            request,
            id=request.workflow_id,
            task_queue=task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            search_attributes=attributes,
            static_summary=f"Deploy {request.project_id} to Fly app {request.app_name}",
            static_details=_details(request),
        )
    except WorkflowAlreadyStartedError as exc:
        raise DeployAlreadyRunning(request.project_id, exc.run_id) from exc


def deploy_handle(
    client: Client, project_id: str, run_id: str | None = None
) -> WorkflowHandle[Any, DeployResult]:
    return client.get_workflow_handle_for(
        DeployProjectWorkflow.run, workflow_id_for(project_id), run_id=run_id
    )


async def progress(client: Client, project_id: str) -> DeployProgress:
    handle = deploy_handle(client, project_id)
    return await handle.query(DeployProjectWorkflow.progress)


async def describe(client: Client, project_id: str) -> WorkflowExecutionDescription:
    return await deploy_handle(client, project_id).describe()


async def cancel_deploy(client: Client, project_id: str) -> None:
    """Ask the running deploy to stop; it records `cancelled` and ends CANCELED."""
    await deploy_handle(client, project_id).cancel()


def _details(request: DeployRequest) -> str:
    lines = [
        f"**project** {request.project_id}",
        f"**app** {request.app_name}",
        f"**repository** {request.repo_url} @ {request.branch}",
        f"**image** {request.image or '(build from source)'}",
        f"**region** {request.region} x{request.machine_count}",
        f"**deployment** {request.deployment_id}",
    ]
    return "\n".join(lines)
