"""PostgreSQL records of deployments, in the schema named by `Settings.db_schema`."""

from core.db.store import (
    MAX_ERROR_CHARS,
    PLATFORM,
    DeploymentConflict,
    DeploymentNotFound,
    DeploymentRecordError,
    DeploymentStore,
    NewDeployment,
    ProjectNotRegistered,
    create_pool,
)

__all__ = [
    "MAX_ERROR_CHARS",
    "PLATFORM",
    "DeploymentConflict",
    "DeploymentNotFound",
    "DeploymentRecordError",
    "DeploymentStore",
    "NewDeployment",
    "ProjectNotRegistered",
    "create_pool",
]
