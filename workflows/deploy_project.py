"""DeployProjectWorkflow: a project's deploys to Fly.io, one at a time, one activity per step.

Workflow id `deploy-<project_id>`: one run per project at a time. A request reaches it as
the run's input and through the `submit_request` update (update-with-start: the caller is
told at once whether it was accepted, and which deployment it became), or the older
`submit` signal. A request that arrives while a deploy runs is queued; when the running
deploy ends, the newest queued request runs next and older ones end `superseded`.

Inputs decode the same way every time (nothing is generated while decoding), and never fail
to decode: a payload that is no valid request becomes an `InvalidRequest`, which the update
validator rejects before it enters the history and which, as the run's input, ends the run
at once. A request without a deployment id gets one here, from the workflow's deterministic
clock and random; a request whose id is already known (a caller's retry) is the same
deployment, not a new one.

Deterministic code only: no I/O, no settings, no clock but `workflow.now()`. Activities are
referred to by their methods (`workflow.execute_activity_method`), so mypy checks each
step's input and result against the activity; their modules are imported passed through
the sandbox, and this module is imported only by the worker (callers use the names in
core/contract.py).
"""

from __future__ import annotations

import asyncio

from temporalio import workflow
from temporalio.exceptions import (
    ApplicationError,
    WorkflowAlreadyStartedError,
)

with workflow.unsafe.imports_passed_through():
    from activities.deployments import (
        DeploymentActivities,
        RecordResultInput,
    )
    from activities.notify import NotifyActivities, NotifyInput, NotifyResult
    from core import contract, metrics
    from core.models import (
        Accepted,
        DeploymentNotice,
        DeployProgress,
        DeployRequest,
        DeployResult,
        DeployStatus,
        DeployStep,
        DestroyRequest,
        IncomingRequest,
        InvalidRequest,
        ProjectRequest,
        RollbackRequest,
        StartRequest,
        StopRequest,
        deployment_id_at,
        success_status,
    )
    from workflows import policies
    from workflows._lifecycle import AppSaga, steps_of
    from workflows._saga import STEPS, DeploySaga, StepRunner, record_input


# Outcomes kept for the `outcome` query and `wait_outcome` update; older ones are in the
# database.
_MAX_OUTCOMES = 100


