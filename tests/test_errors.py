"""The catalogue of activity failures: every type an activity raises is in it, and the
retry policies' non-retryable list is derived from it (a missing entry would let a hopeless
step retry for minutes)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from activities import _errors
from activities._errors import NON_RETRYABLE, Failure, catalogue
from flyapi import FlyBadRequest, FlyNotFound, FlyRetryableError, FlyTransportError
from workflows import policies

ACTIVITIES = Path(__file__).absolute().parent.parent / "activities"


def _raised_types() -> dict[str, list[str]]:
    """Every literal or catalogued `type=` given to an ApplicationError in activities/."""
    found: dict[str, list[str]] = {}
    names = {name: str(f) for name, f in vars(_errors).items() if isinstance(f, Failure)}
    for path in ACTIVITIES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                callee = node.func.id if isinstance(node.func, ast.Name) else None
                if callee in names:
                    found.setdefault(names[callee], []).append(f"{path.name}:{node.lineno}")
                for kw in node.keywords:
                    if kw.arg == "type" and isinstance(kw.value, ast.Constant):
                        found.setdefault(kw.value.value, []).append(f"{path.name}:{node.lineno}")
    return found


def test_every_failure_an_activity_raises_is_catalogued() -> None:
    raised = _raised_types()
    assert len(raised) >= 20
    missing = {t: where for t, where in raised.items() if t not in catalogue()}
    assert not missing, f"failure types raised but not in activities/_errors.py: {missing}"


def test_the_non_retryable_list_is_derived_from_the_catalogue() -> None:
    hopeless = {name for name, f in catalogue().items() if f.retryable is False}
    assert hopeless <= set(NON_RETRYABLE)
    assert not {name for name, f in catalogue().items() if f.retryable} & set(NON_RETRYABLE)
    # Fly's answers as flyapi classifies them.
    assert {FlyBadRequest.__name__, FlyNotFound.__name__} <= set(NON_RETRYABLE)
    assert not {FlyRetryableError.__name__, FlyTransportError.__name__} & set(NON_RETRYABLE)
    # Decided by each failure: a transient flyctl failure or a network error of git retries.
    assert "FlyctlFailed" not in NON_RETRYABLE and "GitError" not in NON_RETRYABLE
    for policy in (policies.RECORD, policies.CREDENTIALS, policies.NOTIFY):
        assert list(policy.retry.non_retryable_error_types or []) == NON_RETRYABLE


def test_a_failure_builds_its_application_error() -> None:
    error = _errors.MACHINE_UNHEALTHY("machine m1 failed its checks", {"machine": "m1"})
    assert error.type == "MachineUnhealthy" and error.non_retryable
    assert error.message == "machine m1 failed its checks" and error.details == ({"machine": "m1"},)
    assert not _errors.DATABASE_UNAVAILABLE("down").non_retryable
    assert _errors.GIT_ERROR("auth failed", non_retryable=True).non_retryable
    with pytest.raises(TypeError, match="say whether"):
        _errors.GIT_ERROR("no classification")
    with pytest.raises(TypeError, match="always non-retryable"):
        _errors.APP_NAME_TAKEN("taken", non_retryable=False)
