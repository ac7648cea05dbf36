"""The Python API the platform's execution handler uses to start and follow deploys.

    client = await Client.connect("localhost:7233", data_converter=pydantic_data_converter)
    handle = await start_deploy(client, DeployRequest(project_id="p1", repo_url=..., image=...))
    result = await handle.result()   # DeployResult; raises DeployFailed if it did not deploy

The request is validated when the `DeployRequest` is built, before anything is started.
Each project has one workflow, `deploy-<project_id>`, that runs its deploys one at a time:
a request made while a deploy runs waits its turn, and when several wait, only the newest
runs (the others end `superseded`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from temporalio.api.enums.v1 import (
    PendingActivityState,
    TaskQueueType,
    WorkflowTaskFailedCause,
)
from temporalio.api.failure.v1 import Failure
from temporalio.api.history.v1 import HistoryEvent
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDReusePolicy,
)
from temporalio.service import RPCError

from turbodeploy.models import (
    DeployProgress,
    DeployRequest,
    DeployResult,
    DeployStatus,
    ProjectRequest,
    RollbackRequest,
    new_deployment_id,
    workflow_id_for,
)
from turbodeploy.settings import TASK_QUEUE
from workflows.deploy_project import DEPLOY_STATUS, FLY_APP, PROJECT_ID, DeployProjectWorkflow


class DeployError(Exception):
    """A deploy could not be started or followed."""


class DeployFailed(DeployError):
    """The deploy ended without deploying: `result.status` says how, `result.error` why."""

    def __init__(self, result: DeployResult) -> None:
        self.result = result
        super().__init__(
            f"deployment {result.deployment_id} of {result.project_id} ended {result.status}"
            + (f": {result.error}" if result.error else "")
        )


@dataclass(frozen=True)
class DeployHandle:
    """One submitted deploy (or rollback) of a project."""

    client: Client
    project_id: str
    deployment_id: str
    run_id: str | None  # the run that took the request

    @property
    def workflow_id(self) -> str:
        return workflow_id_for(self.project_id)

    @property
    def workflow(self) -> WorkflowHandle[DeployProjectWorkflow, DeployResult]:
        return self.client.get_workflow_handle_for(
            DeployProjectWorkflow.run, self.workflow_id, run_id=self.run_id
        )

    async def result(self) -> DeployResult:
        """Wait for this deployment to end. Raises `DeployFailed` unless it deployed."""
        outcome = await self._outcome(self.run_id)
        if outcome is None and self.run_id is not None:
            # Carried over to a newer run by continue-as-new.
            outcome = await self._outcome(None)
        if outcome is None:
            raise DeployError(f"deployment {self.deployment_id} is not known to {self.workflow_id}")
        if outcome.status is not DeployStatus.DEPLOYED:
            raise DeployFailed(outcome)
        return outcome

    async def _outcome(self, run_id: str | None) -> DeployResult | None:
        handle = self.client.get_workflow_handle_for(
            DeployProjectWorkflow.run, self.workflow_id, run_id=run_id
        )
        try:
            result: DeployResult = await handle.execute_update(
                "wait_outcome", self.deployment_id, result_type=DeployResult
            )
            return result
        except (WorkflowUpdateFailedError, RPCError):
            # The run closed (or moved on) before answering: its query still knows.
            return await handle.query(DeployProjectWorkflow.outcome, self.deployment_id)


async def submit(
    client: Client,
    request: ProjectRequest,
    *,
    task_queue: str = TASK_QUEUE,
    search_attributes: bool = True,
) -> DeployHandle:
    """Hand `request` to its project's workflow, starting it if no deploy is running."""
    attributes = (
        TypedSearchAttributes(
            [
                SearchAttributePair(PROJECT_ID, request.project_id),
                SearchAttributePair(FLY_APP, request.app_name),
                SearchAttributePair(DEPLOY_STATUS, str(DeployStatus.DEPLOYING)),
            ]
        )
        if search_attributes
        else None
    )
    handle = await client.start_workflow(
        DeployProjectWorkflow.run,
        request,
        id=request.workflow_id,
        task_queue=task_queue,
        # If a deploy of this project is running, the request joins its queue instead.
        start_signal="submit",
        start_signal_args=[request],
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=attributes,
        static_summary=f"Deploy project {request.project_id} to Fly app {request.app_name}",
        static_details=_details(request),
    )
    return DeployHandle(client, request.project_id, request.deployment_id, handle.result_run_id)


async def start_deploy(
    client: Client,
    request: DeployRequest,
    *,
    task_queue: str = TASK_QUEUE,
    search_attributes: bool = True,
) -> DeployHandle:
    """Start deploying `request` (queued behind a running deploy of the same project);
    returns at once with a handle to follow it. The request was validated when it was built."""
    return await submit(client, request, task_queue=task_queue, search_attributes=search_attributes)


