"""DeployProjectWorkflow: one Nitro.js backend onto Fly.io, one activity per step.

Deterministic code only: no I/O, no settings, no clock but `workflow.now()`. Activities are
referred to by name so that this module imports nothing with side effects.
"""

from __future__ import annotations

from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from turbodeploy.models import (
        CredentialsResult,
        DeployProgress,
        DeployRequest,
        DeployResult,
        DeployStatus,
        DeployStep,
        EnsureAppInput,
        EnsureAppResult,
        HealthCheckInput,
        HealthCheckResult,
        PrepareConfigInput,
        PrepareConfigResult,
        RecordResultInput,
        RecordStartInput,
        RecordStartResult,
        RolloutInput,
        RolloutResult,
    )
    from workflows import policies
    from workflows.policies import StepPolicy

ResultT = TypeVar("ResultT", bound=BaseModel)

PROJECT_ID = SearchAttributeKey.for_keyword("ProjectId")
FLY_APP = SearchAttributeKey.for_keyword("FlyApp")
DEPLOY_STATUS = SearchAttributeKey.for_keyword("DeployStatus")

# The steps a person sees in the progress query, in order.
STEPS: list[DeployStep] = [s for s in DeployStep if s is not DeployStep.DONE]


@workflow.defn(name="DeployProjectWorkflow")
class DeployProjectWorkflow:
    def __init__(self) -> None:
        self._request: DeployRequest | None = None
        self._step = DeployStep.RECORD_START
        self._detail = ""
        self._done: list[DeployStep] = []
        self._status = DeployStatus.DEPLOYING
        self._error: str | None = None

    @workflow.run
    async def run(self, request: DeployRequest) -> DeployResult:
        self._request = request
        info = workflow.info()

        started = await self._step_run(
            DeployStep.RECORD_START,
            "record_deploy_started",
            RecordStartInput(
                deployment_id=request.deployment_id,
                project_id=request.project_id,
                app_name=request.app_name,
                workflow_id=info.workflow_id,
                run_id=info.run_id,
                repo_url=request.repo_url,
                branch=request.branch,
                image=request.image,
            ),
            RecordStartResult,
            policies.RECORD,
            f"Record deployment {request.deployment_id} as deploying",
        )
        commit_sha: str | None = None
        machine_ids: list[str] = []
        try:
            if request.image is None:
                raise ApplicationError(
                    "no image given: building from source is not supported by this worker; "
                    "pass a prebuilt image reference",
                    type="InvalidRequest",
                    non_retryable=True,
                )
            credentials = await self._step_run(
                DeployStep.CREDENTIALS,
                "resolve_credentials",
                None,
                CredentialsResult,
                policies.CREDENTIALS,
                "Resolve Fly API token from SSM",
            )
            config = await self._step_run(
                DeployStep.FLY_CONFIG,
                "prepare_fly_config",
                PrepareConfigInput(
                    deployment_id=request.deployment_id,
                    project_id=request.project_id,
                    app_name=request.app_name,
                    repo_url=request.repo_url,
                    branch=request.branch,
                    region=request.region,
                    env=request.env,
                ),
                PrepareConfigResult,
                policies.FLY_CONFIG,
                f"Commit fly.toml to {request.repo_url}@{request.branch}",
            )
            commit_sha = config.commit_sha
            app = await self._step_run(
                DeployStep.APP,
                "ensure_fly_app",
                EnsureAppInput(
                    app_name=request.app_name,
                    org_slug=credentials.org_slug,
                    timings=request.timings,
                ),
                EnsureAppResult,
                policies.APP,
                f"Ensure Fly app {request.app_name} in org {credentials.org_slug}",
            )
            rollout = await self._step_run(
                DeployStep.ROLLOUT,
                "roll_out_release",
                RolloutInput(
                    deployment_id=request.deployment_id,
                    app_name=request.app_name,
                    image=request.image,
                    region=request.region,
                    fly_toml=config.fly_toml,
                    machine_count=request.machine_count,
                    timings=request.timings,
                ),
                RolloutResult,
                policies.rollout(request.timings, request.machine_count),
                f"Roll out {request.image} to {request.app_name}",
            )
            machine_ids = rollout.machine_ids
            health = await self._step_run(
                DeployStep.HEALTH,
                "check_app_health",
                HealthCheckInput(url=app.url, timings=request.timings),
                HealthCheckResult,
                policies.health(request.timings),
                f"Check {app.url}/api/health",
            )
            self._detail = f"healthy after {health.attempts} request(s)"
        except BaseException as err:
            cancelled = is_cancelled_exception(err)
            status = DeployStatus.CANCELLED if cancelled else DeployStatus.FAILED
            self._error = "cancelled" if cancelled else _describe(err)
            await self._finish(status, commit_sha, machine_ids)
            if cancelled:
                raise
            raise ApplicationError(
                f"deploy of {request.project_id} failed at step {self._step}: {self._error}",
                type="DeployFailed",
                non_retryable=True,
            ) from err

        await self._finish(DeployStatus.DEPLOYED, commit_sha, machine_ids)
        return DeployResult(
            deployment_id=request.deployment_id,
            project_id=request.project_id,
            app_name=request.app_name,
            url=started.url,
            status=DeployStatus.DEPLOYED,
            commit_sha=commit_sha,
            image=request.image,
            machine_ids=machine_ids,
        )

    @workflow.query(name="progress")
    def progress(self) -> DeployProgress:
        request = self._request
        return DeployProgress(
            deployment_id=request.deployment_id if request else "",
            project_id=request.project_id if request else "",
            step=self._step,
            step_index=list(DeployStep).index(self._step),
            step_count=len(STEPS),
            detail=self._detail,
            status=self._status,
            completed_steps=list(self._done),
            error=self._error,
        )

    async def _step_run(
        self,
        step: DeployStep,
        activity: str,
        arg: BaseModel | None,
        result_type: type[ResultT] | None,
        policy: StepPolicy,
        summary: str,
    ) -> ResultT:
        self._step = step
        self._detail = summary
        workflow.set_current_details(
            f"**{step}** ({STEPS.index(step) + 1}/{len(STEPS)}): {summary}"
        )
        args: list[Any] = [] if arg is None else [arg]
        result = await workflow.execute_activity(
            activity,
            args=args,
            result_type=result_type,
            start_to_close_timeout=policy.start_to_close,
            schedule_to_close_timeout=policy.schedule_to_close,
            heartbeat_timeout=policy.heartbeat,
            retry_policy=policy.retry,
            cancellation_type=policy.cancellation,
            summary=summary[:200],
        )
        self._done.append(step)
        return result  # type: ignore[no-any-return]

    async def _finish(
        self, status: DeployStatus, commit_sha: str | None, machine_ids: list[str]
    ) -> None:
        """Move the row to its final status. Runs also after a failure or a cancellation."""
        assert self._request is not None
        failed_step = self._step
        self._status = status
        await self._step_run(
            DeployStep.RECORD_RESULT,
            "record_deploy_result",
            RecordResultInput(
                deployment_id=self._request.deployment_id,
                status=status,
                commit_sha=commit_sha,
                image=self._request.image,
                machine_ids=machine_ids,
                error=self._error,
            ),
            None,
            policies.RECORD,
            f"Record deployment {self._request.deployment_id} as {status}",
        )
        if status is DeployStatus.DEPLOYED:
            self._step = DeployStep.DONE
        else:
            # Keep pointing at the step that failed: that is what a person needs to see.
            self._step = failed_step
        workflow.set_current_details(f"**{status}**" + (f": {self._error}" if self._error else ""))
        if workflow.info().typed_search_attributes.get(PROJECT_ID) is not None:
            workflow.upsert_search_attributes([DEPLOY_STATUS.value_set(str(status))])


def _describe(err: BaseException) -> str:
    """The innermost cause's message: what a person needs, without Temporal's wrapping."""
    cause: BaseException | None = err
    message = str(err)
    while cause is not None:
        if isinstance(cause, ActivityError):
            cause = cause.cause
            continue
        message = str(cause) or type(cause).__name__
        cause = cause.__cause__ if not isinstance(cause, ApplicationError) else cause.cause
    return message[:2000]
