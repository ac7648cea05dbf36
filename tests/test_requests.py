"""Request validation: malformed input is rejected at the edge with a clear message.

Through the Python API (`DeployRequest`) and the CLI (exit code 2, nothing started).
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import TypeAdapter, ValidationError

from core.models import (
    MAX_PROJECT_ID_LENGTH,
    PROJECT_REQUEST,
    DeployRequest,
    DeployTimings,
    IncomingRequest,
    InvalidRequest,
    RollbackRequest,
    app_name_for,
    workflow_id_for,
)
from turbodeploy.cli import main

GOOD: dict[str, Any] = {
    "project_id": "p1",
    "repo_url": "https://github.com/acme/p1.git",
    "image": "registry.fly.io/turbobackend-p1:deployment-01",
}

# (field overrides, fragment expected in the error message)
BAD: list[tuple[dict[str, Any], str]] = [
    ({"project_id": ""}, "must not be empty"),
    ({"project_id": "P1"}, "lower-case"),
    ({"project_id": "Project"}, "lower-case"),
    ({"project_id": "pröject"}, "lower-case"),
    ({"project_id": "项目"}, "lower-case"),
    ({"project_id": "p_1"}, "lower-case"),
    ({"project_id": "p.1"}, "lower-case"),
    ({"project_id": "-p1"}, "lower-case"),
    ({"project_id": "p1-"}, "lower-case"),
    ({"project_id": "p 1"}, "lower-case"),
    ({"project_id": "p1\n"}, "lower-case"),
    ({"project_id": "p1;drop table x"}, "lower-case"),
    ({"project_id": "a" * 64}, "characters"),
    ({"project_id": "a" * (MAX_PROJECT_ID_LENGTH + 1)}, "characters"),
    ({"project_id": "p1' OR '1'='1"}, "lower-case"),
    ({"project_id": 'p1"\n[env]\nX="1'}, "lower-case"),
    ({"repo_url": ""}, "1 to 2048"),
    ({"repo_url": "https://x.test/a;rm -rf /"}, "shell metacharacters"),
    ({"repo_url": "https://x.test/$(whoami).git"}, "shell metacharacters"),
    ({"repo_url": "https://x.test/`id`.git"}, "shell metacharacters"),
    ({"repo_url": "https://x.test/a|b"}, "shell metacharacters"),
    ({"repo_url": "https://x.test/a&&b"}, "shell metacharacters"),
    ({"repo_url": "https://x.test/a b"}, "shell metacharacters"),
    ({"repo_url": "ftp://x.test/a.git"}, "unsupported repository URL scheme"),
    ({"repo_url": "javascript://alert(1)"}, "shell metacharacters"),
    ({"repo_url": "ext::sh -c touch% /tmp/pwned"}, "shell metacharacters"),
    ({"repo_url": "--upload-pack=touch /tmp/x"}, "start with '-'"),
    ({"repo_url": "relative/path"}, "must be a URL"),
    ({"repo_url": "https:///nohost.git"}, "no host"),
    ({"repo_url": "file://relative"}, "absolute path"),
    ({"repo_url": "/srv/../etc/passwd"}, "'..'"),
    ({"repo_url": "https://x.test/a\x00.git"}, "control characters"),
    ({"repo_url": "https://x.test/" + "a" * 2100}, "1 to 2048"),
    ({"image": "UPPER/case:tag"}, "malformed"),
    ({"image": "registry.fly.io/app:"}, "malformed"),
    ({"image": "registry.fly.io/app:tag with space"}, "malformed"),
    ({"image": "registry.fly.io/app@sha256:123"}, "malformed"),
    ({"image": "registry.fly.io/app;rm"}, "malformed"),
    ({"image": ""}, "malformed"),
    ({"image": "app:" + "t" * 200}, "malformed"),
    ({"region": "mars"}, "unknown Fly region"),
    ({"region": "IAD"}, "unknown Fly region"),
    ({"region": ""}, "unknown Fly region"),
    ({"branch": "-delete"}, "branch"),
    ({"branch": "a..b"}, "branch"),
    ({"branch": "feature/"}, "branch"),
    ({"branch": "x\x07"}, "control characters"),
    ({"branch": "main.lock"}, "branch"),
    ({"env": {"lower-case": "x"}}, "name"),
    ({"env": {"PORT": "1"}}, "set by the platform"),
    ({"env": {"FLY_API_TOKEN": "1"}}, "set by the platform"),
    ({"env": {"X": "a\x00b"}}, "NUL"),
    ({"env": {"BIG": "x" * 5000}}, "bytes"),
    ({"env": {f"V{i}": "1" for i in range(101)}}, "at most 100"),
    ({"env": {f"V{i}": "x" * 4000 for i in range(20)}}, "at most 65536"),
    ({"machine_count": 0}, "greater than or equal to 1"),
    ({"machine_count": 500}, "less than or equal to 20"),
    ({"deployment_id": "Has Space"}, "deployment id"),
    ({"timings": {"health_deadline": -1}}, "positive"),
    ({"timings": {"health_deadline": 86400}}, "at most 2 hours"),
    ({"unknown_field": 1}, "Extra inputs are not permitted"),
]


def test_corpus_is_large() -> None:
    assert len(BAD) >= 50


@pytest.mark.parametrize(("overrides", "fragment"), BAD, ids=[repr(o)[:40] for o, _ in BAD])
def test_bad_requests_rejected_with_clear_message(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        DeployRequest.model_validate({**GOOD, **overrides})
    assert fragment in str(info.value)


def test_good_request_derives_names_in_one_place() -> None:
    request = DeployRequest.model_validate(GOOD)
    assert request.app_name == "turbobackend-p1" == app_name_for("p1")
    assert request.workflow_id == "deploy-p1" == workflow_id_for("p1")
    assert request.region == "iad"


def test_a_request_decodes_to_the_same_value_every_time() -> None:
    """A workflow input is decoded again on every replay and query: nothing may be
    generated while decoding, or the input and its signal copy become two deployments."""
    payload = json.dumps(GOOD)
    first, second = (PROJECT_REQUEST.validate_json(payload) for _ in range(2))
    assert first == second
    assert first.deployment_id == ""  # assigned by the workflow that accepts it
    for model in (DeployRequest, RollbackRequest):
        for name, info in model.model_fields.items():
            assert info.default_factory in (None, dict, DeployTimings), (model, name)


def test_a_json_request_without_kind_is_a_deploy() -> None:
    assert isinstance(PROJECT_REQUEST.validate_python(GOOD), DeployRequest)
    rollback = PROJECT_REQUEST.validate_python({"kind": "rollback", "project_id": "p1"})
    assert isinstance(rollback, RollbackRequest)


def test_an_invalid_payload_decodes_to_its_reason() -> None:
    """What the workflow's handlers receive: never a decoding failure, always a reason."""
    incoming = TypeAdapter(IncomingRequest)
    bad = incoming.validate_json(json.dumps({**GOOD, "project_id": "BAD ID!", "region": "xx"}))
    assert isinstance(bad, InvalidRequest)
    assert bad.error.startswith("project_id: project id 'BAD ID!' is not usable")
    assert "region: unknown Fly region 'xx'" in bad.error
    assert isinstance(incoming.validate_json("[1, 2]"), InvalidRequest)
    assert "kind must be" in incoming.validate_json('{"kind": "nope"}').error  # type: ignore[union-attr]
    assert incoming.validate_json(json.dumps(GOOD)) == DeployRequest.model_validate(GOOD)


