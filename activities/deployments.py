"""The `record_start` and `record_result` steps: the deployment's row in PostgreSQL,
written at the start and at the end, and the release bundle a later rollback restores.

A database that cannot be reached is a passing condition: the error stays retryable and the
workflow's retry policy waits it out. A write the data itself makes impossible (an unknown
deployment, a final status that would change, a constraint violation) fails for good.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg
from pydantic import Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._errors import (
    DATABASE_UNAVAILABLE,
    DEPLOYMENT_CONFLICT,
    DEPLOYMENT_NOT_FOUND,
    DEPLOYMENT_RECORD_INVALID,
    PROJECT_NOT_REGISTERED,
    RELEASE_NOT_FOUND,
    RELEASE_NOT_RESTORABLE,
)
from core.db import (
    DeploymentConflict,
    DeploymentNotFound,
    DeploymentStore,
    NewDeployment,
    ProjectNotRegistered,
)
from core.models import (
    CheckWindow,
    DeployResult,
    DeployStatus,
    Model,
    ReleaseRecord,
    SecretVersion,
)
from core.settings import Settings


class RecordStartInput(Model):
    deployment_id: str
    project_id: str
    app_name: str
    workflow_id: str
    run_id: str
    repo_url: str | None = None
    branch: str | None = None
    image: str | None = None
    # The first run of the workflow's chain: a reset run shares it with the run it resets.
    first_run_id: str | None = None


class RecordStartResult(Model):
    url: str
    started_at: int  # epoch seconds
    # From the project's last deployed release, for the rollout's health-check reads.
    checks_hint: CheckWindow | None = None
    # That release's secrets (names, parameters, versions), to put back if this deploy
    # changes them and fails; None when the project has no deployed release.
    previous_secrets: list[SecretVersion] | None = None
    # That release's image: what serves while this deploy has changed no machine yet.
    previous_image: str | None = None
    # Set when the deployment had already ended (the same request sent again after its
    # run closed): what it ended as. The run then reports it instead of deploying again.
    finished: DeployResult | None = None


class RecordResultInput(Model):
    deployment_id: str
    status: DeployStatus
    commit_sha: str | None = None
    image: str | None = None  # what the deployment tried; None keeps the recorded one
    serving_image: str | None = None  # what served when it ended; None: nothing, or unknown
    machine_ids: list[str] = Field(default_factory=list)
    error: str | None = None
    # Recorded in the same step when the deploy reached the rollout.
    release: ReleaseRecord | None = None


class LoadReleaseInput(Model):
    project_id: str
    deployment_id: str | None = None  # None: the last good release before the current one


class DeploymentActivities:
    def __init__(self, store: DeploymentStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings

    def _new_row(self, input: RecordStartInput) -> NewDeployment:
        return NewDeployment(
            deployment_id=input.deployment_id,
            project_id=input.project_id,
            app_name=input.app_name,
            url=self._settings.app_url(input.app_name),
            workflow_id=input.workflow_id,
            run_id=input.run_id,
            repo_url=input.repo_url,
            branch=input.branch,
            image=input.image,
            first_run_id=input.first_run_id,
        )

    @activity.defn(name="record_deploy_started")
    async def record_started(self, input: RecordStartInput) -> RecordStartResult:
        with _classified_errors():
            row = await self._store.record_started(**self._new_row(input))
            orphans = await self._store.close_orphans(input.project_id, input.run_id)
            last = await self._store.last_good_outline(input.project_id)
        for orphan in orphans:
            activity.logger.warning(
                "deployment %s of project %s was left open by an ended run; recorded as failed",
                orphan.deployment_id,
                orphan.project_id,
            )
        finished = None
        if row.status.is_final:
            # The same request sent again after its run closed: one request, one deployment.
            activity.logger.warning(
                "deployment %s already ended %s (run %s); it is not deployed again",
                row.deployment_id,
                row.status,
                row.run_id,
            )
            finished = row.outcome()
        return RecordStartResult(
            url=row.url,
            started_at=row.deployed_at,
            checks_hint=CheckWindow.typical(last.machines) if last else None,
            previous_secrets=last.secrets if last else None,
            previous_image=last.image if last else None,
            finished=finished,
        )

    @activity.defn(name="record_deploy_queued")
    async def record_queued(self, input: RecordStartInput) -> None:
        """A row for a request waiting behind a running deploy, so the platform finds it."""
        with _classified_errors():
            row = await self._store.record_queued(**self._new_row(input))
        if row.status is not DeployStatus.QUEUED:
            activity.logger.info(
                "deployment %s is already %s; not marked queued", row.deployment_id, row.status
            )

    @activity.defn(name="record_deploy_result")
    async def record_result(self, input: RecordResultInput) -> None:
        with _classified_errors():
            if input.release is not None:
                await self._store.record_release(input.release)
            await self._store.record_result(
                input.deployment_id,
                input.status,
                commit_sha=input.commit_sha,
                image=input.image,
                machine_ids=input.machine_ids,
                error=input.error,
                serving_image=input.serving_image,
            )
        activity.logger.info("deployment %s recorded as %s", input.deployment_id, input.status)

    @activity.defn(name="load_release")
    async def load_release(self, input: LoadReleaseInput) -> ReleaseRecord:
        """The named release, or the last `deployed` one before the newest `deployed` one.

        Only a deployed release with a snapshot can be put back.
        """
        project = input.project_id
        with _classified_errors():
            if input.deployment_id is not None:
                release = await self._store.release(input.deployment_id)
                if release is None or release.project_id != project:
                    raise _release_not_found(
                        f"project {project} has no release of deployment {input.deployment_id}"
                    )
            else:
                current = await self._store.last_good_release(project)
                if current is None:
                    raise _release_not_found(f"project {project} has no deployed release")
                release = await self._store.last_good_release(
                    project, before_deployment_id=current.deployment_id
                )
                if release is None:
                    raise _release_not_found(
                        f"project {project} has no deployed release before "
                        f"{current.deployment_id}, the one running now"
                    )
        if release.status is not DeployStatus.DEPLOYED or release.snapshot is None:
            problem = (
                f"ended {release.status}"
                if release.status is not DeployStatus.DEPLOYED
                else "has no snapshot of its machines"
            )
            raise RELEASE_NOT_RESTORABLE(
                f"release {release.deployment_id} of project {project} {problem}; "
                "only a deployed release can be put back"
            )
        activity.logger.info(
            "loaded release %s of project %s (image %s)",
            release.deployment_id,
            project,
            release.image,
        )
        return release


def _release_not_found(message: str) -> ApplicationError:
    return RELEASE_NOT_FOUND(message)


@contextlib.contextmanager
def _classified_errors() -> Iterator[None]:
    try:
        yield
    except ProjectNotRegistered as err:
        raise PROJECT_NOT_REGISTERED(str(err)) from err
    except DeploymentNotFound as err:
        raise DEPLOYMENT_NOT_FOUND(str(err)) from err
    except DeploymentConflict as err:
        raise DEPLOYMENT_CONFLICT(str(err)) from err
    # SQLSTATE classes 22 and 23, and values asyncpg cannot encode (a ValueError): the values
    # themselves are rejected, and a retry would send them again.
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError) as err:
        raise DEPLOYMENT_RECORD_INVALID(
            f"the database rejected the deployment record: {err}"
        ) from err
    # Connection refused or dropped, pool closed or exhausted (TimeoutError is an OSError),
    # server shutting down, serialization failures: all may pass.
    except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError) as err:
        raise DATABASE_UNAVAILABLE(
            f"the deployment database is unavailable: {type(err).__name__}: {err}"
        ) from err
