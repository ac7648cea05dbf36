"""The progress query tells the truth about steps: a step is ticked when it has ended, with
its own duration, and the rollout is not done while its machines are still being rolled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from temporalio.client import Client

from core.models import DeployRequest, DeployStep
from core.settings import Settings
from turbodeploy.client import progress, start_deploy

START_DELAY = 1.5


async def test_each_step_is_ticked_when_it_ends_with_its_own_duration(
    temporal_client: Client,
    settings: Settings,
    worker: None,
    calm_emulator: Any,
    make_request: Callable[..., DeployRequest],
) -> None:
    calm_emulator.config.timing.start_delay = START_DELAY  # the rollout waits for a start
    request = make_request()
    handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
    outcome = asyncio.ensure_future(handle.result())
    seen_rolling = False
    while not outcome.done():
        now = await progress(temporal_client, request.project_id)
        if now.step is DeployStep.ROLLOUT and now.detail.startswith("Roll out"):
            seen_rolling = True
            assert DeployStep.ROLLOUT not in now.completed_steps, now
            assert now.step_started_at is not None
        # Only finished steps have a duration.
        assert set(now.step_seconds) == set(now.completed_steps), now
        await asyncio.sleep(0.1)
    await outcome
    assert seen_rolling

    done = await progress(temporal_client, request.project_id)
    expected = [
        DeployStep.RECORD_START,
        DeployStep.CREDENTIALS,
        DeployStep.FLY_CONFIG,
        DeployStep.APP,
        DeployStep.ROLLOUT,
        DeployStep.HEALTH,
        DeployStep.RECORD_RESULT,
    ]
    assert sorted(done.completed_steps, key=list(DeployStep).index) == expected
    assert set(done.step_seconds) == set(expected)
    assert done.step_seconds[DeployStep.ROLLOUT] >= START_DELAY
    # Each step its own time, not the time since the deploy began.
    assert done.step_seconds[DeployStep.RECORD_RESULT] < START_DELAY
    assert done.step_seconds[DeployStep.HEALTH] < done.step_seconds[DeployStep.ROLLOUT]