@pytest.mark.parametrize("value", ["UPPER", "-lead", "a" * 64, "has space"])
def test_a_malformed_deployment_id_is_refused(value: str) -> None:
    with pytest.raises(ValidationError, match="deployment id must be"):
        DeployRequest.model_validate({**GOOD, "deployment_id": value})


@pytest.mark.parametrize(
    "repo",
    [
        "https://github.com/acme/p1.git",
        "ssh://git@github.com/acme/p1.git",
        "git@github.com:acme/p1.git",
        "file:///srv/git/p1.git",
        "/srv/git/p1.git",
    ],
)
def test_accepted_repository_forms(repo: str) -> None:
    assert DeployRequest.model_validate({**GOOD, "repo_url": repo}).repo_url == repo


def test_longest_project_id_gives_a_63_character_app_name() -> None:
    request = DeployRequest.model_validate({**GOOD, "project_id": "a" * MAX_PROJECT_ID_LENGTH})
    assert len(request.app_name) == 63


def test_request_round_trips_as_json() -> None:
    request = DeployRequest.model_validate(
        {**GOOD, "env": {"API_URL": "https://x"}, "timings": {"health_deadline": 90}}
    )
    again = DeployRequest.model_validate_json(request.model_dump_json())
    assert again == request
    assert again.timings.health_deadline == timedelta(seconds=90)


@pytest.mark.parametrize(
    "args",
    [
        ["deploy", "Bad_Id", "--repo", "https://x.test/a.git", "--image", "a/b:c"],
        ["deploy", "ok", "--repo", "https://x.test/a;b", "--image", "a/b:c"],
        ["deploy", "ok", "--repo", "https://x.test/a.git", "--image", "A/B"],
        ["deploy", "ok", "--repo", "https://x.test/a.git", "--image", "a/b", "--region", "zz"],
        ["deploy", "ok", "--repo", "https://x.test/a.git", "--image", "a/b", "--env", "NOEQ"],
    ],
)
def test_cli_rejects_bad_input_with_exit_code_2(
    args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An unreachable Temporal address: if the CLI tried to start anything, it would fail with
    # a different exit code.
    monkeypatch.setenv("TURBODEPLOY_TEMPORAL_ADDRESS", "127.0.0.1:1")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
