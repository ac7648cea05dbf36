"""The Fly API misbehaves: transient faults are ridden out, hopeless answers fail at once,
and one worker's deploys together stay within the configured request budget."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import (
    DEPLOY_FAILURES,
    app_machines,
    commit_fly_toml,
    deploy_request,
    deployment_rows,
    failure_message,
    fast_timings,
    max_attempt,
    max_requests_in_window,
    new_project_id,
    reset_faults,
    running_worker,
    take_app_name,
)
from temporalio.client import Client

from core.models import DeployRequest, DeployResult, DeployStatus
from core.settings import Settings
from turbodeploy.client import start_deploy
from turbodeploy.stack import publish_example

pytestmark = pytest.mark.usefixtures("calm_emulator")


def _why(outcome: object) -> str:
    cause = getattr(outcome, "cause", None)
    return str(cause or outcome)[:400]


async def _deploy_many(
    client: Client,
    settings: Settings,
    tmp_path: Path,
    count: int,
    machine_count: int = 1,
    **fields: Any,
) -> list[tuple[DeployRequest, DeployResult | BaseException]]:
    requests = [
        deploy_request(
            new_project_id("f"),
            publish_example("nitro-hello", tmp_path / f"repos-{i}"),
            machine_count=machine_count,
            **fields,
        )
        for i in range(count)
    ]
    handles = [await start_deploy(client, r, task_queue=settings.task_queue) for r in requests]
    results = await asyncio.wait_for(
        asyncio.gather(*(h.result() for h in handles), return_exceptions=True), 120
    )
    return list(zip(requests, results, strict=True))


async def test_twenty_deploys_ride_out_5xx_429_spikes_and_drops(
    temporal_client: Client,
    postgres_url: str,
    make_settings: Callable[..., Settings],
    flysim: Any,
    tmp_path: Path,
) -> None:
    faults = flysim.config.faults
    faults.seed = 20240611
    faults.error_rate = 0.3
    faults.rate_limit_rate = 0.1
    faults.retry_after = 1
    faults.latency_spike_rate = 0.05
    faults.latency_spike = 0.5
    faults.drop_rate = 0.05
    injected_before = dict(flysim.stats.faults_injected)
    # No client-side budget: this test is about faults, not pacing.
    settings = make_settings(name="faults", fly_api_rate=0)
    async with running_worker(temporal_client, settings):
        outcomes = await _deploy_many(temporal_client, settings, tmp_path, 20, machine_count=2)
    reset_faults(flysim)

    injected = {k: v - injected_before.get(k, 0) for k, v in flysim.stats.faults_injected.items()}
    assert injected.get("rate_limit", 0) > 0 and injected.get("drop", 0) > 0, injected
    assert sum(v for k, v in injected.items() if k.startswith("error_")) > 0, injected

    failures = [(r.project_id, _why(o)) for r, o in outcomes if not isinstance(o, DeployResult)]
    assert failures == [], f"{len(failures)} of 20 deploys failed: {failures}"
    for request, outcome in outcomes:
        assert isinstance(outcome, DeployResult)
        assert outcome.status is DeployStatus.DEPLOYED
        machines = app_machines(flysim, request.app_name)
        assert len(machines) == 2, f"{request.app_name}: {[m['id'] for m in machines]}"
        assert sorted(m["id"] for m in machines) == sorted(outcome.machine_ids)
        rows = await deployment_rows(postgres_url, settings.db_schema, request.project_id)
        assert [r["status"] for r in rows] == ["deployed"]


async def test_invalid_machine_config_422_fails_in_one_attempt(
    temporal_client: Client,
    postgres_url: str,
    make_settings: Callable[..., Settings],
    make_request: Callable[..., DeployRequest],
    repo: str,
    tmp_path: Path,
) -> None:
    # The repository's own fly.toml asks for a port Fly refuses: the create answers 422.
    commit_fly_toml(
        repo,
        'app = "whatever"\n\n[[services]]\ninternal_port = 70000\nprotocol = "tcp"\n',
        tmp_path / "clone",
    )

    settings = make_settings(name="faults")
    request = make_request()
    async with running_worker(temporal_client, settings):
        handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
        started = time.monotonic()
        with pytest.raises(DEPLOY_FAILURES) as info:
            await handle.result()
        took = time.monotonic() - started
    message = failure_message(info.value)
    assert "422" in message or "internal_port" in message, message
    assert took < 15, f"a hopeless 422 took {took:.1f}s to fail"
    assert await max_attempt(handle) == 1, "the 422 was retried"
    [row] = await deployment_rows(postgres_url, settings.db_schema, request.project_id)
    assert row["status"] == "failed"
    assert "internal_port" in row["error"], row["error"]


async def test_rejected_token_401_fails_in_one_attempt(
    temporal_client: Client,
    postgres_url: str,
    make_settings: Callable[..., Settings],
    make_request: Callable[..., DeployRequest],
    ssm: Any,
    flysim: Any,
) -> None:
    parameter = f"/turbobackend/flyio/wrong-{uuid.uuid4().hex[:8]}"
    wrong_token = "FlyV1 fm2_" + uuid.uuid4().hex * 3
    ssm.put_parameter(Name=parameter, Value=wrong_token, Type="SecureString", Overwrite=True)
    settings = make_settings(name="faults", fly_token_parameter=parameter)
    request = make_request()
    async with running_worker(temporal_client, settings):
        handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
        with pytest.raises(DEPLOY_FAILURES) as info:
            await handle.result()
    message = failure_message(info.value)
    assert "401" in message or "unauthori" in message.lower(), message
    assert wrong_token not in message
    assert await max_attempt(handle) == 1, "the 401 was retried"
    [row] = await deployment_rows(postgres_url, settings.db_schema, request.project_id)
    assert row["status"] == "failed"
    assert "401" in row["error"] or "unauthori" in row["error"].lower(), row["error"]
    assert flysim.world.apps.get(request.app_name) is None


async def test_app_of_another_org_403_fails_in_one_attempt(
    temporal_client: Client,
    postgres_url: str,
    make_settings: Callable[..., Settings],
    make_request: Callable[..., DeployRequest],
    flysim: Any,
) -> None:
    request = make_request()
    take_app_name(flysim, request.app_name)
    settings = make_settings(name="faults")
    async with running_worker(temporal_client, settings):
        handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
        with pytest.raises(DEPLOY_FAILURES) as info:
            await handle.result()
    message = failure_message(info.value)
    assert "another organi" in message, message
    assert await max_attempt(handle) == 1, "the 403 was retried"
    [row] = await deployment_rows(postgres_url, settings.db_schema, request.project_id)
    assert row["status"] == "failed"
    assert "another organi" in row["error"], row["error"]
    assert [m for m in app_machines(flysim, request.app_name)] == []


async def test_fifty_deploys_share_one_request_budget(
    temporal_client: Client,
    make_settings: Callable[..., Settings],
    flysim: Any,
    tmp_path: Path,
) -> None:
    rate, burst = 40.0, 10
    settings = make_settings(name="faults", fly_api_rate=rate, fly_api_burst=burst)
    async with running_worker(temporal_client, settings):
        started = time.time()
        # Fifty deploys on one worker: the SDK sends heartbeats at most every 0.8 of the
        # timeout, so the fast timings' 2 s leave 0.4 s for a loaded machine to deliver
        # one. This test is about the budget, so it gives them the room production has.
        timings = fast_timings(heartbeat_timeout=timedelta(seconds=5))
        outcomes = await _deploy_many(temporal_client, settings, tmp_path, 50, timings=timings)
    failures = [_why(o) for _, o in outcomes if not isinstance(o, DeployResult)]
    assert failures == []
    times = [t for t, _, _, _ in list(flysim.request_log) if t >= started]
    assert len(times) > 3 * (rate + burst), "enough requests to saturate the budget"
    busiest = max_requests_in_window(times, 1.0)
    # The limiter spaces requests where they are sent; the emulator stamps them where they
    # arrive. Requests sent 1 s apart can arrive up to `jitter` closer on a loaded machine,
    # so a 1 s window at the emulator may hold what the client sent in 1 s + jitter.
    jitter = 0.05
    allowed = burst + rate * (1 + jitter)
    assert busiest <= allowed, f"{busiest} requests within one second (budget {rate}+{burst})"


async def test_deploys_waiting_their_turn_at_a_saturated_budget_keep_heartbeating(
    temporal_client: Client,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> None:
    """Oldest work first: under a saturated budget the last deploy's requests wait for the
    others' (here about 10 s, five times the 2 s heartbeat timeout of the fast timings).
    Their activities heartbeat while they wait, so none times out and is tried again."""
    settings = make_settings(name="faults", fly_api_rate=3, fly_api_burst=1)
    async with running_worker(temporal_client, settings):
        outcomes = await _deploy_many(temporal_client, settings, tmp_path, 5)
        handles = [
            temporal_client.get_workflow_handle(request.workflow_id) for request, _ in outcomes
        ]
        attempts = [await max_attempt(h) for h in handles]
    failures = [_why(o) for _, o in outcomes if not isinstance(o, DeployResult)]
    assert failures == []
    assert attempts == [1] * 5, "an activity was tried again (heartbeat timeout?)"


def test_window_counter() -> None:
    assert max_requests_in_window([0.0, 0.1, 0.5, 1.05, 1.2, 3.0], 1.0) == 3
    assert max_requests_in_window([], 1.0) == 0
