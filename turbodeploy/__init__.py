"""turbodeploy: durable deployments of generated Nitro.js backends to Fly.io.

The public Python API is `start_deploy` with a `DeployRequest`; see turbodeploy.client.
"""

from __future__ import annotations

from typing import Any

from core.models import DeployRequest, DeployResult, DeployStatus

__all__ = ["DeployRequest", "DeployResult", "DeployStatus", "connect", "start_deploy"]


def __getattr__(name: str) -> Any:
    # Imported lazily: workflow code imports core.models and must not pull the
    # Temporal client into the sandbox with it.
    if name == "start_deploy":
        from turbodeploy.client import start_deploy

        return start_deploy
    if name == "connect":
        from turbodeploy.client import connect

        return connect
    raise AttributeError(name)
