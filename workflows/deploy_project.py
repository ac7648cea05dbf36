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
turbodeploy/core/contract.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
    is_cancelled_exception,
)

with workflow.unsafe.imports_passed_through():
    from pydantic import BaseModel

    from activities.app_secrets import (
        AppSecretActivities,
        AppSecretsInput,
        RestoreSecretsInput,
    )
    from activities.build import (
        BuildActivities,
        BuildInput,
        FlyctlDeployInput,
    )
    from activities.deployments import (
        DeploymentActivities,
        LoadReleaseInput,
        RecordResultInput,
        RecordStartInput,
        RecordStartResult,
    )
    from activities.fly_apps import EnsureAppInput, FlyAppActivities
    from activities.fly_config import FlyConfigActivities, PrepareConfigInput
    from activities.health import HealthActivities, HealthCheckInput, HealthCheckResult
    from activities.notify import NotifyActivities, NotifyInput, NotifyResult
    from activities.restore import ReleaseActivities, RestoreInput, SnapshotInput
    from activities.rollout import RolloutActivities, RolloutInput
    from activities.secrets import CredentialActivities, CredentialsResult
    from turbodeploy.core import metrics
    from turbodeploy.core.contract import DEPLOY_STATUS, PROJECT_ID
    from turbodeploy.core.models import (
        Accepted,
        CheckWindow,
        DeploymentNotice,
        DeployProgress,
        DeployRequest,
        DeployResult,
        DeployStatus,
        DeployStep,
        IncomingRequest,
        InvalidRequest,
        MachineOutcome,
        ProjectRequest,
        ReleaseRecord,
        ReleaseSnapshot,
        RollbackRequest,
        SecretVersion,
        Strategy,
        deployment_id_at,
    )
    from workflows import policies
    from workflows.policies import StepPolicy

ArgT = TypeVar("ArgT", bound=BaseModel)
ResultT = TypeVar("ResultT", bound=BaseModel | None)


# The steps a person sees in the progress query, in order.
STEPS: list[DeployStep] = [s for s in DeployStep if s is not DeployStep.DONE]

# Outcomes kept for the `outcome` query and `wait_outcome` update; older ones are in the
# database.
_MAX_OUTCOMES = 100

# The error type of a request refused for its content: an update rejected by its validator,
# or a run whose input is no valid request.
INVALID_REQUEST = "InvalidRequest"


@dataclass
class _Deploy:
    """What one deploy (or rollback) has done so far: enough to clean up at any point."""

    request: ProjectRequest
    strategy: Strategy
    machine_count: int
    env: dict[str, str] = field(default_factory=dict)
    url: str = ""
    checks_hint: CheckWindow | None = None  # from the project's last release
    commit_sha: str | None = None
    fly_toml: str | None = None
    image: str | None = None
    snapshot: ReleaseSnapshot | None = None  # the machines before the rollout touched them
    released: ReleaseSnapshot | None = None  # the machines as the release left them
    machines: list[MachineOutcome] = field(default_factory=list)
    image_digest: str | None = None
    secrets: list[SecretVersion] = field(default_factory=list)
    secrets_added: list[str] = field(default_factory=list)  # names the app did not have
    # The secrets of the release this deploy replaces; None when there is none.
    previous_secrets: list[SecretVersion] | None = None
    error: str | None = None


class Cancelled(Exception):
    """Raised inside the workflow after cleanup, to end the run CANCELED."""