async def start_rollback(
    client: Client,
    project_id: str,
    to_deployment_id: str | None = None,
    *,
    task_queue: str = TASK_QUEUE,
    **request: Any,
) -> DeployHandle:
    """Put `project_id` back on a recorded release (default: the one before the current)."""
    rollback = RollbackRequest(project_id=project_id, to_deployment_id=to_deployment_id, **request)
    return await submit(client, rollback, task_queue=task_queue)


async def retry_deploy(
    client: Client, project_id: str, *, task_queue: str = TASK_QUEUE
) -> DeployHandle:
    """Run the project's last request again, as a new deployment."""
    last = await deploy_handle(client, project_id).query(DeployProjectWorkflow.current_request)
    if last is None:
        raise DeployError(f"no earlier request of project {project_id} to retry")
    again = last.model_copy(update={"deployment_id": new_deployment_id()})
    return await submit(client, again, task_queue=task_queue)


def deploy_handle(
    client: Client, project_id: str, run_id: str | None = None
) -> WorkflowHandle[DeployProjectWorkflow, DeployResult]:
    return client.get_workflow_handle_for(
        DeployProjectWorkflow.run, workflow_id_for(project_id), run_id=run_id
    )


async def progress(client: Client, project_id: str) -> DeployProgress:
    return await deploy_handle(client, project_id).query(DeployProjectWorkflow.progress)


async def describe(client: Client, project_id: str) -> WorkflowExecutionDescription:
    return await deploy_handle(client, project_id).describe()


class DeploySummary(BaseModel):
    """One project's deploy workflow run, as the server's visibility store lists it."""

    project_id: str
    workflow_id: str
    run_id: str
    workflow_status: str  # RUNNING, COMPLETED, FAILED, CANCELED, TERMINATED, ...
    deploy_status: str | None  # the DeployStatus search attribute: the latest deployment's
    fly_app: str | None
    started: datetime
    closed: datetime | None


async def list_deploys(
    client: Client,
    *,
    running: bool = False,
    status: DeployStatus | None = None,
    limit: int = 50,
) -> list[DeploySummary]:
    """The newest deploy runs of every project: only running ones, or only those whose
    latest deployment has `status`, when asked."""
    clauses = ["WorkflowType = 'DeployProjectWorkflow'"]
    if running:
        clauses.append("ExecutionStatus = 'Running'")
    if status is not None:
        # An enum member's value: never free text in the query.
        clauses.append(f"DeployStatus = '{DeployStatus(status).value}'")
    found: list[DeploySummary] = []
    async for execution in client.list_workflows(" AND ".join(clauses), limit=limit):
        attributes = execution.typed_search_attributes
        found.append(
            DeploySummary(
                project_id=attributes.get(PROJECT_ID) or execution.id.removeprefix("deploy-"),
                workflow_id=execution.id,
                run_id=execution.run_id,
                workflow_status=execution.status.name if execution.status else "UNKNOWN",
                deploy_status=attributes.get(DEPLOY_STATUS),
                fly_app=attributes.get(FLY_APP),
                started=execution.start_time,
                closed=execution.close_time,
            )
        )
        if len(found) >= limit:
            break
    return found


class PendingStep(BaseModel):
    """An activity the deploy waits for, as the server sees it: what a stuck deploy is
    stuck on, and why."""

    activity: str
    state: str  # scheduled, started, cancel_requested, paused
    attempt: int
    maximum_attempts: int  # 0: no limit but the step's own deadline
    last_failure: str | None = None
    last_heartbeat: str | None = None
    last_heartbeat_at: datetime | None = None
    next_attempt_at: datetime | None = None
    worker: str | None = None  # the identity of the worker that ran the last attempt


class FailingWorkflowTask(BaseModel):
    """The run's own code keeps failing: no activity runs until a worker can run it."""

    attempt: int
    cause: str | None = None  # the server's name for it, e.g. "unhandled_failure"
    last_failure: str | None = None
    worker: str | None = None


class Pollers(BaseModel):
    """Workers seen polling a task queue lately, per kind of task."""

    task_queue: str
    workflow: list[str]
    activity: list[str]


async def pending_steps(
    client: Client, description: WorkflowExecutionDescription
) -> list[PendingStep]:
    """The activities the run waits for, with their attempt, last failure and heartbeat."""
    steps: list[PendingStep] = []
    for pending in description.raw_description.pending_activities:
        heartbeat = None
        if pending.heartbeat_details.payloads:
            values = await client.data_converter.decode(list(pending.heartbeat_details.payloads))
            heartbeat = " ".join(str(v) for v in values)[:300]
        state = PendingActivityState.Name(pending.state)
        steps.append(
            PendingStep(
                activity=pending.activity_type.name,
                state=state.removeprefix("PENDING_ACTIVITY_STATE_").lower(),
                attempt=pending.attempt,
                maximum_attempts=pending.maximum_attempts,
                last_failure=_failure_text(pending.last_failure)
                if pending.HasField("last_failure")
                else None,
                last_heartbeat=heartbeat,
                last_heartbeat_at=_time(pending, "last_heartbeat_time"),
                next_attempt_at=_time(pending, "next_attempt_schedule_time"),
                worker=pending.last_worker_identity or None,
            )
        )
    return steps


