"""turbodeploy: durable deployments of generated Nitro.js backends to Fly.io.

The public Python API is `start_deploy` with a `DeployRequest`; see turbodeploy.client.
"""

from __future__ import annotations

from typing import Any

from core.models import DeployRequest, DeployResult, DeployStatus

__all__ = [
    "DeployRequest",
    "DeployResult",
    "DeployStatus",
    "connect",
    "start_deploy",
    "start_destroy",
    "start_start",
    "start_stop",
]
_LAZY = ("connect", "start_deploy", "start_destroy", "start_start", "start_stop")


def __getattr__(name: str) -> Any:
    # Imported lazily: workflow code imports core.models and must not pull the
    # Temporal client into the sandbox with it.
    if name in _LAZY:
        from turbodeploy import client

        return getattr(client, name)
    raise AttributeError(name)
