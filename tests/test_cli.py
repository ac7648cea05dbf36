"""The `turbodeploy` command, run as a subprocess against the session's servers, with the
worker composed as `python worker.py` composes it running in this process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner
from harness import app_machines
from temporalio import activity, workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.worker import Worker

from core.models import DeployProgress
from core.settings import Settings
from turbodeploy import embedded
from turbodeploy.cli import main as turbodeploy_cli
from turbodeploy.stack import publish_example

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "registry.fly.io/turbobackend-cli:deployment-1"
IMAGE_2 = "registry.fly.io/turbobackend-cli:deployment-2"
# Every wait and poll of a deploy, in seconds, small enough for the emulator.
FAST = json.dumps(
    {
        "health_deadline": 3,
        "health_poll_initial": 0.02,
        "health_poll_max": 0.1,
        "health_request_timeout": 2,
        "machine_wait_timeout": 3,
        "machine_poll_interval": 0.02,
        "app_visible_timeout": 2,
        "app_visible_poll": 0.02,
        # Cancellation reaches an activity with a heartbeat, sent at most every 80% of this.
        "heartbeat_timeout": 1,
    }
)
STEP_TICK = re.compile(r"^  ✓ (\w+)  \(\d+\.\ds\)$", re.MULTILINE)

pytestmark = pytest.mark.usefixtures("calm_emulator")


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env(settings: Settings) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TURBODEPLOY_") and k not in ("DATABASE_URL", "PG_DB_SCHEMA")
    }
    env.update(
        TURBODEPLOY_TEMPORAL_ADDRESS=settings.temporal_address,
        TURBODEPLOY_TASK_QUEUE=settings.task_queue,
        DATABASE_URL=settings.database_url or "",
        TURBODEPLOY_DB_SCHEMA=settings.db_schema,
        TURBODEPLOY_TEMPORAL_UI_URL="http://ui.test",
    )
    return env


@pytest.fixture
def cli(settings: Settings) -> Callable[..., Any]:
    env = cli_env(settings)

    async def run(*args: str, extra_env: dict[str, str] | None = None) -> Run:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "turbodeploy.cli",
            *args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**env, **(extra_env or {})},
        )
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode is not None
        return Run(proc.returncode, out.decode(), err.decode())

    return run


async def wait_for_rollout(handle: Any) -> None:
    """Until the deploy is rolling out or checking health: a slow, unhealthy image keeps
    it there."""
    for _ in range(500):
        progress = await handle.query("progress", result_type=DeployProgress)
        if progress.step in ("rollout", "health"):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the deploy never reached the rollout; it is at {progress.step}")


async def test_deploy_wait_then_status_history_releases(
    cli: Callable[..., Any],
    worker: None,
    settings: Settings,
    project_id: str,
    repo: str,
) -> None:
    app = f"turbobackend-{project_id}"
    url = settings.app_url(app)
    run = await cli(
        "deploy", project_id, "--repo", repo, "--image", IMAGE, "--timings", FAST,
        "--wait", "--poll-interval", "0.02",
    )  # fmt: skip
    assert run.code == 0, run.err
    ticks = STEP_TICK.findall(run.out)
    # The row is written while the token is fetched, so either may be ticked first.
    assert set(ticks[:2]) == {"record_start", "credentials"}, ticks
    assert {"credentials", "fly_config", "app", "rollout", "health"} <= set(ticks)
    assert len(ticks) == len(set(ticks)), "each step is ticked once"
    last = run.out.strip().splitlines()[-1]
    assert re.fullmatch(rf"✓ deployed {re.escape(url)}  \(\d+\.\ds\)", last), last
    assert "\x1b[" not in run.out, "no terminal codes when stdout is not a terminal"

    status = await cli("status", project_id, "--json")
    assert status.code == 0, status.err
    info = status.json()
    assert info["workflow_id"] == f"deploy-{project_id}"
    assert info["workflow_status"] == "COMPLETED"
    assert info["record"]["status"] == "deployed"
    assert info["record"]["url"] == url
    assert info["ui"].startswith(f"http://ui.test/namespaces/default/workflows/deploy-{project_id}")
    # Each finished step with its own duration, in the JSON and in the table.
    progress = info["progress"]
    assert set(progress["step_seconds"]) == set(progress["completed_steps"])
    assert all(seconds >= 0 for seconds in progress["step_seconds"].values())
    table = await cli("status", project_id)
    # (The row lists the steps as they ended: the record and the token in either order.)
    for step in ("record_start", "credentials", "rollout", "health"):
        assert re.search(rf"\b{step} \d+\.\ds\b", table.out), table.out

    history = await cli("history", project_id, "--json")
    assert history.code == 0, history.err
    [row] = history.json()
    assert row["status"] == "deployed" and row["image"] == IMAGE and row["url"] == url
    deployment_id = row["deployment_id"]

    releases = await cli("releases", project_id, "--json")
    assert releases.code == 0, releases.err
    [release] = releases.json()
    assert release["deployment_id"] == deployment_id
    assert release["status"] == "deployed"
    assert release["image"] == IMAGE
    assert release["machines"]

    table = await cli("releases", project_id)
    assert table.code == 0 and deployment_id in table.out and "deployed" in table.out
    table = await cli("history", project_id)
    assert table.code == 0 and deployment_id in table.out


async def test_history_and_releases_show_the_image_tried_and_the_image_serving(
    cli: Callable[..., Any],
    worker: None,
    project_id: str,
    repo: str,
    flysim: Any,
) -> None:
    flysim.config.unhealthy_images.add(IMAGE_2)
    for image, code in ((IMAGE, 0), (IMAGE_2, 1)):
        run = await cli(
            "deploy", project_id, "--repo", repo, "--image", image, "--timings", FAST,
            "--wait", "--json", "--poll-interval", "0.02",
        )  # fmt: skip
        assert run.code == code, run.err
    assert run.json()["status"] == "rolled_back"
    assert (run.json()["image"], run.json()["serving_image"]) == (IMAGE_2, IMAGE)

    history = await cli("history", project_id, "--json")
    assert history.code == 0, history.err
    bad, good = history.json()
    assert (bad["status"], bad["image"], bad["serving_image"]) == ("rolled_back", IMAGE_2, IMAGE)
    assert (good["status"], good["image"], good["serving_image"]) == ("deployed", IMAGE, IMAGE)
    releases = await cli("releases", project_id, "--json")
    assert releases.code == 0, releases.err
    assert [(r["image"], r["serving_image"]) for r in releases.json()] == [
        (IMAGE_2, IMAGE),
        (IMAGE, IMAGE),
    ]

    for command in ("history", "releases"):
        table = await cli(command, project_id)
        assert table.code == 0, table.err
        assert "serving" in table.out
        [line] = [x for x in table.out.splitlines() if bad["deployment_id"] in x]
        assert line.index(IMAGE_2) < line.index(IMAGE + " "), line


async def test_failed_deploy_exits_1_and_retry_deploys_again(
    cli: Callable[..., Any],
    worker: None,
    settings: Settings,
    project_id: str,
    repo: str,
    flysim: Any,
) -> None:
    flysim.config.unhealthy_images.add(IMAGE)
    run = await cli(
        "deploy", project_id, "--repo", repo, "--image", IMAGE, "--timings", FAST,
        "--wait", "--json", "--poll-interval", "0.02",
    )  # fmt: skip
    assert run.code == 1, run.err
    failed = run.json()  # stdout is JSON only
    assert failed["status"] in ("failed", "rolled_back")
    assert failed["error"]
    assert failed["project_id"] == project_id
    assert failed["workflow_id"] == f"deploy-{project_id}"
    first_id = failed["deployment_id"]

    status = await cli("status", project_id, "--json")
    assert status.code == 1
    assert status.json()["record"]["status"] == failed["status"]

    flysim.config.unhealthy_images.clear()
    retried = await cli("retry", project_id, "--wait", "--json", "--poll-interval", "0.02")
    assert retried.code == 0, retried.err + retried.out
    result = retried.json()
    assert result["status"] == "deployed"
    assert result["deployment_id"] != first_id
    assert result["image"] == IMAGE
    assert result["url"] == settings.app_url(f"turbobackend-{project_id}")


async def test_rollback_to_the_previous_release(
    cli: Callable[..., Any],
    worker: None,
    project_id: str,
    repo: str,
    flysim: Any,
) -> None:
    app = f"turbobackend-{project_id}"
    for image in (IMAGE, IMAGE_2):
        run = await cli(
            "deploy", project_id, "--repo", repo, "--image", image, "--timings", FAST,
            "--wait", "--json", "--poll-interval", "0.02",
        )  # fmt: skip
        assert run.code == 0, run.err
    assert {m["config"]["image"] for m in app_machines(flysim, app)} == {IMAGE_2}

    unknown = await cli("rollback", project_id, "--to", "d-unknown", "--wait", "--json")
    assert unknown.code == 1
    assert unknown.json()["status"] != "deployed"

    back = await cli("rollback", project_id, "--timings", FAST, "--wait", "--poll-interval", "0.02")
    assert back.code == 0, back.err + back.out
    assert "✓ deployed" in back.out
    assert {m["config"]["image"] for m in app_machines(flysim, app)} == {IMAGE}


async def test_status_says_what_a_stuck_deploy_waits_for_and_why(
    cli: Callable[..., Any],
    worker: None,
    temporal_client: Client,
    calm_emulator: Any,
    project_id: str,
    repo: str,
) -> None:
    faults = calm_emulator.config.faults
    faults.error_codes, faults.error_rate = (503,), 1.0
    started = await cli("deploy", project_id, "--repo", repo, "--image", IMAGE, "--timings", FAST)
    assert started.code == 0, started.err
    handle = temporal_client.get_workflow_handle(f"deploy-{project_id}")
    for _ in range(400):
        pending = (await handle.describe()).raw_description.pending_activities
        # An attempt starved of CPU may end in a heartbeat timeout instead; wait for one
        # that ended on the injected error, which the status must explain.
        if (
            pending
            and pending[0].attempt >= 2
            and "Look up Fly app" in pending[0].last_failure.message
        ):
            break
        await asyncio.sleep(0.05)

    status = await cli("status", project_id, "--json")
    assert status.code == 0, status.err
    info = status.json()
    [step] = info["pending"]
    assert step["activity"] == "ensure_fly_app"
    assert step["attempt"] >= 2 and step["maximum_attempts"] == 10
    assert step["last_failure"].startswith("FlyRetryableError: Look up Fly app")
    assert "503" in step["last_failure"]
    # The client's own retries heartbeat, saying what they wait for: no heartbeat timeout
    # hides the provider's answer.
    assert "503" in step["last_heartbeat"] and "retrying in" in step["last_heartbeat"]
    assert step["worker"]
    assert info["workers"]["workflow"] and info["workers"]["activity"]
    table = await cli("status", project_id)
    assert "waiting on" in table.out and "ensure_fly_app" in table.out, table.out
    assert "last failure" in table.out and "no worker" not in table.out

    # The provider recovers and the deploy carries on by itself.
    faults.error_rate = 0.0
    for _ in range(400):
        info = (await cli("status", project_id, "--json")).json()
        if info["workflow_status"] != "RUNNING":
            break
        await asyncio.sleep(0.1)
    assert info["record"]["status"] == "deployed"
    assert "pending" not in info


async def test_status_says_when_no_worker_polls_the_queue(
    cli: Callable[..., Any],
    temporal_client: Client,
    settings: Settings,
    project_id: str,
    repo: str,
) -> None:
    started = await cli("deploy", project_id, "--repo", repo, "--image", IMAGE, "--timings", FAST)
    assert started.code == 0, started.err
    handle = temporal_client.get_workflow_handle(f"deploy-{project_id}")
    try:
        status = await cli("status", project_id, "--json")
        assert status.code == 0, status.err + status.out
        info = status.json()
        assert info["workflow_status"] == "RUNNING"
        assert info["pending"] == []
        assert info["workers"] == {
            "task_queue": settings.task_queue,
            "recent_seconds": 120,
            "workflow": [],
            "activity": [],
            "earlier": [],
        }
        table = await cli("status", project_id)
        assert f"no worker polls {settings.task_queue}" in table.out, table.out
    finally:
        await handle.terminate("test over")


@activity.defn(name="record_start")
async def idle_activity() -> None:
    """Gives a test worker something to poll activity tasks for."""


async def test_status_counts_only_the_workers_seen_lately(
    cli: Callable[..., Any],
    temporal_client: Client,
    settings: Settings,
    project_id: str,
    repo: str,
) -> None:
    # A worker polls the queue for a moment, then stops: the server keeps it in the
    # queue's poller list for minutes.
    gone = f"gone-{uuid.uuid4().hex[:6]}@test"
    async with Worker(
        temporal_client,
        task_queue=settings.task_queue,
        workflows=[BrokenDeployWorkflow],
        activities=[idle_activity],
        identity=gone,
    ):
        await asyncio.sleep(1)
    started = await cli("deploy", project_id, "--repo", repo, "--image", IMAGE, "--timings", FAST)
    assert started.code == 0, started.err
    handle = temporal_client.get_workflow_handle(f"deploy-{project_id}")
    try:
        # Within the default two minutes it still counts: it may only be between polls.
        info = (await cli("status", project_id, "--json")).json()
        assert info["workers"]["workflow"] == [gone] and info["workers"]["activity"] == [gone]
        assert info["workers"]["earlier"] == []

        await asyncio.sleep(1.5)
        status = await cli("status", project_id, "--json", "--workers-seen-within", "1")
        assert status.code == 0, status.err
        workers = status.json()["workers"]
        assert workers["workflow"] == [] and workers["activity"] == []
        assert {(p["identity"], p["kind"]) for p in workers["earlier"]} == {
            (gone, "workflow"),
            (gone, "activity"),
        }
        assert all(p["last_seen"] for p in workers["earlier"])
        table = await cli("status", project_id, "--workers-seen-within", "1")
        [line] = [line for line in table.out.splitlines() if line.strip().startswith("workers")]
        assert f"no worker polls {settings.task_queue}" in line, table.out
        assert f"last seen: {gone}" in line and "ago" in line, line
    finally:
        await handle.terminate("test over")


async def test_list_shows_each_projects_latest_run_and_filters_on_it(
    cli: Callable[..., Any],
    worker: None,
    temporal_client: Client,
    tmp_path: Path,
    flysim: Any,
) -> None:
    good, bad, recovered, waiting = (f"l{uuid.uuid4().hex[:10]}" for _ in range(4))
    flysim.config.unhealthy_images.add(IMAGE_2)

    async def deploy(project: str, image: str) -> Run:
        repo = publish_example("nitro-hello", tmp_path / project)
        return await cli(
            "deploy", project, "--repo", repo, "--image", image, "--timings", FAST,
            "--wait", "--json", "--poll-interval", "0.02",
        )  # fmt: skip

    assert (await deploy(good, IMAGE)).code == 0
    assert (await deploy(bad, IMAGE_2)).code == 1
    # Failed once, then deployed: two runs, the latest deployed.
    first = await deploy(recovered, IMAGE_2)
    assert first.code == 1
    failed = first.json()["status"]
    assert failed in ("failed", "rolled_back")
    assert (await deploy(recovered, IMAGE)).code == 0
    # One more, submitted on a queue no worker polls: it stays running.
    repo = publish_example("nitro-hello", tmp_path / waiting)
    idle = {"TURBODEPLOY_TASK_QUEUE": f"idle-{uuid.uuid4().hex[:8]}"}
    started = await cli("deploy", waiting, "--repo", repo, "--image", IMAGE, extra_env=idle)
    assert started.code == 0, started.err
    mine = {good, bad, recovered, waiting}
    try:

        async def listed(*args: str) -> dict[str, dict[str, Any]]:
            run = await cli("list", "--json", *args)
            assert run.code == 0, run.err
            rows = [d for d in run.json() if d["project_id"] in mine]
            projects = [d["project_id"] for d in rows]
            assert len(projects) == len(set(projects)), f"one line per project: {projects}"
            return {d["project_id"]: d for d in rows}

        # The visibility store is updated a moment after each change.
        for _ in range(100):
            everything = await listed()
            if (
                set(everything) == mine
                and everything[bad]["deploy_status"] in ("failed", "rolled_back")
                and everything[recovered]["deploy_status"] == "deployed"
            ):
                break
            await asyncio.sleep(0.1)
        assert everything[good]["deploy_status"] == "deployed"
        assert everything[good]["workflow_status"] == "COMPLETED"
        assert everything[good]["fly_app"] == f"turbobackend-{good}"
        assert everything[bad]["deploy_status"] in ("failed", "rolled_back")
        assert everything[recovered]["deploy_status"] == "deployed"
        assert everything[waiting]["workflow_status"] == "RUNNING"
        # The latest run is the one listed: the second deploy of `recovered`.
        description = await temporal_client.get_workflow_handle(f"deploy-{recovered}").describe()
        assert everything[recovered]["run_id"] == description.run_id

        running = await listed("--running")
        assert set(running) == {waiting}
        deployed = await listed("--status", "deployed")
        assert set(deployed) == {good, recovered}
        # The status of each project's latest deployment, not of any run it ever had.
        assert recovered not in await listed("--status", failed)
        if everything[bad]["deploy_status"] == failed:
            assert bad in await listed("--status", failed)
        assert (await cli("list", "--status", "bogus")).code == 2

        table = await cli("list")
        assert table.code == 0 and good in table.out and "deployed" in table.out
        assert len([line for line in table.out.splitlines() if recovered in line]) == 1
    finally:
        await temporal_client.get_workflow_handle(f"deploy-{waiting}").terminate("test over")


@workflow.defn(name="DeployProjectWorkflow", sandboxed=False)
class BrokenDeployWorkflow:
    """Registered under the deploy workflow's name: code that fails on every workflow task,
    as a release with a bug (or a change that breaks replay) would."""

    @workflow.run
    async def run(self, request: Any) -> None:
        raise RuntimeError("this workflow code cannot run")


async def test_status_shows_a_failing_workflow_task_and_terminate_ends_it(
    cli: Callable[..., Any],
    temporal_client: Client,
    settings: Settings,
    project_id: str,
    repo: str,
) -> None:
    async with Worker(
        temporal_client, task_queue=settings.task_queue, workflows=[BrokenDeployWorkflow]
    ):
        started = await cli("deploy", project_id, "--repo", repo, "--image", IMAGE)
        assert started.code == 0, started.err
        handle = temporal_client.get_workflow_handle(f"deploy-{project_id}")
        for _ in range(200):
            raw = (await handle.describe()).raw_description
            if raw.pending_workflow_task.attempt >= 2:
                break
            await asyncio.sleep(0.05)

        status = await cli("status", project_id, "--json")
        assert status.code == 0, status.err
        task = status.json()["workflow_task"]
        assert task["attempt"] >= 2
        assert "this workflow code cannot run" in task["last_failure"]
        assert "unhandled_failure" in task["cause"]
        assert status.json()["pending"] == []
        table = await cli("status", project_id)
        assert "failing, attempt" in table.out and "turbodeploy terminate" in table.out

        # Cancel cannot help (cleanup is workflow code too); terminate ends it.
        ended = await cli("terminate", project_id, "--reason", "broken release", "--json")
        assert ended.code == 0, ended.err
        assert ended.json()["closed"] == []
        assert (await handle.describe()).status == WorkflowExecutionStatus.TERMINATED


async def test_cancel_a_running_deploy(
    cli: Callable[..., Any],
    worker: None,
    temporal_client: Client,
    project_id: str,
    repo: str,
    flysim: Any,
) -> None:
    flysim.config.unhealthy_images.add(IMAGE)
    # The unhealthy machine keeps the rollout waiting until it is cancelled.
    slow = json.dumps({**json.loads(FAST), "machine_wait_timeout": 60, "health_deadline": 60})
    started = await cli(
        "deploy", project_id, "--repo", repo, "--image", IMAGE, "--timings", slow, "--json"
    )  # fmt: skip
    assert started.code == 0, started.err
    assert started.json()["workflow_id"] == f"deploy-{project_id}"
    handle = temporal_client.get_workflow_handle(f"deploy-{project_id}")
    await wait_for_rollout(handle)
    await asyncio.sleep(0.3)
    # What it waits for: a started step, since when, and what it last said.
    for _ in range(50):
        [step] = (await cli("status", project_id, "--json")).json()["pending"]
        if step["last_heartbeat"]:
            break
        await asyncio.sleep(0.1)
    assert step["activity"] in ("roll_out_release", "check_health")
    assert step["state"] == "started" and step["last_started_at"] and step["worker"]
    # Both steps heartbeat their progress as fields: a JSON object, not a Python repr.
    heartbeat = step["last_heartbeat"]
    assert isinstance(heartbeat, dict), heartbeat
    assert {"step", "done"} <= set(heartbeat) or {"attempts", "started_at"} <= set(heartbeat)
    table = (await cli("status", project_id)).out
    assert "running for" in table
    [line] = [line for line in table.splitlines() if line.strip().startswith("heartbeat")]
    assert "{" not in line and "'" not in line, line
    assert "step: " in line or "attempts: " in line, line

    run = await cli("cancel", project_id, "--json")
    assert run.code == 0, run.err
    assert run.json() == {"project_id": project_id, "cancel_requested": True}
    with contextlib.suppress(Exception):
        await asyncio.wait_for(handle.result(), timeout=30)
    status = (await cli("status", project_id, "--json")).json()
    assert status["workflow_status"] == "CANCELED"
    assert status["record"]["status"] == "cancelled"
    again = await cli("cancel", project_id)
    assert again.code == 1 and "no deploy" in again.err


async def test_terminate_records_the_open_deployments_and_retry_converges(
    cli: Callable[..., Any],
    worker: None,
    temporal_client: Client,
    project_id: str,
    repo: str,
    flysim: Any,
) -> None:
    app = f"turbobackend-{project_id}"
    first = await cli(
        "deploy", project_id, "--repo", repo, "--image", IMAGE, "--timings", FAST,
        "--wait", "--json", "--poll-interval", "0.02",
    )  # fmt: skip
    assert first.code == 0, first.err
    good = first.json()["deployment_id"]
    flysim.config.unhealthy_images.add(IMAGE_2)
    slow = json.dumps({**json.loads(FAST), "machine_wait_timeout": 60, "health_deadline": 60})
    started = await cli(
        "deploy", project_id, "--repo", repo, "--image", IMAGE_2, "--timings", slow, "--json"
    )  # fmt: skip
    assert started.code == 0, started.err
    stuck = started.json()["deployment_id"]
    handle = temporal_client.get_workflow_handle(f"deploy-{project_id}")
    await wait_for_rollout(handle)

    assert (await cli("terminate", project_id)).code == 2, "a reason is required"
    assert (await cli("terminate", project_id, "--reason", "  ")).code == 2
    run = await cli("terminate", project_id, "--reason", "stuck at 3am", "--json")
    assert run.code == 0, run.err
    out = run.json()
    assert out["terminated"] is True and out["closed"] == [stuck]
    assert out["last_good_release"] == good
    assert (await handle.describe()).status == WorkflowExecutionStatus.TERMINATED

    status = await cli("status", project_id, "--json")
    assert status.code == 1, "a terminated deploy is a failed one"
    record = status.json()["record"]
    assert record["deployment_id"] == stuck and record["status"] == "failed"
    assert "terminated by an operator: stuck at 3am" in record["error"]
    again = await cli("terminate", project_id, "--reason", "twice")
    assert again.code == 1 and "no deploy" in again.err

    # No cleanup ran; a retry of the same request, healthy this time, converges.
    flysim.config.unhealthy_images.discard(IMAGE_2)
    retried = await cli("retry", project_id, "--wait", "--json", "--poll-interval", "0.02")
    assert retried.code == 0, retried.err + retried.out
    assert retried.json()["image"] == IMAGE_2
    assert {m["config"]["image"] for m in app_machines(flysim, app)} == {IMAGE_2}


async def test_invalid_input_exits_2_and_nothing_starts(
    temporal_client: Client, settings: Settings, project_id: str
) -> None:
    # Validation happens before any connection: click's runner, in this process, suffices.
    runner = CliRunner(env=cli_env(settings))

    def cli(*args: str) -> Run:
        result = runner.invoke(turbodeploy_cli, list(args))
        return Run(result.exit_code, result.stdout, result.stderr)

    run = cli("deploy", "Not_A_Project", "--repo", "/tmp/x", "--json")
    assert run.code == 2
    assert "project_id" in run.json()["problems"][0]
    run = cli("deploy", project_id, "--repo", "relative/path", "--region", "mars")
    assert run.code == 2
    assert "region" in run.err and "repo_url" in run.err
    run = cli("deploy", project_id, "--repo", "/tmp/x", "--env", "NOEQUALS", "--json")
    assert run.code == 2 and "NAME=VALUE" in run.json()["error"]
    run = cli("deploy", project_id, "--repo", "/tmp/x", "--timings", "[1]")
    assert run.code == 2
    run = cli("deploy", project_id, "--repo", "/tmp/x", "--timings", '{"health_deadline": -1}')
    assert run.code == 2 and "health_deadline must be positive" in run.err
    run = cli("rollback", project_id, "--to", "Bad Id!", "--json")
    assert run.code == 2 and run.json()["problems"]
    for command in ("status", "history", "releases", "cancel", "retry"):
        run = cli(command, "UPPER", "--json")
        assert run.code == 2, command
        assert "project id" in run.json()["error"]
    run = cli("deploy")  # a usage error, from click
    assert run.code == 2
    with pytest.raises(RPCError, match="not found"):
        await temporal_client.get_workflow_handle(f"deploy-{project_id}").describe()


async def test_unknown_project_and_unreachable_server_exit_1(
    cli: Callable[..., Any], project_id: str
) -> None:
    run = await cli("status", project_id, "--json")
    assert run.code == 1
    assert run.json() == {"error": f"no deploy of project {project_id} found"}
    run = await cli("cancel", project_id)
    assert run.code == 1
    run = await cli("retry", project_id, "--json")
    assert run.code == 1 and run.json()["error"]
    # This test runs no worker: the records' schema does not exist yet.
    history = await cli("history", project_id, "--json")
    assert history.code == 1
    assert "no deployment records in schema" in history.json()["error"]
    dead = {"TURBODEPLOY_TEMPORAL_ADDRESS": f"127.0.0.1:{embedded.free_port()}"}
    run = await cli("status", project_id, "--json", extra_env=dead)
    assert run.code == 1
    assert "cannot reach Temporal" in run.json()["error"]


async def test_an_unreachable_database_says_which_and_what_to_check(
    cli: Callable[..., Any], project_id: str, tmp_path: Path
) -> None:
    password = "s3cret-pw"
    # Nothing listens on the port, and no server made a socket in the directory.
    port = embedded.free_port()
    tcp = {"DATABASE_URL": f"postgresql://deployer:{password}@127.0.0.1:{port}/deploys"}
    nowhere = tmp_path / "no-postgres"
    unix = {"DATABASE_URL": f"postgresql://deployer:{password}@/deploys?host={nowhere}"}
    for env, where, why in (
        (tcp, f"127.0.0.1:{port}", "refused the connection"),
        (unix, f"{nowhere}/.s.PGSQL.5432", "no such socket"),
    ):
        run = await cli("history", project_id, "--json", extra_env=env)
        assert run.code == 1
        answer = run.json()
        message = answer["error"]
        assert answer["database"] == where
        assert where in message and why in message, message
        assert "database deploys, user deployer" in message, message
        assert "PostgreSQL is not running there" in message and "check DATABASE_URL" in message
        assert "Errno" not in message and "FileNotFoundError" not in message, message
        table = await cli("releases", project_id, extra_env={**env, "COLUMNS": "400"})
        assert table.code == 1 and where in table.err and "check DATABASE_URL" in table.err
        assert password not in run.out + run.err + table.out + table.err


async def test_live_progress_on_a_terminal(
    worker: None, settings: Settings, project_id: str, repo: str
) -> None:
    main_fd, child_fd = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "turbodeploy.cli",
        "deploy", project_id, "--repo", repo, "--image", IMAGE, "--timings", FAST,
        "--wait", "--poll-interval", "0.02",
        stdout=child_fd, stderr=subprocess.PIPE, env={**cli_env(settings), "COLUMNS": "160"},
    )  # fmt: skip
    os.close(child_fd)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(main_fd, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = asyncio.get_running_loop().run_in_executor(None, read)
    code = await asyncio.wait_for(proc.wait(), timeout=120)
    await asyncio.wait_for(reader, timeout=10)
    os.close(main_fd)
    output = b"".join(chunks).decode(errors="replace")
    assert code == 0, output
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert "\x1b[" in output, "a terminal gets the live display"
    assert re.search(r"✓ rollout\s+\(\d+\.\ds\)", plain)
    assert settings.app_url(f"turbobackend-{project_id}") in plain


# ------------------------------------------------------------------------- turbodeploy up


def _processes_using(path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(path) in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
    return found


def test_up_runs_the_stack_and_stops_on_sigint(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    ports = {p: str(embedded.free_port()) for p in ("temporal", "ui", "flysim", "metrics")}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TURBODEPLOY_") and k != "DATABASE_URL"
    }
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "turbodeploy.cli", "up", "--state-dir", str(state),
            "--temporal-port", ports["temporal"], "--ui-port", ports["ui"],
            "--flysim-port", ports["flysim"], "--metrics-port", ports["metrics"],
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if line.startswith("ready"):
                break
        assert lines and lines[-1].startswith("ready"), "\n".join(lines) + proc.stderr.read()
        text = "\n".join(lines)
        assert f"export TURBODEPLOY_TEMPORAL_ADDRESS=127.0.0.1:{ports['temporal']}" in text
        assert "export DATABASE_URL=" in text
        assert f"http://127.0.0.1:{ports['ui']}" in text
        assert f"http://127.0.0.1:{ports['metrics']}/metrics" in text
        embedded.wait_for_port("127.0.0.1", int(ports["temporal"]), timeout=5)
        embedded.wait_for_port("127.0.0.1", int(ports["flysim"]), timeout=5)
        embedded.wait_for_port("127.0.0.1", int(ports["metrics"]), timeout=5)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert _processes_using(state), "the servers run from the state directory"

        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code in (0, 130), proc.stderr.read() if proc.stderr else ""
    assert "stopped" in rest
    assert [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
    assert _processes_using(state) == []
    with pytest.raises(OSError):
        embedded.wait_for_port("127.0.0.1", int(ports["temporal"]), timeout=0.5)


def _packages_imported_by(module: str) -> set[str]:
    probe = f"import sys, {module}; print(' '.join({{n.split('.')[0] for n in sys.modules}}))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return set(out.split())


def test_the_cli_and_the_client_import_no_worker_code() -> None:
    # What every `turbodeploy` command and the platform's handler load before they start.
    worker_code = {"workflows", "activities", "worker", "flysim", "bench"}
    its_libraries = {"httpx", "asyncpg", "boto3"}
    for module in ("turbodeploy.cli", "turbodeploy.client", "turbodeploy.diagnostics"):
        assert _packages_imported_by(module) & (worker_code | its_libraries) == set(), module
    # `--help` and an invalid request are answered before any connection, without it.
    assert "temporalio" not in _packages_imported_by("turbodeploy.cli")


def test_bench_runs_the_benchmark_with_its_options_and_exit_code(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def bench(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "turbodeploy.cli", "bench", *args],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
        )  # fmt: skip

    usage = bench("--help")
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("usage: turbodeploy bench") and "--worker-env" in usage.stdout
    refused = bench("--worker-env", "NOEQUALS")
    assert refused.returncode == 2
    assert "--worker-env takes NAME=VALUE" in refused.stderr


def test_a_heartbeat_reads_as_fields_on_one_line() -> None:
    from turbodeploy.cli import _heartbeat_text

    details = {"done": ["m1"], "current": None, "step": "updating machine", "leases": {"m2": "ab"}}
    assert _heartbeat_text(details) == "done: m1; step: updating machine; leases: m2=ab"