@workflow.defn(name=contract.WORKFLOW_TYPE)
class DeployProjectWorkflow:
    @workflow.init
    def __init__(self, request: IncomingRequest) -> None:
        # The start input as sent, and as accepted (with its deployment id). Signal- and
        # update-with-start deliver it a second time, to the handler, in the first
        # workflow task: that copy is the same request, even without an id.
        self._start_sent = request
        admitted = _admit(request, None)
        # The accepted start request, or why the run cannot take it.
        self._start: ProjectRequest | str = (
            admitted if isinstance(admitted, str) else _with_id(admitted)
        )
        self._start_claimable = not isinstance(admitted, str)
        self._current: ProjectRequest | None = None
        self._queue: list[ProjectRequest] = []
        self._outcomes: dict[str, DeployResult] = {}
        self._pending: set[str] = set()  # accepted here, no outcome yet
        self._run = StepRunner()
        # The running request's task, and whether a destroy cancelled it (not a person).
        self._running: asyncio.Future[tuple[DeployResult, bool]] | None = None
        self._preempted = False

    # ------------------------------------------------------------------ the run

    @workflow.run
    async def run(self, request: IncomingRequest) -> DeployResult:
        start = self._start
        if isinstance(start, str):
            # Nothing was started or written: say why, at once, and never retry.
            self._run.set_status(DeployStatus.FAILED)
            raise ApplicationError(start, type=contract.INVALID_REQUEST, non_retryable=True)
        # Signal-with-start delivers the first request twice: as input and as `submit`.
        self._queue = [r for r in self._queue if r.deployment_id != start.deployment_id]
        self._pending.add(start.deployment_id)
        current = start
        while True:
            result = await self._deploy_one(current)
            if self._preempted and workflow.cancellation_reason() is None:
                # Cancelled for the destroy queued behind it, which runs next.
                self._preempted = False
                self._run.cancel_requested = False
                self._run.cancel_reason = None
            if self._run.cancel_requested:
                # Nothing waiting behind a cancelled deploy runs; requests that arrive
                # while these records are written are cancelled too.
                while self._queue:
                    await self._close_unstarted(
                        self._queue.pop(0),
                        DeployStatus.CANCELLED,
                        "cancelled with the deploy ahead of it",
                    )
                break
            # Callers waiting on `wait_outcome` get their answers, and a request that arrived
            # meanwhile is queued (and recorded), before the run decides it is done.
            await workflow.wait_condition(workflow.all_handlers_finished)
            if not self._queue:
                break
            current = await self._take_newest()
            if workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(current)
        await workflow.wait_condition(workflow.all_handlers_finished)
        if result.status is DeployStatus.CANCELLED:
            raise asyncio.CancelledError(result.error or "cancelled")
        last = self._current
        if result.status is not success_status(last):
            if steps_of(last) is not None:
                kind = contract.APP_OPERATION_FAILED
            elif result.status is DeployStatus.ROLLED_BACK:
                kind = contract.DEPLOY_ROLLED_BACK
            else:
                kind = contract.DEPLOY_FAILED
            raise ApplicationError(
                f"deploy {result.deployment_id} of {result.project_id} ended {result.status}: "
                f"{result.error}",
                result.model_dump(mode="json"),
                type=kind,
                non_retryable=True,
            )
        return result

    @workflow.update(name=contract.SUBMIT_UPDATE)
    async def submit_request(self, request: IncomingRequest) -> Accepted:
        """Take a deploy or rollback: the one running or queued under its deployment id
        when that id is known here, else a new deployment, queued behind the running one."""
        admitted = _admit(request, self._start)
        assert not isinstance(admitted, str)  # the validator refused it
        return await self._take(admitted)

    @submit_request.validator
    def _valid_request(self, request: IncomingRequest) -> None:
        # Runs before the update enters the history: a refused request leaves no trace.
        admitted = _admit(request, self._start)
        if isinstance(admitted, str):
            raise ApplicationError(admitted, type=contract.INVALID_REQUEST, non_retryable=True)

    @workflow.signal(name=contract.SUBMIT_SIGNAL)
    async def submit(self, request: IncomingRequest) -> None:
        """Queue a deploy or rollback: `submit_request` for callers of signal-with-start.

        A signal cannot be refused: an invalid one is logged and dropped."""
        admitted = _admit(request, self._start)
        if isinstance(admitted, str):
            workflow.logger.warning("submit signal dropped: %s", admitted)
            return
        await self._take(admitted)

    async def _take(self, request: ProjectRequest) -> Accepted:
        if self._start_claimable and request == self._start_sent:
            self._start_claimable = False
            assert not isinstance(self._start, str)
            return self._accepted(self._start.deployment_id)
        if request.deployment_id in self._pending | set(self._outcomes):
            return self._accepted(request.deployment_id)
        request = _with_id(request)
        self._queue.append(request)
        self._pending.add(request.deployment_id)
        # Behind a running deploy it may wait a while: the platform finds its row meanwhile.
        # (The first request arrives before anything runs; its row is written as it starts.)
        if self._current is not None and workflow.patched("record-queued"):
            await self._record_queued(request)
        if isinstance(request, DestroyRequest):
            self._preempt_for(request)
        return self._accepted(request.deployment_id)

    def _preempt_for(self, destroy: DestroyRequest) -> None:
        """A destroy does not wait for the running request: it is cancelled, with its
        cleanup (a deploy puts the previous release back), and the destroy runs next."""
        running, current = self._running, self._current
        if running is None or running.done() or current is None:
            return
        if isinstance(current, DestroyRequest) or self._preempted:
            return
        self._preempted = True
        self._run.cancel_requested = True
        self._run.cancel_reason = f"cancelled: the app is being destroyed ({destroy.deployment_id})"
        workflow.logger.info(
            "deployment %s cancelled for destroy %s", current.deployment_id, destroy.deployment_id
        )
        running.cancel()

    def _accepted(self, deployment_id: str) -> Accepted:
        outcome = self._outcomes.get(deployment_id)
        if outcome is not None:
            status = outcome.status
        elif self._current is not None and self._current.deployment_id == deployment_id:
            status = DeployStatus.DEPLOYING
        elif any(r.deployment_id == deployment_id for r in self._queue):
            status = DeployStatus.QUEUED
        else:
            status = DeployStatus.DEPLOYING  # the start request, about to begin
        info = workflow.info()
        assert not isinstance(self._start, str)
        return Accepted(
            deployment_id=deployment_id,
            project_id=self._start.project_id,
            workflow_id=info.workflow_id,
            run_id=info.run_id,
            status=status,
        )

    @workflow.query(name=contract.PROGRESS_QUERY)
    def progress(self) -> DeployProgress:
        request = self._current
        steps = self._run.steps
        step = self._run.step
        if steps is STEPS:
            index = list(DeployStep).index(step)
        else:
            index = steps.index(step) if step in steps else len(steps)
        return DeployProgress(
            deployment_id=request.deployment_id if request else "",
            project_id=request.project_id if request else "",
            step=step,
            step_index=index,
            step_count=len(steps),
            detail=self._run.detail,
            status=self._run.status,
            completed_steps=list(self._run.done),
            error=self._run.error,
            queued=[r.deployment_id for r in self._queue],
            step_seconds=dict(self._run.seconds),
            step_started_at=self._run.started_at.get(self._run.step),
        )

    @workflow.query(name=contract.CURRENT_REQUEST_QUERY)
    def current_request(self) -> ProjectRequest | None:
        """The request running now, or the last one run: what `turbodeploy retry` repeats."""
        return self._current

    @workflow.query(name=contract.OUTCOME_QUERY)
    def outcome(self, deployment_id: str) -> DeployResult | None:
        return self._outcomes.get(deployment_id)

    # Abandoned on continue-as-new: the caller then asks the next run (see client.py).
    @workflow.update(
        name=contract.WAIT_OUTCOME_UPDATE,
        unfinished_policy=workflow.HandlerUnfinishedPolicy.ABANDON,
    )
    async def wait_outcome(self, deployment_id: str) -> DeployResult:
        """Wait until `deployment_id` (running or queued here) has ended; return its result."""
        await workflow.wait_condition(lambda: deployment_id in self._outcomes)
        return self._outcomes[deployment_id]

    @wait_outcome.validator
    def _known(self, deployment_id: str) -> None:
        if deployment_id not in self._pending and deployment_id not in self._outcomes:
            raise ValueError(f"deployment {deployment_id} is not handled by this run")

    # ------------------------------------------------------------ one deploy

    async def _deploy_one(self, request: ProjectRequest) -> DeployResult:
        self._current = request
        started_at = workflow.now()
        restart = request is self._start
        saga: DeploySaga | AppSaga
        if isinstance(request, StopRequest | StartRequest | DestroyRequest):
            saga = AppSaga(request, self._run, on_recorded=self._end_start_claim, restart=restart)
        else:
            saga = DeploySaga(
                request, self._run, on_recorded=self._end_start_claim, restart=restart
            )
        if workflow.patched("preemptible-requests"):
            # Its own task, so that a destroy can cancel it without cancelling the run.
            self._running = asyncio.ensure_future(saga.run())
            try:
                result, already_ended = await self._running
            finally:
                self._running = None
        else:
            result, already_ended = await saga.run()
        self._remember(result)
        if already_ended:
            return result
        await self._notify(request, result)
        elapsed = (workflow.now() - started_at).total_seconds()
        metrics.deploy_finished(str(result.status), elapsed)
        workflow.logger.info(
            "deployment %s ended %s after %.1fs", request.deployment_id, result.status, elapsed
        )
        return result

    def _end_start_claim(self) -> None:
        self._start_claimable = False

    # ------------------------------------------------------------ the queue

    async def _take_newest(self) -> ProjectRequest:
        """The newest queued request runs next; the ones it overtakes end `superseded`.

        A destroy is never overtaken: when requests came after it, it runs first (the
        ones before it superseded), and they wait behind it."""
        destroys = [i for i, r in enumerate(self._queue) if isinstance(r, DestroyRequest)]
        if destroys and destroys[-1] < len(self._queue) - 1:
            at = destroys[-1]
            newest = self._queue[at]
            overtaken, self._queue = self._queue[:at], self._queue[at + 1 :]
        else:
            newest = self._queue.pop()
            overtaken, self._queue = self._queue, []
        for old in overtaken:
            await self._close_unstarted(
                old, DeployStatus.SUPERSEDED, f"superseded by deployment {newest.deployment_id}"
            )
        return newest

    async def _record_queued(self, request: ProjectRequest) -> None:
        await self._run.run(
            self._run.step,
            DeploymentActivities.record_queued,
            record_input(request),
            policies.RECORD,
            f"Record deployment {request.deployment_id} of {request.project_id} as queued",
            mark_step=False,
            shielded=True,
        )

    async def _close_unstarted(
        self, request: ProjectRequest, status: DeployStatus, reason: str
    ) -> None:
        """Record a request that never ran (superseded or cancelled) with its final status."""
        started = await self._run.record_start(request, self._run.step, mark_step=False)
        if started.finished is not None:
            self._remember(started.finished)
            return
        await self._run.run(
            self._run.step,
            DeploymentActivities.record_result,
            RecordResultInput(deployment_id=request.deployment_id, status=status, error=reason),
            policies.RECORD,
            f"Record deployment {request.deployment_id} as {status}",
            mark_step=False,
            shielded=True,
        )
        result = DeployResult(
            deployment_id=request.deployment_id,
            project_id=request.project_id,
            app_name=request.app_name,
            url=started.url,
            status=status,
            image=request.image if isinstance(request, DeployRequest) else None,
            error=reason,
        )
        self._remember(result)
        await self._notify(request, result)

    # ------------------------------------------------------------ plumbing

    def _remember(self, result: DeployResult) -> None:
        self._pending.discard(result.deployment_id)
        self._outcomes[result.deployment_id] = result
        while len(self._outcomes) > _MAX_OUTCOMES:
            self._outcomes.pop(next(iter(self._outcomes)))

    async def _notify(self, request: ProjectRequest, result: DeployResult) -> None:
        """Tell the platform, durably, without holding up or failing this run.

        The delivery runs as its own workflow, abandoned by this one: its retries (for up
        to a day) never keep a deploy open, and a receiver that is down never fails one.
        """
        if not isinstance(request, DeployRequest) or request.callback_url is None:
            return
        try:
            await self._start_notifier(request.callback_url, result)
        except WorkflowAlreadyStartedError:
            # A reset re-ran this deploy's end: the first notifier already carries it.
            workflow.logger.info("notifier for %s already started", result.deployment_id)

    async def _start_notifier(self, callback_url: str, result: DeployResult) -> None:
        await workflow.start_child_workflow(
            NotifyWorkflow.run,
            NotifyInput(
                callback_url=callback_url,
                notice=DeploymentNotice(
                    deployment_id=result.deployment_id,
                    project_id=result.project_id,
                    app_name=result.app_name,
                    status=result.status,
                    url=result.url,
                    error=result.error,
                    commit_sha=result.commit_sha,
                    image=result.image,
                ),
            ),
            id=f"notify-{result.deployment_id}",
            # The notification outlives this run: a deploy never waits for the receiver.
            parent_close_policy=workflow.ParentClosePolicy.ABANDON,
            static_summary=f"Notify {callback_url} of {result.deployment_id} {result.status}",
        )


