"""What an operator asks the Temporal server about deploys: which are running, what a stuck
one waits for and why, and whether any worker is there to run it.

Read-only, and answered by the server alone, so it works when every worker is down.
`turbodeploy list` and `turbodeploy status` print it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
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
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionDescription

from core.contract import DEPLOY_STATUS, FLY_APP, PROJECT_ID, WORKFLOW_TYPE
from core.models import WORKFLOW_ID_PREFIX, DeployStatus


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
    """The latest deploy run of every project, the most recently started first: only
    those running now, or only those whose latest deployment has `status`, when asked.

    The visibility store lists every run of a project (one per deploy that found none
    running, one per continue-as-new), so the runs are read and each project keeps its
    latest: the status filter applies to that run alone, and a project that failed once
    and has deployed since is not listed as failed. A running run is always its project's
    latest (one run of a workflow id runs at a time), so `running` narrows the query.
    """
    clauses = [f"WorkflowType = '{WORKFLOW_TYPE}'"]
    if running:
        clauses.append("ExecutionStatus = 'Running'")
    latest: dict[str, DeploySummary] = {}
    async for execution in client.list_workflows(" AND ".join(clauses), page_size=1000):
        run = _summary(execution)
        seen = latest.get(run.workflow_id)
        if seen is None or _newer(run, seen):
            latest[run.workflow_id] = run
    # An enum member's value: only the statuses a deployment can have.
    wanted = DeployStatus(status).value if status is not None else None
    found = [d for d in latest.values() if wanted is None or d.deploy_status == wanted]
    found.sort(key=lambda d: d.started, reverse=True)
    return found[:limit]


def _summary(execution: WorkflowExecution) -> DeploySummary:
    attributes = execution.typed_search_attributes
    return DeploySummary(
        project_id=attributes.get(PROJECT_ID) or execution.id.removeprefix(WORKFLOW_ID_PREFIX),
        workflow_id=execution.id,
        run_id=execution.run_id,
        workflow_status=execution.status.name if execution.status else "UNKNOWN",
        deploy_status=attributes.get(DEPLOY_STATUS),
        fly_app=attributes.get(FLY_APP),
        started=execution.start_time,
        closed=execution.close_time,
    )


def _newer(run: DeploySummary, than: DeploySummary) -> bool:
    """Whether `run` came after `than`, two runs of one workflow id: started later, or at
    the same instant and still open."""
    return (run.started, run.closed is None) > (than.started, than.closed is None)


class PendingStep(BaseModel):
    """An activity the deploy waits for, as the server sees it: what a stuck deploy is
    stuck on, and why."""

    activity: str
    state: str  # scheduled, started, cancel_requested, paused
    attempt: int
    maximum_attempts: int  # 0: no limit but the step's own deadline
    last_failure: str | None = None
    # What the attempt last reported, as it sent it: text, or an object of fields (a
    # list when it sent several values).
    last_heartbeat: Any = None
    last_heartbeat_at: datetime | None = None
    last_started_at: datetime | None = None  # when its latest attempt started
    next_attempt_at: datetime | None = None
    worker: str | None = None  # the identity of the worker that ran the last attempt


class FailingWorkflowTask(BaseModel):
    """The run's own code keeps failing: no activity runs until a worker can run it."""

    attempt: int
    cause: str | None = None  # the server's name, e.g. "workflow_worker_unhandled_failure"
    last_failure: str | None = None
    worker: str | None = None


# A worker long-polls its queue again at least every minute or so, so one not seen for two
# is gone: the server keeps a stopped worker in a queue's poller list for minutes.
RECENT_POLL_SECONDS = 120.0


class Poller(BaseModel):
    """A worker the server saw polling, and when it last did."""

    identity: str
    kind: str  # workflow, activity
    last_seen: datetime | None


class Pollers(BaseModel):
    """Workers polling a task queue, per kind of task: those seen within `recent_seconds`
    count; `earlier` are those last seen before that, most likely stopped."""

    task_queue: str
    recent_seconds: float
    workflow: list[str]
    activity: list[str]
    earlier: list[Poller]


async def pending_steps(
    client: Client, description: WorkflowExecutionDescription
) -> list[PendingStep]:
    """The activities the run waits for, with their attempt, last failure and heartbeat."""
    steps: list[PendingStep] = []
    for pending in description.raw_description.pending_activities:
        heartbeat: Any = None
        if pending.heartbeat_details.payloads:
            values = await client.data_converter.decode(list(pending.heartbeat_details.payloads))
            heartbeat = values[0] if len(values) == 1 else values
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
                last_started_at=_time(pending, "last_started_time"),
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


async def pollers(
    client: Client, task_queue: str, *, recent_seconds: float = RECENT_POLL_SECONDS
) -> Pollers:
    """Who polls `task_queue`: with no worker on it, a deploy waits without end. A poller
    counts when the server saw it within `recent_seconds`; one it has not seen since is
    listed in `earlier`, with when it was last seen."""
    since = datetime.now(UTC) - timedelta(seconds=recent_seconds)
    found: dict[str, list[str]] = {}
    earlier: list[Poller] = []
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
        recent: set[str] = set()
        last_seen: dict[str, datetime] = {}
        for poller in response.pollers:
            seen = _time(poller, "last_access_time")
            if seen is None or seen >= since:  # no time given: it cannot be told gone
                recent.add(poller.identity)
            elif poller.identity not in last_seen or seen > last_seen[poller.identity]:
                last_seen[poller.identity] = seen
        found[kind] = sorted(recent)
        earlier += [
            Poller(identity=identity, kind=kind, last_seen=seen)
            for identity, seen in sorted(last_seen.items())
            if identity not in recent
        ]
    return Pollers(
        task_queue=task_queue,
        recent_seconds=recent_seconds,
        workflow=found["workflow"],
        activity=found["activity"],
        earlier=earlier,
    )


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
