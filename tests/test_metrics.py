"""The service's metrics on the SDK's Prometheus endpoint, and its structured logs, from a
real worker."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

# The workflow below runs in the sandbox, which re-imports this module: what only the
# activity and the test use is passed through, while `core.metrics` is imported
# in the sandbox as workflow code imports it.
with workflow.unsafe.imports_passed_through():
    import httpx

    from flyapi import FlyClient, FlyUnauthorized
    from turbodeploy import embedded
from core import metrics
from core.logs import TextFormatter, configure_logging, project_id_from_workflow_id


@activity.defn(name="touch_fly")
async def touch_fly(base_url: str, token: str) -> None:
    async with FlyClient(base_url, token, on_response=metrics.record_fly_response) as fly:
        assert await fly.get_app("turbobackend-does-not-exist") is None
        assert await fly.get_app("turbobackend-does-not-exist") is None
    async with FlyClient(base_url, "wrong", on_response=metrics.record_fly_response) as fly:
        with contextlib.suppress(FlyUnauthorized):
            await fly.list_machines("turbobackend-x")


@workflow.defn(name="MetricsProbe")
class MetricsProbe:
    @workflow.run
    async def run(self, base_url: str, token: str) -> None:
        await workflow.execute_activity(
            touch_fly, args=[base_url, token], start_to_close_timeout=timedelta(seconds=30)
        )
        metrics.rollback_performed()
        metrics.deploy_finished("deployed", 42.0)
        metrics.deploy_finished("failed", 3.0)
        metrics.deploy_finished("deployed", 7.5)


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of metric `name` in a Prometheus text exposition."""
    found = []
    for m in re.finditer(rf"^{name}\{{(.*?)\}} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        found.append((labels, float(m.group(2))))
    return found


def value(text: str, name: str, **labels: str) -> float:
    return sum(v for lb, v in samples(text, name) if labels.items() <= lb.items())


async def test_custom_metrics_on_the_sdk_endpoint(
    temporal_env: WorkflowEnvironment, task_queue: str, flysim: Any, fly_token: str
) -> None:
    port = embedded.free_port()
    runtime = metrics.make_runtime(f"127.0.0.1:{port}")
    client = await Client.connect(
        temporal_env.client.service_client.config.target_host,
        runtime=runtime,
        data_converter=pydantic_data_converter,
    )
    async with Worker(
        client, task_queue=task_queue, workflows=[MetricsProbe], activities=[touch_fly]
    ):
        await client.execute_workflow(
            MetricsProbe.run,
            args=[flysim.base_url, fly_token],
            id=f"metrics-{uuid.uuid4().hex[:8]}",
            task_queue=task_queue,
        )
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text

    assert value(text, "turbodeploy_deploys_total", status="deployed") == 2
    assert value(text, "turbodeploy_deploys_total", status="failed") == 1
    assert value(text, "turbodeploy_deploys_total", workflow_type="MetricsProbe") == 3
    assert value(text, "turbodeploy_deploy_duration_seconds_count", status="deployed") == 2
    assert value(text, "turbodeploy_deploy_duration_seconds_sum", status="deployed") == 49.5
    assert (
        value(text, "turbodeploy_deploy_duration_seconds_bucket", status="deployed", le="60") == 2
    )
    assert (
        value(text, "turbodeploy_deploy_duration_seconds_bucket", status="deployed", le="15") == 1
    )
    assert value(text, "turbodeploy_rollbacks_total", kind="automatic") == 1
    fly = "turbodeploy_fly_api_requests_total"
    assert value(text, fly, status_code="404", method="GET", activity_type="touch_fly") == 2
    assert value(text, fly, status_code="401") == 1
    # The SDK's own metrics share the endpoint.
    assert "temporal_workflow_completed" in text


@activity.defn(name="say_something")
async def say_something() -> None:
    activity.logger.info("activity says hello")
    logging.getLogger("turbodeploy.test").warning("plain logger inside the activity")


@workflow.defn(name="LogProbe")
class LogProbe:
    @workflow.run
    async def run(self) -> None:
        workflow.logger.info("workflow says hello")
        await workflow.execute_activity(say_something, start_to_close_timeout=timedelta(seconds=30))


async def test_json_logs_carry_the_deploy_context(
    temporal_client: Client, task_queue: str, project_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("INFO", json_format=True)
    try:
        async with Worker(
            temporal_client,
            task_queue=task_queue,
            workflows=[LogProbe],
            activities=[say_something],
        ):
            handle = await temporal_client.start_workflow(
                LogProbe.run, id=f"deploy-{project_id}", task_queue=task_queue
            )
            await handle.result()
        logging.getLogger("turbodeploy.test").info("outside any deploy")
    finally:
        root.handlers[:], root.level = saved
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    by_message = {e["message"].split(" (")[0]: e for e in lines}

    wf = by_message["workflow says hello"]
    assert wf["project_id"] == project_id
    assert wf["workflow_id"] == f"deploy-{project_id}"
    assert wf["run_id"] == handle.result_run_id
    assert wf["level"] == "INFO" and wf["logger"] == "temporalio.workflow"
    assert "temporal_workflow" not in wf
    for message in ("activity says hello", "plain logger inside the activity"):
        act = by_message[message]
        assert act["project_id"] == project_id
        assert act["workflow_id"] == f"deploy-{project_id}"
        assert act["run_id"] == handle.result_run_id
        assert act["activity_type"] == act["step"] == "say_something"
        assert act["attempt"] == 1
    outside = by_message["outside any deploy"]
    assert "project_id" not in outside and "workflow_id" not in outside
    assert outside["ts"] and outside["level"] == "INFO"


def test_text_logs_show_project_and_step() -> None:
    record = logging.LogRecord("x", logging.INFO, "f.py", 1, "rolled out", None, None)
    record.project_id, record.step, record.attempt = "p1", "roll_out_release", 3
    line = TextFormatter().format(record)
    assert line.endswith(" INFO x [p1 roll_out_release attempt 3]: rolled out")
    bare = logging.LogRecord("x", logging.INFO, "f.py", 1, "idle", None, None)
    assert TextFormatter().format(bare).endswith(" INFO x: idle")
    assert project_id_from_workflow_id("rollback-p2") == "p2"
    assert project_id_from_workflow_id("other-p2") is None