@workflow.defn(name="NotifyDeploymentWorkflow")
class NotifyWorkflow:
    """Delivers one deploy's outcome to the platform's callback URL, with retries for a day."""

    @workflow.run
    async def run(self, input: NotifyInput) -> NotifyResult:
        summary = (
            f"POST {input.notice.status} of {input.notice.deployment_id} to {input.callback_url}"
        )
        return await workflow.execute_activity_method(
            NotifyActivities.notify_deployment, input, **policies.NOTIFY.options(summary)
        )


def _admit(incoming: IncomingRequest, start: ProjectRequest | str | None) -> ProjectRequest | str:
    """The request as this run can take it, or why it cannot.

    A handler's request must be of the project the run was started for. (Compared with the
    start request rather than the workflow id, which a replay may change.)
    """
    if isinstance(incoming, InvalidRequest):
        return f"invalid request: {incoming.error}"
    if not isinstance(
        incoming, DeployRequest | RollbackRequest | StopRequest | StartRequest | DestroyRequest
    ):
        return f"invalid request: unknown kind of request {type(incoming).__name__}"
    if isinstance(start, str):
        return start
    if start is not None and incoming.project_id != start.project_id:
        return (
            f"invalid request: project {incoming.project_id} is deployed by workflow "
            f"{incoming.workflow_id}, not by {start.workflow_id}"
        )
    return incoming


def _with_id(request: ProjectRequest) -> ProjectRequest:
    """`request` with its deployment id: the caller's, or a new one that replays the same."""
    if request.deployment_id:
        return request
    millis = int(workflow.now().timestamp() * 1000)
    new_id = deployment_id_at(millis, workflow.uuid4().hex[:10])
    return request.model_copy(update={"deployment_id": new_id})
