"""Logging setup for the worker and the CLI: plain text, or one JSON object per line.

Every record is tagged with the deploy it belongs to: when it is logged from workflow or
activity code, `TemporalContextFilter` adds `workflow_id`, `run_id`, `project_id` (from the
workflow id, `deploy-<project>` or `rollback-<project>`), and in activities
`activity_type`, `attempt` and `step` (the activity type, unless the call gave its own).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from temporalio import activity, workflow

from core.models import WORKFLOW_ID_PREFIX

# Attributes every LogRecord has; anything else was passed through `extra=` and is kept.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# The SDK's loggers attach these dicts; their fields are flattened onto the record instead.
_SDK_EXTRAS = frozenset({"temporal_workflow", "temporal_activity"})
_WORKFLOW_ID_PREFIXES = (WORKFLOW_ID_PREFIX, "rollback-")


def project_id_from_workflow_id(workflow_id: str | None) -> str | None:
    for prefix in _WORKFLOW_ID_PREFIXES:
        if workflow_id and workflow_id.startswith(prefix):
            return workflow_id.removeprefix(prefix)
    return None


class TemporalContextFilter(logging.Filter):
    """Adds the current workflow's and activity's identity to every record it sees.

    Never drops a record. Fields the record already carries (given with `extra=`) win.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context: dict[str, Any] = {}
        if activity.in_activity():
            info = activity.info()
            context = {
                "workflow_id": info.workflow_id,
                "run_id": info.workflow_run_id,
                "activity_type": info.activity_type,
                "attempt": info.attempt,
                "step": info.activity_type,
            }
        elif workflow.in_workflow():
            winfo = workflow.info()
            context = {"workflow_id": winfo.workflow_id, "run_id": winfo.run_id}
        context["project_id"] = project_id_from_workflow_id(context.get("workflow_id"))
        for key, value in context.items():
            if value is not None and getattr(record, key, None) is None:
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key in _SDK_EXTRAS or key.startswith("_"):
                continue
            entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """`time level logger [project step attempt]: message`, the bracket only in a deploy."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [str(getattr(record, f)) for f in ("project_id", "step") if hasattr(record, f)]
        if hasattr(record, "attempt") and getattr(record, "attempt", 1) != 1:
            parts.append(f"attempt {record.attempt}")
        record.context = f" [{' '.join(parts)}]" if parts else ""
        return super().format(record)


def configure_logging(level: str = "INFO", *, json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    handler.addFilter(TemporalContextFilter())
    handler.setLevel(level.upper())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request line at INFO; keep that for DEBUG runs only.
    logging.getLogger("httpx").setLevel(max(root.level, logging.WARNING))
