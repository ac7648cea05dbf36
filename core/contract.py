"""The deploy workflow's contract on the Temporal server, for callers in any language.

What a caller needs besides a Temporal client: the names below and the JSON Schemas of the
payloads, exported from the models that decode them, so the two cannot disagree (the
committed copies in `schemas/` are checked against these by the tests). README: "Starting
deploys from any language".

    python -m core.contract [DIRECTORY]    # write the schemas (default: schemas/)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import TypeAdapter
from temporalio.common import SearchAttributeKey

from core.models import (
    WORKFLOW_ID_PREFIX,
    Accepted,
    DeployProgress,
    DeployRequest,
    DeployResult,
    DestroyRequest,
    ProjectRequest,
    RollbackRequest,
    StartRequest,
    StopRequest,
)
from core.settings import TASK_QUEUE

WORKFLOW_TYPE = "DeployProjectWorkflow"
DEFAULT_TASK_QUEUE = TASK_QUEUE
WORKFLOW_ID = WORKFLOW_ID_PREFIX + "{project_id}"

SUBMIT_UPDATE = "submit_request"  # request -> Accepted; rejected when invalid
SUBMIT_SIGNAL = "submit"  # request; for signal-with-start callers
WAIT_OUTCOME_UPDATE = "wait_outcome"  # deployment id -> DeployResult, when it has ended
PROGRESS_QUERY = "progress"  # -> DeployProgress
OUTCOME_QUERY = "outcome"  # deployment id -> DeployResult | null
CURRENT_REQUEST_QUERY = "current_request"  # -> the request running now, or the last one

# Error types a caller may meet (ApplicationError / ApplicationFailure `type`).
INVALID_REQUEST = "InvalidRequest"  # the update's rejection, or the run's failure at once
DEPLOY_FAILED = "DeployFailed"  # the run's failure: its last deployment did not deploy
DEPLOY_ROLLED_BACK = "DeployRolledBack"  # ... and the previous release serves again
# The run's failure when its last request was a stop, start or destroy that did not
# succeed (details hold the DeployResult).
APP_OPERATION_FAILED = "AppOperationFailed"

# Keyword search attributes, set by the caller at start; the workflow keeps DeployStatus true.
PROJECT_ID = SearchAttributeKey.for_keyword("ProjectId")
FLY_APP = SearchAttributeKey.for_keyword("FlyApp")
DEPLOY_STATUS = SearchAttributeKey.for_keyword("DeployStatus")
SEARCH_ATTRIBUTES = (PROJECT_ID.name, FLY_APP.name, DEPLOY_STATUS.name)

Mode = Literal["validation", "serialization"]

# file stem -> (type, mode): what callers send is described as it is validated, what they
# receive as it is serialised.
_SCHEMAS: dict[str, tuple[Any, Mode]] = {
    "project-request": (ProjectRequest, "validation"),
    "deploy-request": (DeployRequest, "validation"),
    "rollback-request": (RollbackRequest, "validation"),
    "stop-request": (StopRequest, "validation"),
    "start-request": (StartRequest, "validation"),
    "destroy-request": (DestroyRequest, "validation"),
    "accepted": (Accepted, "serialization"),
    "deploy-progress": (DeployProgress, "serialization"),
    "deploy-result": (DeployResult, "serialization"),
}

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"


def schemas() -> dict[str, dict[str, Any]]:
    """Every payload's JSON Schema (draft 2020-12), by file stem."""
    out: dict[str, dict[str, Any]] = {}
    for stem, (kind, mode) in _SCHEMAS.items():
        schema = TypeAdapter(kind).json_schema(mode=mode)
        out[stem] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://turbodeploy.dev/schemas/{stem}.schema.json",
            **({"title": stem.replace("-", " ").capitalize()} if "title" not in schema else {}),
            **schema,
        }
    return out


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, schema in schemas().items():
        path = directory / f"{stem}.schema.json"
        path.write_text(render(schema))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMA_DIR):
        print(path)
