"""The whole deploy, end to end: real Temporal, PostgreSQL, SSM (moto), git and the Fly
emulator, with the worker composed exactly as `python worker.py` composes it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import readable_history
from harness import (
    IMAGE,
    Rows,
    app_machines,
    apps_named,
    commit_fly_toml,
    fast_timings,
    fly_toml_commits,
    held_leases,
    take_app_name,
)
from temporalio.client import Client

from core.models import DeployRequest, DeployStatus
from core.settings import Settings
from turbodeploy.client import DeployFailed, start_deploy

FAST = fast_timings(
    health_deadline=timedelta(seconds=3),
    health_request_timeout=timedelta(seconds=2),
    machine_wait_timeout=timedelta(seconds=3),
    app_visible_timeout=timedelta(seconds=2),
    lease_ttl=timedelta(seconds=30),
    heartbeat_timeout=timedelta(seconds=10),
)

pytestmark = pytest.mark.usefixtures("calm_emulator")


@pytest.fixture
def request_defaults() -> Callable[[], dict[str, Any]]:
    return lambda: {"timings": FAST}


async def test_first_deploy_then_redeploy(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
    repo: str,
) -> None:
    request = make_request(machine_count=2)
    handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    result = await handle.result()

    assert result.status is DeployStatus.DEPLOYED
    assert result.app_name == f"turbobackend-{request.project_id}"
    assert result.url == settings.app_url(result.app_name)
    assert len(result.machine_ids) == 2
    assert len(fly_toml_commits(repo)) == 1
    machines = app_machines(flysim, result.app_name)
    assert sorted(m["id"] for m in machines) == sorted(result.machine_ids)
    [row] = await rows_of(request.project_id)
    assert row["status"] == "deployed"
    assert row["url"] == result.url
    assert row["commit_sha"] == result.commit_sha
    assert row["platform"] == "flyio"
    assert row["last_updated"] >= row["deployed_at"] > 0

    # A second deploy of the same project updates the same machines in place.
    second = make_request(image=IMAGE.replace("deployment-1", "deployment-2"))
    handle = await start_deploy(temporal_client, second, task_queue=settings.task_queue)
    result2 = await handle.result()
    assert result2.status is DeployStatus.DEPLOYED
    assert sorted(result2.machine_ids) == sorted(result.machine_ids)
    machines = app_machines(flysim, result.app_name)
    assert {m["config"]["image"] for m in machines} == {second.image}
    assert held_leases(flysim, result.app_name) == [], "no lease left held"
    # The rendered fly.toml did not change, so nothing new was committed.
    assert len(fly_toml_commits(repo)) == 1
    assert [r["status"] for r in await rows_of(request.project_id)] == [
        "deployed",
        "deployed",
    ]
    assert len(apps_named(flysim, result.app_name)) == 1


async def test_repository_with_its_own_fly_toml(
    temporal_client: Client,
    settings: Settings,
    worker: None,
    make_request: Callable[..., DeployRequest],
    repo: str,
    tmp_path: Path,
) -> None:
    commit_fly_toml(
        repo,
        'app = "whatever"\nkill_signal = "SIGINT"\n\n'
        '[deploy]\nrelease_command = "npm run migrate"\n\n'
        "[experimental]\nauto_stop_machines = true\n",
        tmp_path / "clone",
    )

    request = make_request()
    result = await (
        await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    ).result()
    assert result.status is DeployStatus.DEPLOYED
    committed = subprocess.run(
        ["git", "--git-dir", repo, "show", f"{result.commit_sha}:fly.toml"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert 'release_command = "npm run migrate"' in committed
    assert 'kill_signal = "SIGINT"' in committed
    assert "[experimental]" not in committed
    assert f'app = "{request.app_name}"' in committed


async def test_fly_5xx_and_429_are_retried_to_success(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
) -> None:
    flysim.config.faults.seed = 7
    flysim.config.faults.error_rate = 0.3
    flysim.config.faults.rate_limit_rate = 0.15
    flysim.config.faults.retry_after = 1
    before = dict(flysim.stats.by_status)
    request = make_request()
    result = await (
        await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    ).result()
    assert result.status is DeployStatus.DEPLOYED
    after = flysim.stats.by_status
    injected = sum(after.get(c, 0) - before.get(c, 0) for c in (429, 500, 502, 503))
    assert injected > 0, "faults were injected"
    [row] = await rows_of(request.project_id)
    assert row["status"] == "deployed"


async def test_fly_422_fails_fast_with_failed_row(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
) -> None:
    # Another organisation owns the app name: the create answers 422 "name taken".
    request = make_request()
    take_app_name(flysim, request.app_name)
    handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    with pytest.raises(DeployFailed) as info:
        await handle.result()
    assert info.value.result.status == "failed"
    assert "another organisation" in (info.value.result.error or "")
    [row] = await rows_of(request.project_id)
    assert row["status"] == "failed"
    assert row["error"] == info.value.result.error
    history = await handle.workflow.fetch_history()
    attempts = [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
    ]
    # Exactly one attempt per activity: nothing was retried.
    assert attempts and max(attempts) == 1


async def test_health_never_ok_records_failure_with_reason(
    temporal_client: Client,
    settings: Settings,
    rows_of: Rows,
    worker: None,
    make_request: Callable[..., DeployRequest],
    flysim: Any,
) -> None:
    bad_image = "registry.fly.io/turbobackend-test:broken"
    flysim.config.unhealthy_images.add(bad_image)
    request = make_request(image=bad_image)
    handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    with pytest.raises(DeployFailed) as info:
        await handle.result()
    [row] = await rows_of(request.project_id)
    # A first deploy has nothing to roll back to: it fails and leaves no machine running.
    assert row["status"] == "failed"
    assert "unhealthy" in row["error"].lower() or "health" in row["error"].lower()
    assert info.value.result.status == "failed"
    assert app_machines(flysim, request.app_name) == []


async def test_invalid_input_is_rejected_before_any_side_effect(
    temporal_client: Client, settings: Settings, flysim: Any, repo: str
) -> None:
    calls_before = flysim.stats.total_requests
    with pytest.raises(ValueError, match="project id"):
        DeployRequest(project_id="Bad_Project", repo_url=repo, image=IMAGE)
    with pytest.raises(ValueError, match="shell metacharacters"):
        DeployRequest(project_id="ok", repo_url="https://x.test/a;rm -rf /", image=IMAGE)
    with pytest.raises(ValueError, match="region"):
        DeployRequest(project_id="ok", repo_url=repo, image=IMAGE, region="mars")
    with pytest.raises(ValueError, match="image"):
        DeployRequest(project_id="ok", repo_url=repo, image="Not An Image")
    assert flysim.stats.total_requests == calls_before
    listed = [w async for w in temporal_client.list_workflows("WorkflowId = 'deploy-ok'")]
    assert listed == []


async def test_token_is_absent_from_history(
    temporal_client: Client,
    settings: Settings,
    worker: None,
    make_request: Callable[..., DeployRequest],
    fly_token: str,
) -> None:
    request = make_request()
    handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    await handle.result()
    history = await handle.workflow.fetch_history()
    exported = readable_history(history)
    # The export is real and its payloads readable: the request and the token's parameter
    # name are there, the token is not.
    assert request.repo_url in exported
    assert "/turbobackend/flyio/api_token" in exported
    secret_part = fly_token.split("fm2_", 1)[1]
    assert secret_part not in exported
    assert secret_part[:24] not in exported