@workflow.defn(name="DeployProjectWorkflow")
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
        self._step = DeployStep.RECORD_START
        self._detail = ""
        self._done: list[DeployStep] = []
        self._status = DeployStatus.DEPLOYING
        self._error: str | None = None
        self._cancel_requested = False

    # ------------------------------------------------------------------ the run

    @workflow.run
    async def run(self, request: IncomingRequest) -> DeployResult:
        start = self._start
        if isinstance(start, str):
            # Nothing was started or written: say why, at once, and never retry.
            self._set_status(DeployStatus.FAILED)
            raise ApplicationError(start, type=INVALID_REQUEST, non_retryable=True)
        # Signal-with-start delivers the first request twice: as input and as `submit`.
        self._queue = [r for r in self._queue if r.deployment_id != start.deployment_id]
        self._pending.add(start.deployment_id)
        current = start
        while True:
            result = await self._deploy_one(current)
            if self._cancel_requested:
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
        if result.status is not DeployStatus.DEPLOYED:
            raise ApplicationError(
                f"deploy {result.deployment_id} of {result.project_id} ended {result.status}: "
                f"{result.error}",
                result.model_dump(mode="json"),
                type="DeployRolledBack"
                if result.status is DeployStatus.ROLLED_BACK
                else "DeployFailed",
                non_retryable=True,
            )
        return result

    @workflow.update(name="submit_request")
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
            raise ApplicationError(admitted, type=INVALID_REQUEST, non_retryable=True)

    @workflow.signal(name="submit")
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
        return self._accepted(request.deployment_id)

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

    @workflow.query(name="progress")
    def progress(self) -> DeployProgress:
        request = self._current
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
            queued=[r.deployment_id for r in self._queue],
        )

    @workflow.query(name="current_request")
    def current_request(self) -> ProjectRequest | None:
        """The request running now, or the last one run: what `turbodeploy retry` repeats."""
        return self._current

    @workflow.query(name="outcome")
    def outcome(self, deployment_id: str) -> DeployResult | None:
        return self._outcomes.get(deployment_id)

    # Abandoned on continue-as-new: the caller then asks the next run (see client.py).
    @workflow.update(
        name="wait_outcome", unfinished_policy=workflow.HandlerUnfinishedPolicy.ABANDON
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
        self._step, self._detail, self._done = DeployStep.RECORD_START, "", []
        self._status, self._error = DeployStatus.DEPLOYING, None
        self._set_status(DeployStatus.DEPLOYING)
        started_at = workflow.now()
        if isinstance(request, DeployRequest):
            d = _Deploy(
                request=request,
                strategy=request.strategy,
                machine_count=request.machine_count,
                env=request.env,
                image=request.image,
            )
        else:
            d = _Deploy(request=request, strategy=Strategy.ROLLING, machine_count=1)
        # Independent of each other, so they run together: one step less to wait for.
        credentials = asyncio.ensure_future(self._credentials())
        started = await self._record_start(request, DeployStep.RECORD_START, mark_step=True)
        self._start_claimable = False
        if started.finished is not None:
            credentials.cancel()
            with contextlib.suppress(asyncio.CancelledError, ActivityError):
                await credentials
            return self._already_ended(started.finished)
        d.url, d.checks_hint = started.url, started.checks_hint
        d.previous_secrets = started.previous_secrets
        try:
            self._step = DeployStep.CREDENTIALS
            org = (await credentials).org_slug
            self._raise_if_cancelled()
            if isinstance(request, DeployRequest):
                await self._steps(d, request, org)
            else:
                await self._rollback_steps(d, request)
            status = DeployStatus.DEPLOYED
        except BaseException as err:
            if not _is_failure(err):
                raise
            status = await self._recover(d, err)

        await self._record_result(d, status)
        result = DeployResult(
            deployment_id=request.deployment_id,
            project_id=request.project_id,
            app_name=request.app_name,
            url=d.url,
            status=status,
            commit_sha=d.commit_sha,
            image=d.image,
            machine_ids=[m.machine_id for m in d.machines],
            error=d.error,
        )
        self._remember(result)
        await self._notify(request, result)
        elapsed = (workflow.now() - started_at).total_seconds()
        metrics.deploy_finished(str(status), elapsed)
        workflow.logger.info(
            "deployment %s ended %s after %.1fs", request.deployment_id, status, elapsed
        )
        return result

    def _already_ended(self, result: DeployResult) -> DeployResult:
        """A request sent again after its deployment ended (in an earlier run): its
        recorded outcome stands, and nothing is deployed, recorded or notified again."""
        workflow.logger.info(
            "deployment %s already ended %s; not deployed again",
            result.deployment_id,
            result.status,
        )
        self._step = DeployStep.DONE if result.status is DeployStatus.DEPLOYED else self._step
        self._detail = f"already ended {result.status} in an earlier run"
        self._error = result.error
        self._set_status(result.status)
        self._remember(result)
        return result

    async def _steps(self, d: _Deploy, request: DeployRequest, org_slug: str) -> None:
        """The deploy itself, in the order a person would do it by hand."""
        timings = request.timings
        config = await self._step_run(
            DeployStep.FLY_CONFIG,
            FlyConfigActivities.prepare_fly_config,
            PrepareConfigInput(
                deployment_id=request.deployment_id,
                project_id=request.project_id,
                app_name=request.app_name,
                repo_url=request.repo_url,
                branch=request.branch,
                region=request.region,
                env=request.env,
            ),
            policies.fly_config(timings),
            f"Commit fly.toml to {request.repo_url}@{request.branch}",
        )
        d.commit_sha, d.fly_toml = config.commit_sha, config.fly_toml
        await self._step_run(
            DeployStep.APP,
            FlyAppActivities.ensure_app,
            EnsureAppInput(app_name=request.app_name, org_slug=org_slug, timings=timings),
            policies.app(timings),
            f"Ensure Fly app {request.app_name} in org {org_slug}",
        )
        if request.secrets:
            secrets = await self._step_run(
                DeployStep.SECRETS,
                AppSecretActivities.set_app_secrets,
                AppSecretsInput(app_name=request.app_name, secrets=request.secrets),
                policies.secrets(timings),
                f"Set {len(request.secrets)} secret(s) on {request.app_name}: "
                + ", ".join(sorted(request.secrets)),
            )
            d.secrets, d.secrets_added = secrets.secrets, secrets.added
        if d.image is None and request.strategy is not Strategy.FLYCTL:
            built = await self._step_run(
                DeployStep.BUILD,
                BuildActivities.build_image,
                BuildInput(
                    deployment_id=request.deployment_id,
                    app_name=request.app_name,
                    repo_url=request.repo_url,
                    commit_sha=config.commit_sha,
                ),
                policies.build(timings),
                f"Build {request.app_name} at {config.commit_sha[:12]} with flyctl",
            )
            d.image = built.image
        d.snapshot = await self._snapshot(d, before_rollout=True)
        if request.strategy is Strategy.FLYCTL:
            handed = await self._step_run(
                DeployStep.ROLLOUT,
                BuildActivities.flyctl_deploy,
                FlyctlDeployInput(
                    deployment_id=request.deployment_id,
                    app_name=request.app_name,
                    repo_url=request.repo_url,
                    commit_sha=config.commit_sha,
                    image=d.image,
                    machine_count=request.machine_count,
                    timings=timings,
                ),
                policies.build(timings),
                f"flyctl deploy {request.app_name} at {config.commit_sha[:12]}",
            )
            d.image = handed.image or d.image
            d.machines = [MachineOutcome(machine_id=m, action="flyctl") for m in handed.machine_ids]
        else:
            assert d.image is not None
            rollout = await self._step_run(
                DeployStep.ROLLOUT,
                RolloutActivities.roll_out,
                RolloutInput(
                    deployment_id=request.deployment_id,
                    app_name=request.app_name,
                    image=d.image,
                    region=request.region,
                    fly_toml=config.fly_toml,
                    machine_count=request.machine_count,
                    strategy=request.strategy,
                    max_unavailable=request.max_unavailable,
                    timings=timings,
                    checks_hint=d.checks_hint,
                ),
                policies.rollout(timings, request.machine_count),
                f"Roll out {d.image} to {request.app_name} ({request.strategy}, "
                f"{request.machine_count} machine(s))",
            )
            d.machines, d.image_digest = rollout.machines, rollout.image_digest
        health = await self._verify(d)
        self._detail = f"healthy after {health.attempts} request(s)"

    async def _rollback_steps(self, d: _Deploy, request: RollbackRequest) -> None:
        """Put a recorded release back: its machines' image, config and env, verified."""
        timings = request.timings
        target = request.to_deployment_id or "the release before the current one"
        release = await self._step_run(
            DeployStep.FLY_CONFIG,
            DeploymentActivities.load_release,
            LoadReleaseInput(project_id=request.project_id, deployment_id=request.to_deployment_id),
            policies.RECORD,
            f"Load release {target} of {request.project_id}",
        )
        if release.snapshot is None or not release.snapshot.machines:
            raise ApplicationError(
                f"release {release.deployment_id} recorded no running machines to restore",
                type="ReleaseNotFound",
                non_retryable=True,
            )
        d.image, d.fly_toml, d.commit_sha = release.image, release.fly_toml, release.commit_sha
        d.image_digest, d.env = release.image_digest, release.env
        d.strategy, d.machine_count = release.strategy, len(release.snapshot.machines)
        # Before the machines: they read the app's secrets when they boot.
        current = {s.name: s for s in d.previous_secrets or []}
        changed = [s for s in release.secrets if current.get(s.name) != s]
        if changed and workflow.patched("restore-secrets"):
            await self._step_run(
                DeployStep.SECRETS,
                AppSecretActivities.restore_app_secrets,
                RestoreSecretsInput(app_name=request.app_name, secrets=changed),
                policies.secrets(timings),
                f"Put back {len(changed)} secret(s) of release {release.deployment_id} on "
                f"{request.app_name}: " + ", ".join(s.name for s in changed),
            )
        # Set only now: until here the app's secrets are the current release's.
        d.secrets = release.secrets
        d.snapshot = await self._snapshot(d, before_rollout=True)
        restored = await self._step_run(
            DeployStep.ROLLOUT,
            ReleaseActivities.restore,
            RestoreInput(
                app_name=request.app_name,
                deployment_id=request.deployment_id,
                snapshot=release.snapshot,
                reason=f"rollback to {release.deployment_id}",
                timings=timings,
            ),
            policies.restore(timings, d.machine_count),
            f"Roll {request.app_name} back to release {release.deployment_id} ({release.image})",
        )
        d.machines = [
            MachineOutcome(machine_id=m, action="restored")
            for m in restored.restored + restored.unchanged
        ]
        health = await self._verify(d)
        metrics.rollback_performed("manual")
        self._detail = (
            f"release {release.deployment_id} restored, healthy after {health.attempts} request(s)"
        )

    async def _recover(self, d: _Deploy, err: BaseException) -> DeployStatus:
        """After a failure or a cancellation: put the app back as it was, say what happened.

        Before the rollout began nothing on Fly changed for this release, so there is
        nothing to undo. After it began, the machines are put back as the snapshot shows
        them: the previous release, or nothing at all for a first deploy (no machine left
        running that costs money).
        """
        cancelled = is_cancelled_exception(err)
        if cancelled:
            self._cancel_requested = True
        failed_step = self._step
        d.error = "cancelled by request" if cancelled else f"{failed_step}: {_describe(err)}"
        self._error = d.error
        rolled_back = False
        await self._restore_secrets(d)
        if d.snapshot is not None and failed_step in (DeployStep.ROLLOUT, DeployStep.HEALTH):
            rolled_back = await self._roll_back(d)
        self._step = failed_step
        if cancelled:
            return DeployStatus.CANCELLED
        return DeployStatus.ROLLED_BACK if rolled_back else DeployStatus.FAILED

    async def _restore_secrets(self, d: _Deploy) -> None:
        """Undo what this deploy did to the app's secrets, before any machine is restored.

        A secret the last release had is set again from its parameter at that release's
        version; one this deploy added is removed. A secret that was on the app before but
        in no release (set by hand) cannot be put back, since its old value was never read.
        """
        if not d.secrets:
            return
        previous = {s.name: s for s in d.previous_secrets or []}
        restore = [previous[s.name] for s in d.secrets if previous.get(s.name, s) != s]
        remove = [n for n in d.secrets_added if n not in previous]
        if not (restore or remove) or not workflow.patched("restore-secrets"):
            return
        app = d.request.app_name
        try:
            await self._step_run(
                DeployStep.ROLLBACK,
                AppSecretActivities.restore_app_secrets,
                RestoreSecretsInput(app_name=app, secrets=restore, remove=remove),
                policies.secrets(d.request.timings),
                f"Put back the secrets of the last release on {app}: "
                + ", ".join(sorted([s.name for s in restore] + remove)),
                shielded=True,
            )
        except BaseException as err:
            if not _is_failure(err):
                raise
            d.error = f"{d.error}; secrets not put back: {_describe(err)}"

    async def _roll_back(self, d: _Deploy) -> bool:
        """Restore the snapshot; True when a previous release serves again, verified."""
        assert d.snapshot is not None
        request, timings = d.request, d.request.timings
        snapshot = d.snapshot
        try:
            restored = await self._step_run(
                DeployStep.ROLLBACK,
                ReleaseActivities.restore,
                RestoreInput(
                    app_name=request.app_name,
                    deployment_id=request.deployment_id,
                    snapshot=snapshot,
                    reason=d.error or "",
                    timings=timings,
                ),
                policies.restore(timings, max(len(snapshot.machines), d.machine_count)),
                (
                    f"Roll {request.app_name} back to {snapshot.image or 'its previous release'}"
                    if snapshot.machines
                    else f"Remove the machines of failed first deploy of {request.app_name}"
                ),
                shielded=True,
            )
        except BaseException as err:
            if not _is_failure(err):
                raise
            d.error = f"{d.error}; rollback failed: {_describe(err)}"
            return False
        d.machines = []
        if not snapshot.machines:
            d.error = f"{d.error}; removed {len(restored.destroyed)} machine(s) of the first deploy"
            return False
        try:
            await self._check_health(
                d, DeployStep.ROLLBACK, f"Check {d.url}/api/health after the rollback"
            )
        except BaseException as err:
            if not _is_failure(err):
                raise
            d.error = f"{d.error}; previous release restored but unhealthy: {_describe(err)}"
            return False
        metrics.rollback_performed("automatic")
        d.image = snapshot.image or d.image
        d.machines = [
            MachineOutcome(machine_id=m, action="restored")
            for m in restored.restored + restored.unchanged
        ]
        return True

    async def _credentials(self) -> CredentialsResult:
        return await self._step_run_no_arg(
            DeployStep.CREDENTIALS,
            CredentialActivities.resolve_credentials,
            policies.CREDENTIALS,
            "Resolve the Fly API token from SSM",
        )

    async def _check_health(self, d: _Deploy, step: DeployStep, summary: str) -> HealthCheckResult:
        timings = d.request.timings
        return await self._step_run(
            step,
            HealthActivities.check_health,
            HealthCheckInput(url=d.url, timings=timings),
            policies.health(timings),
            summary,
            # Verifying a rollback finishes even when a cancellation arrives meanwhile.
            shielded=step is DeployStep.ROLLBACK,
        )

    async def _snapshot(self, d: _Deploy, *, before_rollout: bool) -> ReleaseSnapshot:
        before = before_rollout
        when = "before the rollout" if before else "as released"
        return await self._step_run(
            # The one "as released" runs beside the health check, as part of that step.
            DeployStep.ROLLOUT if before else DeployStep.HEALTH,
            ReleaseActivities.snapshot,
            SnapshotInput(app_name=d.request.app_name),
            policies.snapshot(d.request.timings),
            f"Snapshot machines of {d.request.app_name} {when}",
            # The one taken beside the health check must not take over the current step.
            mark_step=before,
            shielded=not before,
        )

    async def _verify(self, d: _Deploy) -> HealthCheckResult:
        """The health check, with the snapshot of the release taken beside it."""
        snapshot = asyncio.ensure_future(self._snapshot(d, before_rollout=False))
        try:
            health = await self._check_health(d, DeployStep.HEALTH, f"Check {d.url}/api/health")
        except BaseException:
            # Never leave it running unobserved; its result no longer matters.
            with contextlib.suppress(Exception):
                await snapshot
            raise
        d.released = await snapshot
        return health

    async def _record_result(self, d: _Deploy, status: DeployStatus) -> None:
        """The final status, and the release bundle when the deploy reached the rollout."""
        self._status = status
        release = None
        if d.snapshot is not None and d.fly_toml is not None and d.image is not None:
            request = d.request
            release = ReleaseRecord(
                deployment_id=request.deployment_id,
                project_id=request.project_id,
                app_name=request.app_name,
                status=status,
                strategy=d.strategy,
                image=d.image,
                image_digest=d.image_digest,
                commit_sha=d.commit_sha,
                fly_toml=d.fly_toml,
                env=d.env,
                secrets=d.secrets,
                machines=d.machines,
                # What runs now: the new release, or the old one put back.
                snapshot=d.released if status is DeployStatus.DEPLOYED else d.snapshot,
            )
        await self._step_run(
            DeployStep.RECORD_RESULT,
            DeploymentActivities.record_result,
            RecordResultInput(
                deployment_id=d.request.deployment_id,
                status=status,
                commit_sha=d.commit_sha,
                image=d.image,
                machine_ids=[m.machine_id for m in d.machines],
                error=d.error,
                release=release,
            ),
            policies.RECORD,
            f"Record deployment {d.request.deployment_id} as {status}",
            mark_step=status is DeployStatus.DEPLOYED,
            shielded=True,
        )
        if status is DeployStatus.DEPLOYED:
            self._step = DeployStep.DONE
            self._detail = f"deployed {d.image} at {d.url}"
        self._set_status(status)
        workflow.set_current_details(
            f"**{d.request.deployment_id} {status}**" + (f": {d.error}" if d.error else "")
        )

    # ------------------------------------------------------------ the queue

    async def _take_newest(self) -> ProjectRequest:
        """The newest queued request runs next; the ones it overtakes end `superseded`."""
        newest = self._queue.pop()
        overtaken, self._queue = self._queue, []
        for old in overtaken:
            await self._close_unstarted(
                old, DeployStatus.SUPERSEDED, f"superseded by deployment {newest.deployment_id}"
            )
        return newest

    async def _record_start(
        self, request: ProjectRequest, step: DeployStep, *, mark_step: bool
    ) -> RecordStartResult:
        return await self._step_run(
            step,
            DeploymentActivities.record_started,
            _record_input(request),
            policies.RECORD,
            f"Record deployment {request.deployment_id} of {request.project_id} as deploying",
            mark_step=mark_step,
            shielded=True,
        )

    async def _record_queued(self, request: ProjectRequest) -> None:
        await self._step_run(
            self._step,
            DeploymentActivities.record_queued,
            _record_input(request),
            policies.RECORD,
            f"Record deployment {request.deployment_id} of {request.project_id} as queued",
            mark_step=False,
            shielded=True,
        )

    async def _close_unstarted(
        self, request: ProjectRequest, status: DeployStatus, reason: str
    ) -> None:
        """Record a request that never ran (superseded or cancelled) with its final status."""
        started = await self._record_start(request, self._step, mark_step=False)
        if started.finished is not None:
            self._remember(started.finished)
            return
        await self._step_run(
            self._step,
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

    def _raise_if_cancelled(self) -> None:
        # A cancellation that arrived during a shielded step, or while a step was finishing
        # anyway (its result wins the race), stops the deploy at the next step.
        if workflow.cancellation_reason() is not None:
            self._cancel_requested = True
        if self._cancel_requested:
            raise asyncio.CancelledError("deploy cancelled")

    def _set_status(self, status: DeployStatus) -> None:
        self._status = status
        if workflow.info().typed_search_attributes.get(PROJECT_ID) is not None:
            workflow.upsert_search_attributes([DEPLOY_STATUS.value_set(str(status))])

    async def _step_run(
        self,
        step: DeployStep,
        activity: Callable[[Any, ArgT], Awaitable[ResultT]],
        arg: ArgT,
        policy: StepPolicy,
        summary: str,
        *,
        mark_step: bool = True,
        shielded: bool = False,
    ) -> ResultT:
        """Run one activity as a step of the deploy.

        `shielded` steps (records, rollback) are not interrupted by a cancellation: they
        finish, the cancellation is remembered, and the deploy ends `cancelled` after them.
        """
        return await self._as_step(
            step,
            lambda: workflow.execute_activity_method(activity, arg, **policy.options(summary)),
            summary,
            mark_step=mark_step,
            shielded=shielded,
        )

    async def _step_run_no_arg(
        self,
        step: DeployStep,
        activity: Callable[[Any], Awaitable[ResultT]],
        policy: StepPolicy,
        summary: str,
    ) -> ResultT:
        return await self._as_step(
            step,
            lambda: workflow.execute_activity_method(activity, **policy.options(summary)),
            summary,
            mark_step=True,
            shielded=False,
        )

    async def _as_step(
        self,
        step: DeployStep,
        start: Callable[[], Awaitable[ResultT]],
        summary: str,
        *,
        mark_step: bool,
        shielded: bool,
    ) -> ResultT:
        if not shielded:
            self._raise_if_cancelled()
        if mark_step:
            self._step = step
            self._detail = summary
            workflow.set_current_details(
                f"**{step}** ({STEPS.index(step) + 1}/{len(STEPS)}): {summary}"
            )
        call = start()
        if shielded:
            task = asyncio.ensure_future(call)
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError:
                self._cancel_requested = True
                result = await task
        else:
            result = await call
        if mark_step and step not in self._done:
            self._done.append(step)
        return result


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
    if not isinstance(incoming, DeployRequest | RollbackRequest):
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


def _record_input(request: ProjectRequest) -> RecordStartInput:
    info = workflow.info()
    deploy = request if isinstance(request, DeployRequest) else None
    return RecordStartInput(
        deployment_id=request.deployment_id,
        project_id=request.project_id,
        app_name=request.app_name,
        workflow_id=info.workflow_id,
        run_id=info.run_id,
        repo_url=deploy.repo_url if deploy else None,
        branch=deploy.branch if deploy else None,
        image=deploy.image if deploy else None,
    )


def _is_failure(err: BaseException) -> bool:
    """Errors a deploy recovers from (activity failures, cancellation), not workflow bugs."""
    return isinstance(err, ActivityError | ApplicationError | ChildWorkflowError) or (
        is_cancelled_exception(err)
    )


def _describe(err: BaseException) -> str:
    """The failing activity's own message: what a person needs, without Temporal's wrapping.

    Activities word their errors for people ("SSM is unreachable reading ..."); the causes
    chained below them are library details, shown only when the activity gave no message.
    """
    cause: BaseException | None = err
    while isinstance(cause, ActivityError | ChildWorkflowError):
        cause = cause.cause
    if cause is None:
        return str(err)[:2000]
    if is_cancelled_exception(cause):
        return "cancelled"
    message = str(cause) or type(cause).__name__
    if isinstance(cause, ApplicationError) and cause.type and cause.type not in message:
        message = f"{cause.type}: {message}"
    return message[:2000]
