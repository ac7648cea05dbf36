"""A stop, start or destroy of a project's app, as the steps of its one workflow.

They run through the project's queue like deploys (deploy_project.py), so they never race
one. Each is recorded like a deploy: a row written `deploying` first and always moved to
a final status (`stopped`, `deployed` after a start, `destroyed`, or `failed` and
`cancelled` with the error). A destroy of a project that never deployed and has no Fly
app touches nothing and records nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.deployments import DeploymentActivities, RecordResultInput
    from activities.destroy import AppSurvey, DestroyActivities, DestroyInput, Removed, SurveyInput
    from activities.health import HealthActivities, HealthCheckInput
    from activities.lifecycle import AppMachinesInput, LifecycleActivities
    from activities.secrets import CredentialActivities
    from core.models import (
        AppRequest,
        DeployResult,
        DeployStatus,
        DeployStep,
        DestroyRequest,
        StartRequest,
        StopRequest,
        success_status,
    )
    from workflows import policies
    from workflows._saga import StepRunner, describe, is_failure, unrecorded

S = DeployStep
STOP_STEPS = [S.RECORD_START, S.CREDENTIALS, S.MACHINES, S.RECORD_RESULT]
START_STEPS = [S.RECORD_START, S.CREDENTIALS, S.MACHINES, S.HEALTH, S.RECORD_RESULT]
# Compute first, then storage, then addresses, then the secrets and the app itself.
DESTROY_STEPS = [
    S.RECORD_START, S.CREDENTIALS, S.MACHINES, S.VOLUMES, S.IPS, S.SECRETS, S.APP,
    S.RECORD_RESULT,
]  # fmt: skip

_TEARDOWN: list[tuple[DeployStep, Callable[[Any, DestroyInput], Awaitable[Removed]], str]] = [
    (S.MACHINES, DestroyActivities.destroy_machines, "Destroy the machines of {app}"),
    (S.VOLUMES, DestroyActivities.delete_volumes, "Delete the volumes of {app}"),
    (S.IPS, DestroyActivities.release_ips, "Release the IP addresses of {app}"),
    (S.SECRETS, DestroyActivities.delete_secrets, "Delete the secrets of {app}"),
    (S.APP, DestroyActivities.delete_app, "Delete Fly app {app}"),
]


def steps_of(request: object) -> list[DeployStep] | None:
    """The steps of an app request, in order; None for a deploy or a rollback."""
    if isinstance(request, StopRequest):
        return STOP_STEPS
    if isinstance(request, StartRequest):
        return START_STEPS
    if isinstance(request, DestroyRequest):
        return DESTROY_STEPS
    return None


class AppSaga:
    """One stop, start or destroy, to its end: `run()` returns its result, and whether it
    had ended in an earlier run (a request sent again)."""

    def __init__(
        self,
        request: AppRequest,
        run: StepRunner,
        on_recorded: Callable[[], None],
        *,
        restart: bool = False,
    ) -> None:
        self._request = request
        self._run = run
        self._on_recorded = on_recorded
        self._restart = restart
        self._done: list[str] = []  # what a destroy removed so far, for its error

    async def run(self) -> tuple[DeployResult, bool]:
        request = self._request
        self._run.begin(steps_of(request))
        self._run.set_status(DeployStatus.DEPLOYING)
        credentials = asyncio.ensure_future(
            self._run.run_no_arg(
                S.CREDENTIALS,
                CredentialActivities.resolve_credentials,
                policies.CREDENTIALS,
                "Resolve the Fly API token from SSM",
            )
        )
        if isinstance(request, DestroyRequest):
            try:
                survey = await self._survey(request)
            except BaseException as err:
                if not isinstance(err, ActivityError):
                    raise
                await _drop(credentials)
                return unrecorded(request, self._run, err), False
            if not survey.app_exists and not survey.recorded:
                # Never deployed, no app: nothing to do, and nothing to record.
                await _drop(credentials)
                return self._nothing_to_destroy(), False
        try:
            started = await self._run.record_start(
                request, S.RECORD_START, mark_step=True, restart=self._restart
            )
        except BaseException as err:
            if not isinstance(err, ActivityError):
                raise
            await _drop(credentials)
            return unrecorded(request, self._run, err), False
        self._on_recorded()
        if started.finished is not None:
            await _drop(credentials)
            self._run.detail = f"already ended {started.finished.status} in an earlier run"
            self._run.set_status(started.finished.status)
            return started.finished, True

        result = DeployResult(
            deployment_id=request.deployment_id,
            project_id=request.project_id,
            app_name=request.app_name,
            url=started.url,
            status=success_status(request),
        )
        try:
            self._run.step = S.CREDENTIALS
            await credentials
            self._run.raise_if_cancelled()
            if isinstance(request, StopRequest):
                result = await self._stop(request, result)
            elif isinstance(request, StartRequest):
                result = await self._start(request, result)
            else:
                result = await self._destroy(request, result)
        except BaseException as err:
            if not is_failure(err):
                raise
            result = self._failed(result, err)
        await self._record(result)
        return result, False

    # ------------------------------------------------------------------ the kinds

    async def _stop(self, request: StopRequest, result: DeployResult) -> DeployResult:
        app = request.app_name
        stopped = await self._run.run(
            S.MACHINES,
            LifecycleActivities.stop_machines,
            AppMachinesInput(app_name=app, timings=request.timings),
            policies.machines(request.timings),
            f"Stop every machine of {app}",
        )
        return result.model_copy(
            update={
                "image": stopped.image,
                "machine_ids": stopped.machine_ids,
                "detail": f"stopped {len(stopped.changed)} machine(s)"
                + (f", {len(stopped.unchanged)} already stopped" if stopped.unchanged else ""),
            }
        )

    async def _start(self, request: StartRequest, result: DeployResult) -> DeployResult:
        app, t = request.app_name, request.timings
        started = await self._run.run(
            S.MACHINES,
            LifecycleActivities.start_machines,
            AppMachinesInput(app_name=app, timings=t),
            policies.machines(t),
            f"Start the machines of {app}",
        )
        # Until the health check answers, nothing is known to serve.
        ids = started.machine_ids
        result = result.model_copy(update={"image": started.image, "machine_ids": ids})
        health = await self._run.run(
            S.HEALTH,
            HealthActivities.check_health,
            HealthCheckInput(url=result.url, timings=t),
            policies.health(t),
            f"Check {result.url}/api/health",
        )
        return result.model_copy(
            update={
                "serving_image": started.image,
                "detail": f"started {len(started.changed)} machine(s), healthy after "
                f"{health.attempts} request(s)",
            }
        )

    async def _destroy(self, request: DestroyRequest, result: DeployResult) -> DeployResult:
        app, t = request.app_name, request.timings
        removed: dict[DeployStep, int] = {}
        for step, activity, summary in _TEARDOWN:
            done = await self._run.run(
                step,
                activity,
                DestroyInput(app_name=app, timings=t),
                policies.teardown(t),
                summary.format(app=app),
            )
            removed[step] = len(done.removed)
            self._done.append(f"{len(done.removed)} {step}")
        return result.model_copy(
            update={
                "detail": f"destroyed {app}: {removed[S.MACHINES]} machine(s), "
                f"{removed[S.VOLUMES]} volume(s), {removed[S.IPS]} IP(s), "
                f"{removed[S.SECRETS]} secret(s)"
            }
        )

    # ------------------------------------------------------------------ plumbing

    async def _survey(self, request: DestroyRequest) -> AppSurvey:
        survey = await self._run.run(
            S.RECORD_START,
            DestroyActivities.survey,
            SurveyInput(project_id=request.project_id, app_name=request.app_name),
            policies.survey(request.timings),
            f"Look at what {request.app_name} holds before destroying it",
            mark_step=False,
            shielded=True,
        )
        self._run.detail = (
            f"{request.app_name}: {survey.summary()}" if survey.app_exists else "no Fly app"
        )
        return survey

    def _nothing_to_destroy(self) -> DeployResult:
        request = self._request
        detail = (
            f"nothing to destroy: project {request.project_id} never deployed and has no "
            f"Fly app {request.app_name}"
        )
        self._run.step = S.DONE
        self._run.detail = detail
        self._run.set_status(DeployStatus.DESTROYED)
        return DeployResult(
            deployment_id=request.deployment_id,
            project_id=request.project_id,
            app_name=request.app_name,
            url="",
            status=DeployStatus.DESTROYED,
            detail=detail,
        )

    def _failed(self, result: DeployResult, err: BaseException) -> DeployResult:
        cancelled = is_cancelled_exception(err)
        if cancelled:
            self._run.cancel_requested = True
            error = self._run.cancel_reason or "cancelled by request"
        else:
            error = f"{self._run.step}: {describe(err)}"
        if isinstance(self._request, DestroyRequest):
            so_far = ", ".join(self._done) or "nothing"
            error = f"{error}; removed so far: {so_far}; destroy again to finish"
        self._run.error = error
        status = DeployStatus.CANCELLED if cancelled else DeployStatus.FAILED
        return result.model_copy(update={"status": status, "error": error, "serving_image": None})

    async def _record(self, result: DeployResult) -> None:
        status = result.status
        self._run.status = status
        await self._run.run(
            S.RECORD_RESULT,
            DeploymentActivities.record_result,
            RecordResultInput(
                deployment_id=result.deployment_id,
                status=status,
                image=result.image,
                serving_image=result.serving_image,
                machine_ids=result.machine_ids,
                error=result.error,
            ),
            policies.RECORD,
            f"Record deployment {result.deployment_id} as {status}",
            mark_step=status is success_status(self._request),
            shielded=True,
        )
        if status is success_status(self._request):
            self._run.step = S.DONE
            self._run.detail = result.detail or str(status)
        self._run.set_status(status)
        workflow.set_current_details(
            f"**{result.deployment_id} {status}**" + (f": {result.error}" if result.error else "")
        )


async def _drop(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, ActivityError):
        await task
