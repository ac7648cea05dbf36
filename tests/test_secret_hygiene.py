"""No token or secret value anywhere a person or another process can read: workflow
histories, worker logs at DEBUG, the database, and the argv of every child process;
also when Fly rejects the token. The deploy tokens minted for flyctl children are secrets
too, and the org token never reaches a child."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gitserver import AuthGitServer
from harness import (
    DEPLOY_FAILURES,
    GitShim,
    WorkerProcess,
    deploy_request,
    dump_schema,
    history_json,
    new_project_id,
    wait_for_pollers,
    worker_env,
)
from temporalio.client import Client

from core.models import DeployRequest
from turbodeploy import embedded
from turbodeploy.client import start_deploy
from turbodeploy.stack import publish_example


@pytest.fixture
def git_host(tmp_path: Path) -> Iterator[AuthGitServer]:
    token = "ghp_" + uuid.uuid4().hex + uuid.uuid4().hex[:4]
    with AuthGitServer(tmp_path / "git-host", "x-access-token", token).serving() as host:
        yield host


def _fragments(value: str) -> list[str]:
    """The value and enough of it to recognise it even when cut or prefixed."""
    body = value.split("fm2_", 1)[-1]
    return [value, body, body[:24], body[-24:]]


async def _deploy(
    client: Client, task_queue: str, request: DeployRequest, *, expect_failure: bool
) -> str:
    handle = await start_deploy(client, request, task_queue=task_queue)
    if expect_failure:
        with pytest.raises(DEPLOY_FAILURES):
            await asyncio.wait_for(handle.result(), 60)
    else:
        await asyncio.wait_for(handle.result(), 60)
    return await history_json(handle)


@pytest.mark.usefixtures("calm_emulator")
async def test_no_secret_in_histories_logs_rows_or_argv(
    temporal_client: Client,
    postgres_url: str,
    ssm_endpoint: str,
    ssm: Any,
    flysim: Any,
    fly_token: str,
    git_host: AuthGitServer,
    tmp_path: Path,
) -> None:
    wrong_parameter = f"/turbobackend/flyio/wrong-{uuid.uuid4().hex[:8]}"
    wrong_token = "FlyV1 fm2_" + uuid.uuid4().hex * 4
    secret_parameter = f"/turbobackend/apps/s-{uuid.uuid4().hex[:8]}/DATABASE_PASSWORD"
    secret_value = "pw-" + uuid.uuid4().hex * 2
    rotated_value = "pw-" + uuid.uuid4().hex * 2
    broken_image = f"registry.fly.io/hygiene:broken-{uuid.uuid4().hex[:8]}"
    git_parameter = f"/turbobackend/github/token-{uuid.uuid4().hex[:8]}"
    git_token = git_host.token
    ssm.put_parameter(Name=wrong_parameter, Value=wrong_token, Type="SecureString")
    ssm.put_parameter(Name=secret_parameter, Value=secret_value, Type="SecureString")
    ssm.put_parameter(Name=git_parameter, Value=git_token, Type="SecureString")
    # A private repository, on a git host that wants the token.
    private_repo = git_host.add_repository(
        publish_example("nitro-hello", tmp_path / "private-seed")
    )

    shim = GitShim(tmp_path / "git")
    schema = f"s_{uuid.uuid4().hex[:8]}"
    address = temporal_client.service_client.config.target_host
    good_queue, bad_queue = f"sec-{uuid.uuid4().hex[:8]}", f"sec-{uuid.uuid4().hex[:8]}"

    def env(task_queue: str, **extra: str) -> dict[str, str]:
        return worker_env(
            temporal_address=address,
            task_queue=task_queue,
            database_url=postgres_url,
            db_schema=schema,
            ssm_endpoint=ssm_endpoint,
            fly_api_base_url=flysim.base_url,
            app_url_template=flysim.app_url_template,
            work_dir=tmp_path / f"work-{task_queue}",
            path_prefix=str(shim.dir),
            extra=extra,
        )

    flyctl_log = tmp_path / "flyctl.jsonl"
    good = WorkerProcess(
        env(
            good_queue,
            TURBODEPLOY_GIT_TOKEN_PARAMETER=git_parameter,
            # Builds run the flyctl stand-in, which logs its argv, the names of its
            # environment variables and the SHA-256 of the token it was given.
            TURBODEPLOY_FLYCTL_PATH=str(embedded.flyctl_standin(tmp_path / "flyctl-bin")),
            FLYCTL_STANDIN_ARGV_LOG=str(flyctl_log),
        ),
        tmp_path / "good.log",
    )
    bad = WorkerProcess(
        env(bad_queue, TURBODEPLOY_FLY_TOKEN_PARAMETER=wrong_parameter), tmp_path / "bad.log"
    )
    traces: dict[str, str] = {}
    try:
        await wait_for_pollers(temporal_client, good_queue)
        await wait_for_pollers(temporal_client, bad_queue)

        def request(**overrides: Any) -> DeployRequest:
            return deploy_request(
                new_project_id("s"),
                publish_example("nitro-hello", tmp_path / f"r{uuid.uuid4().hex[:6]}"),
                **({"env": {"GREETING": "hello"}} | overrides),
            )

        traces["history: success"] = await _deploy(
            temporal_client, good_queue, request(), expect_failure=False
        )
        # No image: built with flyctl, which gets a deploy token of the app.
        built = request(image=None)
        traces["history: build"] = await _deploy(
            temporal_client, good_queue, built, expect_failure=False
        )
        traces["history: private repository"] = await _deploy(
            temporal_client,
            good_queue,
            deploy_request(new_project_id("s"), private_repo),
            expect_failure=False,
        )
        traces["history: 401"] = await _deploy(
            temporal_client, bad_queue, request(), expect_failure=True
        )
        with_secret = request(secrets={"DATABASE_PASSWORD": secret_parameter})
        traces["history: app secrets"] = await _deploy(
            temporal_client, good_queue, with_secret, expect_failure=False
        )
        # The secret did reach the app's machines: the check below is not vacuous.
        [machine] = [m for m in flysim.snapshot()["machines"] if m["app"] == with_secret.app_name]
        runtime_env = flysim.machine_runtime_env(with_secret.app_name, machine["id"])
        assert runtime_env["DATABASE_PASSWORD"] == secret_value

        # A failed release with a rotated value: the rollback reads the old one back.
        ssm.put_parameter(
            Name=secret_parameter, Value=rotated_value, Type="SecureString", Overwrite=True
        )
        flysim.config.unhealthy_images.add(broken_image)
        broken = DeployRequest.model_validate(
            with_secret.model_dump(exclude={"deployment_id"}) | {"image": broken_image}
        )
        traces["history: secrets put back"] = await _deploy(
            temporal_client, good_queue, broken, expect_failure=True
        )
        runtime_env = flysim.machine_runtime_env(with_secret.app_name, machine["id"])
        assert runtime_env["DATABASE_PASSWORD"] == secret_value
    finally:
        flysim.config.unhealthy_images.discard(broken_image)
        good.stop()
        bad.stop()

    traces["worker log (good)"] = good.output()
    traces["worker log (401)"] = bad.output()
    traces["git argv"] = shim.argv()
    traces["flyctl argv and environment"] = flyctl_log.read_text() if flyctl_log.exists() else ""
    traces["database"] = await dump_schema(postgres_url, schema)

    # The traces are real: they hold what a person needs, just not the secrets.
    assert "DEBUG" in traces["worker log (good)"], "the worker logged at DEBUG"
    assert "push" in traces["git argv"] and "clone" in traces["git argv"]
    assert git_host.authorized_requests > 0, "the private repository was reached"
    assert private_repo in traces["history: private repository"]
    assert "deployed" in traces["database"] and "failed" in traces["database"]
    assert "DATABASE_PASSWORD" in traces["history: app secrets"], "names are recorded"
    assert "restore_app_secrets" in traces["history: secrets put back"]
    assert "401" in traces["history: 401"] or "nauthori" in traces["history: 401"]
    # The build's flyctl held a deploy token of its app, minted for it; never the org token.
    deploy_tokens = [i.token for i in flysim.deploy_tokens.issued if i.app == built.app_name]
    assert deploy_tokens, "a deploy token was minted for the build"
    children = [json.loads(line) for line in traces["flyctl argv and environment"].splitlines()]
    assert children and "FLY_API_TOKEN" in children[0]["env"]
    given = {c["token_sha256"] for c in children}
    assert given <= {hashlib.sha256(t.encode()).hexdigest() for t in deploy_tokens}
    assert hashlib.sha256(fly_token.encode()).hexdigest() not in given

    secrets = {
        "Fly token": _fragments(fly_token),
        "rejected Fly token": _fragments(wrong_token),
        "app secret": [secret_value],
        "rotated app secret": [rotated_value],
        "git token": [git_token, git_token[4:28], git_host.expected.removeprefix("Basic ")],
        **{f"deploy token {n}": _fragments(t) for n, t in enumerate(deploy_tokens, start=1)},
    }
    leaks = [
        f"{what} in {where}"
        for where, text in traces.items()
        for what, fragments in secrets.items()
        if any(f in text for f in fragments)
    ]
    assert leaks == [], leaks


def test_fragments_cover_prefix_and_body() -> None:
    token = "FlyV1 fm2_" + "a" * 30 + "b" * 30
    fragments = _fragments(token)
    assert token in fragments and "a" * 24 in fragments and "b" * 24 in fragments
