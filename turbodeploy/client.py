"""The Python API the platform's execution handler uses to start and follow deploys.

    client = await connect()   # as the worker connects: temporal.toml, TEMPORAL_* variables
    handle = await start_deploy(client, DeployRequest(project_id="p1", repo_url=..., image=...))
    result = await handle.result()   # DeployResult; raises DeployFailed if it did not deploy

The request is validated when the `DeployRequest` is built, and again by the workflow's
update validator, before anything is started. Each project has one workflow,
`deploy-<project_id>`, that runs its deploys one at a time: a request made while a deploy
runs waits its turn, and when several wait, only the newest runs (the others end
`superseded`). A request is submitted with Update-with-Start, so the handle knows at once
which deployment it became; sending it again with the same `deployment_id` makes no second
deployment. Any Temporal client can do the same (README: "Starting deploys from any
language").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    Interceptor,
    WithStartWorkflowOperation,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from core.contract import (
    CURRENT_REQUEST_QUERY,
    DEPLOY_STATUS,
    FLY_APP,
    INVALID_REQUEST,
    OUTCOME_QUERY,
    PROGRESS_QUERY,
    PROJECT_ID,
    SUBMIT_UPDATE,
    WAIT_OUTCOME_UPDATE,
    WORKFLOW_TYPE,
)
from core.models import (
    PROJECT_REQUEST,
    Accepted,
    DeployProgress,
    DeployRequest,
    DeployResult,
    DeployStatus,
    DestroyRequest,
    ProjectRequest,
    RollbackRequest,
    StartRequest,
    StopRequest,
    new_deployment_id,
    success_status,
    workflow_id_for,
)
from core.settings import TASK_QUEUE, Settings

log = logging.getLogger(__name__)


async def connect(
    settings: Settings | None = None,
    *,
    interceptors: Sequence[Interceptor] = (),
    **kwargs: Any,
) -> Client:
    """A Temporal client for this API, connected the way the worker and the CLI connect:
    the `temporal.toml` profile (`TEMPORAL_PROFILE`), the `temporal` CLI's variables
    (`TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`, `TEMPORAL_API_KEY`, `TEMPORAL_TLS*`), then
    `TURBODEPLOY_TEMPORAL_ADDRESS`/`_NAMESPACE` (see core/temporal.py). It uses the
    pydantic data converter, and traces its calls when OpenTelemetry is on. `kwargs` go
    to `Client.connect` (`identity`, `runtime`, ...)."""
    from core import temporal

    return await temporal.connect(settings or Settings(), interceptors=interceptors, **kwargs)


# How long a submit waits for a worker to accept the request before it returns anyway.
ACCEPT_TIMEOUT = timedelta(seconds=10)


class DeployError(Exception):
    """A deploy could not be started or followed."""


class RequestRejected(DeployError):
    """The workflow refused the request before anything was started or recorded."""


class DeployFailed(DeployError):
    """The deploy ended without deploying (a stop without stopping, a destroy without
    destroying): `result.status` says how, `result.error` why."""

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
    # What the request ends as when it succeeds: `deployed`, or `stopped` for a stop and
    # `destroyed` for a destroy.
    expected: DeployStatus = DeployStatus.DEPLOYED

    @property
    def workflow_id(self) -> str:
        return workflow_id_for(self.project_id)

    @property
    def workflow(self) -> WorkflowHandle[Any, DeployResult]:
        return deploy_handle(self.client, self.project_id, self.run_id)

    async def result(self) -> DeployResult:
        """Wait for this deployment to end. Raises `DeployFailed` unless it ended as
        `expected` (deployed, or stopped or destroyed for those requests)."""
        outcome = await self._outcome(self.run_id)
        if outcome is None and self.run_id is not None:
            # Carried over to a newer run by continue-as-new.
            outcome = await self._outcome(None)
        if outcome is None:
            raise DeployError(f"deployment {self.deployment_id} is not known to {self.workflow_id}")
        if outcome.status is not self.expected:
            raise DeployFailed(outcome)
        return outcome

    async def _outcome(self, run_id: str | None) -> DeployResult | None:
        handle = deploy_handle(self.client, self.project_id, run_id)
        try:
            result: DeployResult = await handle.execute_update(
                WAIT_OUTCOME_UPDATE, self.deployment_id, result_type=DeployResult
            )
            return result
        except (WorkflowUpdateFailedError, RPCError):
            # The run closed (or moved on) before answering: its query still knows.
            known: DeployResult | None = await handle.query(
                OUTCOME_QUERY, self.deployment_id, result_type=DeployResult
            )
            return known


async def submit(
    client: Client,
    request: ProjectRequest,
    *,
    task_queue: str = TASK_QUEUE,
    search_attributes: bool = True,
    accept_timeout: timedelta = ACCEPT_TIMEOUT,
) -> DeployHandle:
    """Hand `request` to its project's workflow, starting it if no deploy is running.

    Raises `RequestRejected` when the workflow refuses it. The request gets its deployment
    id here when it has none, so it is known even when no worker answers within
    `accept_timeout`: the handle is then returned anyway, the request waiting for a worker
    as the run's input (or, for a running project, in the server's update queue).
    """
    if not request.deployment_id:
        # Chosen here, not by the workflow, so that the handle knows it in every case.
        request = request.model_copy(update={"deployment_id": new_deployment_id()})
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
    start: WithStartWorkflowOperation[Any, DeployResult] = WithStartWorkflowOperation(
        WORKFLOW_TYPE,
        request,
        id=request.workflow_id,
        task_queue=task_queue,
        result_type=DeployResult,
        # If a deploy of this project is running, the request joins its queue instead.
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=attributes,
        static_summary=_summary(request),
        static_details=_details(request),
    )
    try:
        accepted: Accepted = await client.execute_update_with_start_workflow(
            SUBMIT_UPDATE,
            request,
            start_workflow_operation=start,
            # The server answers a repeat of the same update id with the first answer.
            id=f"submit-{request.deployment_id}",
            result_type=Accepted,
            rpc_timeout=accept_timeout,
        )
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type == INVALID_REQUEST:
            raise RequestRejected(cause.message) from err
        raise
    except (WorkflowUpdateRPCTimeoutOrCancelledError, RPCError) as err:
        # The operation holds the same failure for its workflow handle: read it here, so it
        # is not reported again as never retrieved.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(start.workflow_handle()), 0.1)
        if isinstance(err, RPCError) and err.status not in _UNANSWERED:
            raise
        # No worker answered in time (none polls, or all are busy). The request is safe
        # only if it is the input of the project's running run: the start is durable.
        run_id = await _running_with(client, request)
        if run_id is None:
            raise DeployError(
                f"no worker confirmed deployment {request.deployment_id} of "
                f"{request.project_id} within {accept_timeout.total_seconds():g}s (is a "
                f"worker polling {task_queue}?); submit the same request again: its "
                "deployment_id makes that safe"
            ) from None
        log.warning(
            "no worker answered deployment %s of %s within %gs; it is the input of run %s "
            "and waits for a worker (is one polling %s?)",
            request.deployment_id,
            request.project_id,
            accept_timeout.total_seconds(),
            run_id,
            task_queue,
        )
        return DeployHandle(
            client, request.project_id, request.deployment_id, run_id, success_status(request)
        )
    return DeployHandle(
        client,
        request.project_id,
        accepted.deployment_id,
        accepted.run_id,
        success_status(request),
    )


# What a submit that no worker answered in time ends with, besides the SDK's own error.
_UNANSWERED = frozenset({RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.CANCELLED})


async def _running_with(client: Client, request: ProjectRequest) -> str | None:
    """The id of the project's running run when `request` is its start input, else None.

    Read from the server (the description and the run's first event), so it needs no
    worker."""
    try:
        description = await client.get_workflow_handle(request.workflow_id).describe()
        if description.status != WorkflowExecutionStatus.RUNNING:
            return None
        run = client.get_workflow_handle(request.workflow_id, run_id=description.run_id)
        first = await anext(aiter(run.fetch_history_events()), None)
        if first is None:
            return None
        started = first.workflow_execution_started_event_attributes
        inputs = await client.data_converter.decode(started.input.payloads)
    except RPCError:
        return None
    sent = inputs[0] if inputs else None
    if isinstance(sent, dict) and sent.get("deployment_id") == request.deployment_id:
        return description.run_id
    return None


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


async def start_stop(
    client: Client, project_id: str, *, task_queue: str = TASK_QUEUE, **request: Any
) -> DeployHandle:
    """Stop every machine of the project's app (after any deploy ahead of it); the app
    keeps its release, IPs and volumes. `handle.result()` returns once it is `stopped`."""
    stop = StopRequest(project_id=project_id, **request)
    return await submit(client, stop, task_queue=task_queue)


async def start_start(
    client: Client, project_id: str, *, task_queue: str = TASK_QUEUE, **request: Any
) -> DeployHandle:
    """Start the machines of the project's stopped app again and verify its health;
    `handle.result()` returns once it is `deployed` again."""
    start = StartRequest(project_id=project_id, **request)
    return await submit(client, start, task_queue=task_queue)


async def start_destroy(
    client: Client, project_id: str, *, task_queue: str = TASK_QUEUE, **request: Any
) -> DeployHandle:
    """Remove the project's app from Fly (machines, volumes, IPs, secrets, the app).

    A deploy queued for the project is superseded and a running one is cancelled first,
    with its cleanup. The records stay. `handle.result()` returns once it is `destroyed`;
    for a project that never deployed and has no app, at once, with nothing done.
    """
    destroy = DestroyRequest(project_id=project_id, **request)
    return await submit(client, destroy, task_queue=task_queue)


async def retry_deploy(
    client: Client, project_id: str, *, task_queue: str = TASK_QUEUE
) -> DeployHandle:
    """Run the project's last request again, as a new deployment."""
    # A union has no single result type: the adapter tells a deploy from a rollback.
    answer = await deploy_handle(client, project_id).query(CURRENT_REQUEST_QUERY)
    if answer is None:
        raise DeployError(f"no earlier request of project {project_id} to retry")
    last = PROJECT_REQUEST.validate_python(answer)
    if not isinstance(last, DeployRequest | RollbackRequest):
        raise DeployError(
            f"the last request of project {project_id} was a {last.kind}, not a deploy: "
            f"run turbodeploy {last.kind} again instead"
        )
    # A new deployment, with an id of its own.
    again = last.model_copy(update={"deployment_id": ""})
    return await submit(client, again, task_queue=task_queue)


def deploy_handle(
    client: Client, project_id: str, run_id: str | None = None
) -> WorkflowHandle[Any, DeployResult]:
    return client.get_workflow_handle(
        workflow_id_for(project_id), run_id=run_id, result_type=DeployResult
    )


async def progress(client: Client, project_id: str) -> DeployProgress:
    current: DeployProgress = await deploy_handle(client, project_id).query(
        PROGRESS_QUERY, result_type=DeployProgress
    )
    return current


async def describe(client: Client, project_id: str) -> WorkflowExecutionDescription:
    return await deploy_handle(client, project_id).describe()


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


def _summary(request: ProjectRequest) -> str:
    verb = {"stop": "Stop", "start": "Start", "destroy": "Destroy"}.get(request.kind)
    if verb is not None:
        return f"{verb} Fly app {request.app_name} of project {request.project_id}"
    return f"Deploy project {request.project_id} to Fly app {request.app_name}"


def _details(request: ProjectRequest) -> str:
    if isinstance(request, StopRequest | StartRequest | DestroyRequest):
        return "\n".join(
            [
                f"**project** {request.project_id}",
                f"**app** {request.app_name}",
                f"**{request.kind}** the app",
                f"**deployment** {request.deployment_id or '(assigned when accepted)'}",
            ]
        )
    if isinstance(request, RollbackRequest):
        return "\n".join(
            [
                f"**project** {request.project_id}",
                f"**app** {request.app_name}",
                f"**rollback to** {request.to_deployment_id or 'the previous release'}",
                f"**deployment** {request.deployment_id or '(assigned when accepted)'}",
            ]
        )
    lines = [
        f"**project** {request.project_id}",
        f"**app** {request.app_name}",
        f"**repository** {request.repo_url} @ {request.branch}",
        f"**image** {request.image or '(built from the repository)'}",
        f"**strategy** {request.strategy}, {request.machine_count} machine(s) in {request.region}",
        f"**deployment** {request.deployment_id or '(assigned when accepted)'}",
    ]
    if request.secrets:
        lines.append(f"**secrets** {', '.join(sorted(request.secrets))} (names only)")
    return "\n".join(lines)
