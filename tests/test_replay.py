"""The deploy workflow stays deterministic: saved histories, and fresh ones, replay cleanly.

The saved histories under tests/histories/ are what running deploys look like to the
current code; a change that would break them breaks this test. Regenerate them after an
intended incompatible change with

    TURBODEPLOY_UPDATE_HISTORIES=1 pytest tests/test_replay.py

That replaces every saved history: the old ones are what keeps the code behind each
`workflow.patched` tested. To save a new kind of run only, name it:
`TURBODEPLOY_UPDATE_HISTORIES=stopped,started` writes those two and leaves the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from harness import DEPLOY_FAILURES, IMAGE, fast_timings, reset_faults, workflow_of
from temporalio.client import Client, WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from turbodeploy.client import start_deploy, start_destroy, start_start, start_stop
from turbodeploy.models import DeployRequest
from turbodeploy.settings import Settings
from turbodeploy.stack import publish_example
from worker import create_worker
from workflows import DeployProjectWorkflow

HISTORIES = Path(__file__).absolute().parent / "histories"
UPDATE = os.environ.get("TURBODEPLOY_UPDATE_HISTORIES", "")
BROKEN_IMAGE = "registry.fly.io/turbobackend-test:broken"
# Representative runs; `secrets_rollback` is a failed release whose changed secret is put
# back (the second deploy of its project). Then one project's stop, start and destroy
# after its deploy: each request is a run of its own.
DEPLOY_RUNS = ("success", "app_name_taken", "health_failure", "secrets_rollback")
LIFECYCLE_RUNS = {
    "stopped": (start_stop, "stop_fly_machines"),
    "started": (start_start, "start_fly_machines"),
    "destroyed": (start_destroy, "delete_fly_app"),
}
RUNS = (*DEPLOY_RUNS, *LIFECYCLE_RUNS)


def _replayer() -> Replayer:
    return Replayer(workflows=[DeployProjectWorkflow], data_converter=pydantic_data_converter)


@pytest_asyncio.fixture(scope="module")
async def fresh_histories(
    temporal_client: Client,
    postgres_url: str,
    ssm_endpoint: str,
    flysim: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[dict[str, WorkflowHistory]]:
    """One real run of each kind, on the code under test."""
    tmp = tmp_path_factory.mktemp("replay")
    reset_faults(flysim)
    settings = Settings(
        task_queue=f"replay-{uuid.uuid4().hex[:8]}",
        database_url=postgres_url,
        db_schema=f"r_{uuid.uuid4().hex[:8]}",
        aws_endpoint_url=ssm_endpoint,
        fly_api_base_url=flysim.base_url,
        app_url_template=flysim.app_url_template,
        work_dir=str(tmp / "work"),
    )
    histories: dict[str, WorkflowHistory] = {}
    flysim.config.unhealthy_images.add(BROKEN_IMAGE)
    try:
        async with create_worker(temporal_client, settings) as w:
            task = asyncio.create_task(w.run())
            try:
                for name in DEPLOY_RUNS:
                    histories[name] = await _run(
                        temporal_client, settings, flysim, tmp, name, ssm_endpoint
                    )
                histories.update(await _lifecycle(temporal_client, settings, tmp))
            finally:
                await w.shutdown()
                await task
    finally:
        reset_faults(flysim)
    if UPDATE:
        HISTORIES.mkdir(exist_ok=True)
        if UPDATE == "1":
            for old in HISTORIES.glob("*.json"):
                old.unlink()
        only = set(RUNS) if UPDATE == "1" else set(UPDATE.split(","))
        for name, history in histories.items():
            if name not in only:
                continue
            data = history.to_json_dict()
            (HISTORIES / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    yield histories


async def _run(
    client: Client, settings: Settings, flysim: Any, tmp: Path, name: str, ssm_endpoint: str
) -> WorkflowHistory:
    import boto3
    import httpx

    project_id = f"replay-{name.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    image = BROKEN_IMAGE if name in ("health_failure", "secrets_rollback") else IMAGE
    request = DeployRequest(
        project_id=project_id,
        repo_url=publish_example("nitro-hello", tmp / f"repos-{name}"),
        image=image,
        timings=fast_timings(),
    )
    if name == "secrets_rollback":
        ssm = boto3.client("ssm", endpoint_url=ssm_endpoint, region_name="us-east-1")
        parameter = f"/replay/{project_id}/token"
        ssm.put_parameter(Name=parameter, Value="first", Type="SecureString")
        first = request.model_copy(update={"image": IMAGE, "secrets": {"TOKEN": parameter}})
        await (await start_deploy(client, first, task_queue=settings.task_queue)).result()
        ssm.put_parameter(Name=parameter, Value="second", Type="SecureString", Overwrite=True)
        request = DeployRequest.model_validate(
            request.model_dump(exclude={"deployment_id"}) | {"secrets": {"TOKEN": parameter}}
        )
    if name == "app_name_taken":
        other = f"FlyV1 fm2_replay-{uuid.uuid4().hex}"
        flysim.config.tokens[other] = "someone-else"
        httpx.post(
            f"{flysim.base_url}/apps",
            json={"name": request.app_name, "org_slug": "someone-else"},
            headers={"Authorization": f"Bearer {other}"},
        ).raise_for_status()
    handle = await start_deploy(client, request, task_queue=settings.task_queue)
    if name == "success":
        await handle.result()
    else:
        with pytest.raises(DEPLOY_FAILURES):
            await handle.result()
    history = await workflow_of(handle).fetch_history()
    if name == "secrets_rollback":
        assert "restore_app_secrets" in json.dumps(history.to_json_dict())
    return history


async def _lifecycle(client: Client, settings: Settings, tmp: Path) -> dict[str, WorkflowHistory]:
    project_id = f"replay-lifecycle-{uuid.uuid4().hex[:6]}"
    request = DeployRequest(
        project_id=project_id,
        repo_url=publish_example("nitro-hello", tmp / "repos-lifecycle"),
        image=IMAGE,
        timings=fast_timings(),
    )
    await (await start_deploy(client, request, task_queue=settings.task_queue)).result()
    histories: dict[str, WorkflowHistory] = {}
    for name, (submit, step) in LIFECYCLE_RUNS.items():
        handle = await submit(
            client, project_id, timings=fast_timings(), task_queue=settings.task_queue
        )
        await handle.result()
        history = await workflow_of(handle).fetch_history()
        assert step in json.dumps(history.to_json_dict()), f"{name}: {step} did not run"
        histories[name] = history
    return histories


@pytest.mark.parametrize("name", RUNS)
async def test_fresh_history_replays(
    name: str, fresh_histories: dict[str, WorkflowHistory]
) -> None:
    history = fresh_histories[name]
    result = await _replayer().replay_workflow(history)
    assert result.replay_failure is None


def _saved() -> list[Path]:
    return sorted(HISTORIES.glob("*.json")) if HISTORIES.is_dir() else []


@pytest.mark.parametrize("path", _saved(), ids=lambda p: p.stem)
async def test_saved_history_replays(path: Path, fresh_histories: dict[str, Any]) -> None:
    # Depends on the fresh runs so that an update run writes the files before they are read.
    data = json.loads(path.read_text())
    history = WorkflowHistory.from_json(f"saved-{path.stem}", data)
    result = await _replayer().replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, (
        f"{path.name} no longer replays: {result.replay_failure}. If the change is "
        "intended, version it (workflow.patched) or regenerate with "
        "TURBODEPLOY_UPDATE_HISTORIES=1"
    )


def test_saved_histories_exist() -> None:
    assert {p.stem for p in _saved()} >= set(RUNS), (
        f"missing saved histories in {HISTORIES}; create them with TURBODEPLOY_UPDATE_HISTORIES=1"
    )
