"""A deploy of one request as a saga: the steps in the order a person would take them,
each one activity, and on a failure or cancellation the compensation that puts the app
back as it was.

`DeployProjectWorkflow` (deploy_project.py) owns the project's queue and its handlers; it
hands each request in turn to a `DeploySaga`, which reports through the `StepRunner` that
the progress query reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    ChildWorkflowError,
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
    from activities.fly_apps import EnsureAppInput, EnsureAppResult, FlyAppActivities
    from activities.fly_config import FlyConfigActivities, PrepareConfigInput
    from activities.health import HealthActivities, HealthCheckInput, HealthCheckResult
    from activities.restore import ReleaseActivities, RestoreInput, SnapshotInput
    from activities.rollout import RolloutActivities, RolloutInput
    from activities.secrets import CredentialActivities, CredentialsResult
    from core import metrics
    from core.contract import DEPLOY_STATUS, PROJECT_ID
    from core.models import (
        CheckWindow,
        DeployRequest,
        DeployResult,
        DeployStatus,
        DeployStep,
        MachineOutcome,
        ProjectRequest,
        ReleaseRecord,
        ReleaseSnapshot,
        RollbackRequest,
        SecretVersion,
        Strategy,
    )
    from workflows import policies
    from workflows.policies import StepPolicy

ArgT = TypeVar("ArgT", bound=BaseModel)
ResultT = TypeVar("ResultT", bound=BaseModel | None)

# The steps of a deploy or a rollback a person sees in the progress query, in order.
APP_STEPS = (DeployStep.MACHINES, DeployStep.VOLUMES, DeployStep.IPS)
STEPS: list[DeployStep] = [s for s in DeployStep if s is not DeployStep.DONE and s not in APP_STEPS]


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
    image: str | None = None  # the image this deploy tries (the request's, or the one built)
    # The image serving: the last release's until this deploy changes the machines, then
    # this deploy's, the one put back, or None when nothing (or nothing known) serves.
    serving_image: str | None = None
    snapshot: ReleaseSnapshot | None = None  # the machines before the rollout touched them
    released: ReleaseSnapshot | None = None  # the machines as the release left them
    machines: list[MachineOutcome] = field(default_factory=list)
    image_digest: str | None = None
    secrets: list[SecretVersion] = field(default_factory=list)
    secrets_added: list[str] = field(default_factory=list)  # names the app did not have
    # The app's secrets version on Fly after this deploy last changed them.
    secrets_version: int | None = None
    # The secrets of the release this deploy replaces; None when there is none.
    previous_secrets: list[SecretVersion] | None = None
    error: str | None = None


class StepRunner:
    """Runs activities as the steps of a deploy, and keeps what the progress query shows:
    the current step and its detail, the steps done, the status and error, and whether a
    cancellation was asked for (remembered while a shielded step finishes)."""

    def __init__(self) -> None:
        self.cancel_requested = False
        # Why the running request was cancelled when it was not by a person: a destroy
        # that overtook it.
        self.cancel_reason: str | None = None
        self.begin()

    def begin(self, steps: list[DeployStep] | None = None) -> None:
        """A new deploy: its first step, nothing done yet (a cancellation stays asked).
        `steps`: the request's steps, in order (default: a deploy's)."""
        self.steps = STEPS if steps is None else steps
        self.step = DeployStep.RECORD_START
        self.detail = ""
        self.done: list[DeployStep] = []
        self.status = DeployStatus.DEPLOYING
        self.error: str | None = None
        # When each step of this deploy began, and how long each finished one took.
        self.started_at: dict[DeployStep, datetime] = {}
        self.seconds: dict[DeployStep, float] = {}

    def raise_if_cancelled(self) -> None:
        # A cancellation that arrived during a shielded step, or while a step was finishing
        # anyway (its result wins the race), stops the deploy at the next step.
        if workflow.cancellation_reason() is not None:
            self.cancel_requested = True
        if self.cancel_requested:
            raise asyncio.CancelledError("deploy cancelled")

    def set_status(self, status: DeployStatus) -> None:
        self.status = status
        if workflow.info().typed_search_attributes.get(PROJECT_ID) is not None:
            workflow.upsert_search_attributes([DEPLOY_STATUS.value_set(str(status))])

    async def run(
        self,
        step: DeployStep,
        activity: Callable[[Any, ArgT], Awaitable[ResultT]],
        arg: ArgT,
        policy: StepPolicy,
        summary: str,
        *,
        mark_step: bool = True,
        finishes: bool = True,
        shielded: bool = False,
    ) -> ResultT:
        """Run one activity as a step of the deploy.

        `mark_step` makes `step` the current one; `finishes` (with it) ticks the step done
        when the activity ends, which a step's first activity of several must not do.
        `shielded` steps (records, rollback) are not interrupted by a cancellation: they
        finish, the cancellation is remembered, and the deploy ends `cancelled` after them.
        """
        return await self._as_step(
            step,
            lambda: workflow.execute_activity_method(activity, arg, **policy.options(summary)),
            summary,
            mark_step=mark_step,
            finishes=finishes,
            shielded=shielded,
        )

    async def run_no_arg(
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
            finishes=True,
            shielded=False,
        )

    async def _as_step(
        self,
        step: DeployStep,
        start: Callable[[], Awaitable[ResultT]],
        summary: str,
        *,
        mark_step: bool,
        finishes: bool,
        shielded: bool,
    ) -> ResultT:
        if not shielded:
            self.raise_if_cancelled()
        if mark_step:
            self.started_at.setdefault(step, workflow.now())
            self.step = step
            self.detail = summary
            position = self.steps.index(step) + 1 if step in self.steps else len(self.steps)
            workflow.set_current_details(f"**{step}** ({position}/{len(self.steps)}): {summary}")
        call = start()
        if shielded:
            task = asyncio.ensure_future(call)
            try:
                result = await asyncio.shield(task)
            except asyncio.CancelledError:
                self.cancel_requested = True
                result = await task
        else:
            result = await call
        if mark_step and finishes and step not in self.done:
            self.done.append(step)
            began = self.started_at.get(step, workflow.now())
            self.seconds[step] = (workflow.now() - began).total_seconds()
        return result

    async def record_start(
        self, request: ProjectRequest, step: DeployStep, *, mark_step: bool, restart: bool = False
    ) -> RecordStartResult:
        return await self.run(
            step,
            DeploymentActivities.record_started,
            record_input(request, restart=restart),
            policies.RECORD,
            f"Record deployment {request.deployment_id} of {request.project_id} as deploying",
            mark_step=mark_step,
            shielded=True,
        )


class DeploySaga:
    """One deploy or rollback, step by step, and the compensation when a step fails or the
    deploy is cancelled: the app put back as it was, and the outcome recorded."""

    def __init__(
        self,
        request: DeployRequest | RollbackRequest,
        run: StepRunner,
        on_recorded: Callable[[], None],
        *,
        restart: bool = False,
    ) -> None:
        self._request = request
        self._run = run
        # A finished deployment may start again only as the input of a reset run.
        self._restart = restart
        # Called once the deployment's row is written: the first result of the run.
        self._on_recorded = on_recorded

    async def run(self) -> tuple[DeployResult, bool]:
        """The deploy, to its end: its result, and whether it had ended in an earlier run."""
        request = self._request
        self._run.begin()
        self._run.set_status(DeployStatus.DEPLOYING)
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
        try:
            started = await self._run.record_start(
                request, DeployStep.RECORD_START, mark_step=True, restart=self._restart
            )
        except BaseException as err:
            # The records refuse the deployment (a project the platform does not know):
            # nothing was written or touched, and the run says why.
            if not isinstance(err, ActivityError) or not workflow.patched("unrecorded-failure"):
                raise
            credentials.cancel()
            with contextlib.suppress(asyncio.CancelledError, ActivityError):
                await credentials
            return unrecorded(request, self._run, err), False
        self._on_recorded()
        if started.finished is not None:
            credentials.cancel()
            with contextlib.suppress(asyncio.CancelledError, ActivityError):
                await credentials
            return self._already_ended(started.finished), True
        d.url, d.checks_hint = started.url, started.checks_hint
        d.previous_secrets = started.previous_secrets
        d.serving_image = started.previous_image
        try:
            self._run.step = DeployStep.CREDENTIALS
            org = (await credentials).org_slug
            self._run.raise_if_cancelled()
            if isinstance(request, DeployRequest):
                await self._deploy_steps(d, request, org)
            else:
                await self._rollback_request_steps(d, request)
            status = DeployStatus.DEPLOYED
            d.serving_image = d.image
        except BaseException as err:
            if not is_failure(err):
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
            serving_image=d.serving_image,
            machine_ids=[m.machine_id for m in d.machines],
            error=d.error,
        )
        return result, False

    def _already_ended(self, result: DeployResult) -> DeployResult:
        """A request sent again after its deployment ended (in an earlier run): its
        recorded outcome stands, and nothing is deployed, recorded or notified again."""
        workflow.logger.info(
            "deployment %s already ended %s; not deployed again",
            result.deployment_id,
            result.status,
        )
        if result.status is DeployStatus.DEPLOYED:
            self._run.step = DeployStep.DONE
        self._run.detail = f"already ended {result.status} in an earlier run"
        self._run.error = result.error
        self._run.set_status(result.status)
        return result

    async def _deploy_steps(self, d: _Deploy, request: DeployRequest, org_slug: str) -> None:
        """The deploy itself, in the order a person would do it by hand."""
        timings = request.timings
        config = await self._run.run(
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
                strategy=request.strategy,
            ),
            policies.fly_config(timings),
            f"Commit fly.toml to {request.repo_url}@{request.branch}",
        )
        d.commit_sha, d.fly_toml = config.commit_sha, config.fly_toml
        # An app the last release was deployed to exists in our organisation with its
        # IPs: when nothing needs it before the snapshot, the snapshot's listing is the
        # look-up (a 404 there, and the app is ensured after all).
        known_app = (
            d.serving_image is not None
            and not request.secrets
            and d.image is not None
            and request.strategy is not Strategy.FLYCTL
            and workflow.patched("fewer-fly-requests")
        )
        created = False
        if known_app:
            self._run.done.append(DeployStep.APP)
        else:
            app = await self._ensure_app(request, org_slug)
            created = app.created and workflow.patched("fewer-fly-requests")
        if request.secrets:
            secrets = await self._run.run(
                DeployStep.SECRETS,
                AppSecretActivities.set_app_secrets,
                AppSecretsInput(app_name=request.app_name, secrets=request.secrets),
                policies.secrets(timings),
                f"Set {len(request.secrets)} secret(s) on {request.app_name}: "
                + ", ".join(sorted(request.secrets)),
            )
            d.secrets, d.secrets_added = secrets.secrets, secrets.added
            d.secrets_version = secrets.secrets_version
        if d.image is None and request.strategy is not Strategy.FLYCTL:
            built = await self._run.run(
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
        if created:
            # The app was created by this deploy: it has no machines to snapshot.
            d.snapshot = ReleaseSnapshot(app_name=request.app_name)
        else:
            d.snapshot = await self._snapshot(d, before_rollout=True)
        if known_app and d.snapshot.app_missing:
            # Deleted since the last release: made again, empty.
            await self._ensure_app(request, org_slug)
            d.snapshot = await self._snapshot(d, before_rollout=True)
        if request.strategy is Strategy.FLYCTL:
            handed = await self._run.run(
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
            rollout = await self._run.run(
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
                    min_secrets_version=d.secrets_version,
                    snapshot=d.snapshot if workflow.patched("fewer-fly-requests") else None,
                ),
                policies.rollout(timings, request.machine_count),
                f"Roll out {d.image} to {request.app_name} ({request.strategy}, "
                f"{request.machine_count} machine(s))",
            )
            d.machines, d.image_digest = rollout.machines, rollout.image_digest
            d.released = rollout.released
        health = await self._verify(d)
        self._run.detail = f"healthy after {health.attempts} request(s)"

    async def _rollback_request_steps(self, d: _Deploy, request: RollbackRequest) -> None:
        """Put a recorded release back: its machines' image, config and env, verified."""
        timings = request.timings
        target = request.to_deployment_id or "the release before the current one"
        release = await self._run.run(
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
            put_back = await self._run.run(
                DeployStep.SECRETS,
                AppSecretActivities.restore_app_secrets,
                RestoreSecretsInput(app_name=request.app_name, secrets=changed),
                policies.secrets(timings),
                f"Put back {len(changed)} secret(s) of release {release.deployment_id} on "
                f"{request.app_name}: " + ", ".join(s.name for s in changed),
            )
            d.secrets_version = put_back.secrets_version or d.secrets_version
        # Set only now: until here the app's secrets are the current release's.
        d.secrets = release.secrets
        d.snapshot = await self._snapshot(d, before_rollout=True)
        restored = await self._run.run(
            DeployStep.ROLLOUT,
            ReleaseActivities.restore,
            RestoreInput(
                app_name=request.app_name,
                deployment_id=request.deployment_id,
                snapshot=release.snapshot,
                reason=f"rollback to {release.deployment_id}",
                timings=timings,
                min_secrets_version=d.secrets_version,
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
        self._run.detail = (
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
            self._run.cancel_requested = True
        failed_step = self._run.step
        if cancelled:
            d.error = self._run.cancel_reason or "cancelled by request"
        else:
            d.error = f"{failed_step}: {describe(err)}"
        self._run.error = d.error
        rolled_back = False
        await self._restore_secrets(d)
        if d.snapshot is not None and failed_step in (DeployStep.ROLLOUT, DeployStep.HEALTH):
            rolled_back = await self._roll_back(d)
        self._run.step = failed_step
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
            put_back = await self._run.run(
                DeployStep.ROLLBACK,
                AppSecretActivities.restore_app_secrets,
                RestoreSecretsInput(app_name=app, secrets=restore, remove=remove),
                policies.secrets(d.request.timings),
                f"Put back the secrets of the last release on {app}: "
                + ", ".join(sorted([s.name for s in restore] + remove)),
                shielded=True,
            )
            d.secrets_version = put_back.secrets_version or d.secrets_version
        except BaseException as err:
            if not is_failure(err):
                raise
            d.error = f"{d.error}; secrets not put back: {describe(err)}"

    async def _roll_back(self, d: _Deploy) -> bool:
        """Restore the snapshot; True when a previous release serves again, verified.

        Leaves `d.image` as what this deploy tried; `d.serving_image` becomes what runs now.
        """
        assert d.snapshot is not None
        request, timings = d.request, d.request.timings
        snapshot = d.snapshot
        # Until the restore ends, the machines may run anything: this deploy's image, the old
        # one, or both.
        d.serving_image = None
        try:
            restored = await self._run.run(
                DeployStep.ROLLBACK,
                ReleaseActivities.restore,
                RestoreInput(
                    app_name=request.app_name,
                    deployment_id=request.deployment_id,
                    snapshot=snapshot,
                    reason=d.error or "",
                    timings=timings,
                    min_secrets_version=d.secrets_version,
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
            if not is_failure(err):
                raise
            d.error = f"{d.error}; rollback failed: {describe(err)}"
            return False
        d.machines = []
        # The snapshot's machines run again (None: it had none, or not one image).
        d.serving_image = snapshot.image
        if not snapshot.machines:
            d.error = f"{d.error}; removed {len(restored.destroyed)} machine(s) of the first deploy"
            return False
        try:
            await self._check_health(
                d, DeployStep.ROLLBACK, f"Check {d.url}/api/health after the rollback"
            )
        except BaseException as err:
            if not is_failure(err):
                raise
            d.error = f"{d.error}; previous release restored but unhealthy: {describe(err)}"
            return False
        metrics.rollback_performed("automatic")
        d.machines = [
            MachineOutcome(machine_id=m, action="restored")
            for m in restored.restored + restored.unchanged
        ]
        return True

    async def _credentials(self) -> CredentialsResult:
        return await self._run.run_no_arg(
            DeployStep.CREDENTIALS,
            CredentialActivities.resolve_credentials,
            policies.CREDENTIALS,
            "Resolve the Fly API token from SSM",
        )

    async def _check_health(self, d: _Deploy, step: DeployStep, summary: str) -> HealthCheckResult:
        timings = d.request.timings
        return await self._run.run(
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
        return await self._run.run(
            # The one "as released" runs beside the health check, as part of that step.
            DeployStep.ROLLOUT if before else DeployStep.HEALTH,
            ReleaseActivities.snapshot,
            SnapshotInput(app_name=d.request.app_name),
            policies.snapshot(d.request.timings),
            f"Snapshot machines of {d.request.app_name} {when}",
            # The one taken beside the health check must not take over the current step,
            # and the one before the rollout is not the rollout done.
            mark_step=before,
            finishes=False,
            shielded=not before,
        )

    async def _ensure_app(self, request: DeployRequest, org_slug: str) -> EnsureAppResult:
        timings = request.timings
        return await self._run.run(
            DeployStep.APP,
            FlyAppActivities.ensure_app,
            EnsureAppInput(app_name=request.app_name, org_slug=org_slug, timings=timings),
            policies.app(timings),
            f"Ensure Fly app {request.app_name} in org {org_slug}",
        )

    async def _verify(self, d: _Deploy) -> HealthCheckResult:
        """The health check, with the snapshot of the release taken beside it (unless
        the rollout's own answers already made it)."""
        if d.released is not None:
            return await self._check_health(d, DeployStep.HEALTH, f"Check {d.url}/api/health")
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
        self._run.status = status
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
                serving_image=d.serving_image,
                image_digest=d.image_digest,
                commit_sha=d.commit_sha,
                fly_toml=d.fly_toml,
                env=d.env,
                secrets=d.secrets,
                machines=d.machines,
                # What runs now: the new release, or the old one put back.
                snapshot=d.released if status is DeployStatus.DEPLOYED else d.snapshot,
            )
        await self._run.run(
            DeployStep.RECORD_RESULT,
            DeploymentActivities.record_result,
            RecordResultInput(
                deployment_id=d.request.deployment_id,
                status=status,
                commit_sha=d.commit_sha,
                image=d.image,
                serving_image=d.serving_image,
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
            self._run.step = DeployStep.DONE
            self._run.detail = f"deployed {d.image} at {d.url}"
        self._run.set_status(status)
        workflow.set_current_details(
            f"**{d.request.deployment_id} {status}**" + (f": {d.error}" if d.error else "")
        )


def unrecorded(request: ProjectRequest, run: StepRunner, err: BaseException) -> DeployResult:
    """The result of a request whose row could not be written: failed, nothing done."""
    error = f"{DeployStep.RECORD_START}: {describe(err)}"
    run.error = error
    run.set_status(DeployStatus.FAILED)
    return DeployResult(
        deployment_id=request.deployment_id,
        project_id=request.project_id,
        app_name=request.app_name,
        url="",
        status=DeployStatus.FAILED,
        error=error,
    )


def record_input(request: ProjectRequest, *, restart: bool = False) -> RecordStartInput:
    """The row of `request`. With `restart` (the run's own start input), a row that a run of
    this chain already finished starts again: that is what a reset asks for. A request that
    reached the run otherwise never deploys twice."""
    info = workflow.info()
    deploy = request if isinstance(request, DeployRequest) else None
    return RecordStartInput(
        deployment_id=request.deployment_id,
        project_id=request.project_id,
        app_name=request.app_name,
        workflow_id=info.workflow_id,
        run_id=info.run_id,
        first_run_id=info.first_execution_run_id if restart else None,
        repo_url=deploy.repo_url if deploy else None,
        branch=deploy.branch if deploy else None,
        image=deploy.image if deploy else None,
    )


def is_failure(err: BaseException) -> bool:
    """Errors a deploy recovers from (activity failures, cancellation), not workflow bugs."""
    return isinstance(err, ActivityError | ApplicationError | ChildWorkflowError) or (
        is_cancelled_exception(err)
    )


def describe(err: BaseException) -> str:
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