async def failing_workflow_task(
    client: Client, description: WorkflowExecutionDescription
) -> FailingWorkflowTask | None:
    """The workflow task when it has failed at least once, with the last failure from the
    history; None while the run's code runs fine.

    This is the deploy that `cancel` cannot help: cleanup is workflow code too. A worker
    with code that runs it (a fixed release, or a `workflow.patched` branch) or
    `turbodeploy terminate` ends it.
    """
    raw = description.raw_description
    if not raw.HasField("pending_workflow_task") or raw.pending_workflow_task.attempt < 2:
        return None
    last: HistoryEvent | None = None
    handle = client.get_workflow_handle(description.id, run_id=description.run_id)
    async for event in handle.fetch_history_events():
        if event.HasField("workflow_task_failed_event_attributes"):
            last = event
    trouble = FailingWorkflowTask(attempt=raw.pending_workflow_task.attempt)
    if last is not None:
        failed = last.workflow_task_failed_event_attributes
        trouble.cause = (
            WorkflowTaskFailedCause.Name(failed.cause)
            .removeprefix("WORKFLOW_TASK_FAILED_CAUSE_")
            .lower()
        )
        trouble.last_failure = _failure_text(failed.failure) if failed.HasField("failure") else None
        trouble.worker = failed.identity or None
    return trouble


async def pollers(client: Client, task_queue: str) -> Pollers:
    """Who polls `task_queue`: with no worker on it, a deploy waits without end."""
    found: dict[str, list[str]] = {}
    for kind, queue_type in (
        ("workflow", TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
        ("activity", TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
    ):
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=queue_type,
            )
        )
        found[kind] = sorted({p.identity for p in response.pollers})
    return Pollers(task_queue=task_queue, workflow=found["workflow"], activity=found["activity"])


def _failure_text(failure: Failure) -> str:
    """The failure and its causes on one line, the application error type first."""
    parts: list[str] = []
    current: Failure | None = failure
    while current is not None and len(parts) < 4:
        kind = (
            current.application_failure_info.type
            if current.HasField("application_failure_info")
            else ""
        )
        message = current.message
        parts.append(message if not kind or message.startswith(kind) else f"{kind}: {message}")
        current = current.cause if current.HasField("cause") else None
    return " <- ".join(parts)[:500]


def _time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    value: datetime = getattr(message, field).ToDatetime(tzinfo=UTC)
    return value


async def terminate_deploy(client: Client, project_id: str, reason: str) -> str:
    """End the running deploy at once, without any cleanup; returns the run id.

    The last resort, for a run whose cleanup cannot run (a workflow task failing on every
    attempt): machines stay as the deploy left them and leases expire on their own. The
    caller closes the run's open records (`DeploymentStore.close_run`).
    """
    handle = deploy_handle(client, project_id)
    description = await handle.describe()
    if description.status != WorkflowExecutionStatus.RUNNING:
        raise DeployError(f"no deploy of project {project_id} is running")
    await client.get_workflow_handle(handle.id, run_id=description.run_id).terminate(reason=reason)
    return description.run_id


async def cancel_deploy(client: Client, project_id: str) -> None:
    """Stop the running deploy: the previous release is put back, queued requests are
    dropped, the records say `cancelled`, and the run ends CANCELED."""
    handle = deploy_handle(client, project_id)
    description = await handle.describe()
    if description.status != WorkflowExecutionStatus.RUNNING:
        raise DeployError(f"no deploy of project {project_id} is running")
    await handle.cancel()


def _details(request: ProjectRequest) -> str:
    if isinstance(request, RollbackRequest):
        return "\n".join(
            [
                f"**project** {request.project_id}",
                f"**app** {request.app_name}",
                f"**rollback to** {request.to_deployment_id or 'the previous release'}",
                f"**deployment** {request.deployment_id}",
            ]
        )
    lines = [
        f"**project** {request.project_id}",
        f"**app** {request.app_name}",
        f"**repository** {request.repo_url} @ {request.branch}",
        f"**image** {request.image or '(built from the repository)'}",
        f"**strategy** {request.strategy}, {request.machine_count} machine(s) in {request.region}",
        f"**deployment** {request.deployment_id}",
    ]
    if request.secrets:
        lines.append(f"**secrets** {', '.join(sorted(request.secrets))} (names only)")
    return "\n".join(lines)
