"""Steps 1 and 7: the deployment's row in PostgreSQL, written at the start and at the end.

A database that cannot be reached is a passing condition: the error stays retryable and the
workflow's retry policy waits it out. A write the data itself makes impossible (an unknown
deployment, a final status that would change, a constraint violation) fails for good.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg
from temporalio import activity
from temporalio.exceptions import ApplicationError

from turbodeploy.db import (
    DeploymentConflict,
    DeploymentNotFound,
    DeploymentStore,
)
from turbodeploy.models import (
    DeployStatus,
    RecordResultInput,
    RecordStartInput,
    RecordStartResult,
)
from turbodeploy.settings import Settings

DATABASE_UNAVAILABLE = "DatabaseUnavailable"
DEPLOYMENT_NOT_FOUND = "DeploymentNotFound"
DEPLOYMENT_CONFLICT = "DeploymentConflict"
DEPLOYMENT_RECORD_INVALID = "DeploymentRecordInvalid"


class DeploymentActivities:
    def __init__(self, store: DeploymentStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings

    @activity.defn(name="record_deploy_started")
    async def record_started(self, input: RecordStartInput) -> RecordStartResult:
        with _classified_errors():
            row = await self._store.record_started(
                deployment_id=input.deployment_id,
                project_id=input.project_id,
                app_name=input.app_name,
                url=self._settings.app_url(input.app_name),
                workflow_id=input.workflow_id,
                run_id=input.run_id,
                repo_url=input.repo_url,
                branch=input.branch,
                image=input.image,
            )
        if row.status is not DeployStatus.DEPLOYING:
            activity.logger.warning(
                "deployment %s is already %s; its record is left as it is",
                row.deployment_id,
                row.status,
            )
        return RecordStartResult(url=row.url, started_at=row.deployed_at)

    @activity.defn(name="record_deploy_result")
    async def record_result(self, input: RecordResultInput) -> None:
        with _classified_errors():
            await self._store.record_result(
                input.deployment_id,
                input.status,
                commit_sha=input.commit_sha,
                image=input.image,
                machine_ids=input.machine_ids,
                error=input.error,
            )
        activity.logger.info("deployment %s recorded as %s", input.deployment_id, input.status)


@contextlib.contextmanager
def _classified_errors() -> Iterator[None]:
    try:
        yield
    except DeploymentNotFound as err:
        raise ApplicationError(str(err), type=DEPLOYMENT_NOT_FOUND, non_retryable=True) from err
    except DeploymentConflict as err:
        raise ApplicationError(str(err), type=DEPLOYMENT_CONFLICT, non_retryable=True) from err
    # SQLSTATE classes 22 and 23, and values asyncpg cannot encode (a ValueError): the values
    # themselves are rejected, and a retry would send them again.
    except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError) as err:
        raise ApplicationError(
            f"the database rejected the deployment record: {err}",
            type=DEPLOYMENT_RECORD_INVALID,
            non_retryable=True,
        ) from err
    # Connection refused or dropped, pool closed or exhausted (TimeoutError is an OSError),
    # server shutting down, serialization failures: all may pass.
    except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError) as err:
        raise ApplicationError(
            f"the deployment database is unavailable: {type(err).__name__}: {err}",
            type=DATABASE_UNAVAILABLE,
        ) from err
