"""A dependency goes away in the middle of a deploy: PostgreSQL is waited for, a missing SSM
ends the deploy cleanly before anything touches Fly."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pgserver
import pytest
from harness import (
    DEPLOY_FAILURES,
    api_requests_for,
    deployment_rows,
    failure_message,
    max_attempt,
    running_worker,
    wait_until,
)
from temporalio.client import Client

from core.models import DeployRequest, DeployStatus
from core.settings import Settings
from turbodeploy.client import start_deploy
from turbodeploy.embedded import free_port

# As long as a database restart or failover takes: the last write of the deploy meets a
# stopped database and is retried until it is back.
OUTAGE_SECONDS = 20.0
# The step that writes to PostgreSQL after the deployment row exists (with the release).
DATABASE_WRITES = ("record_deploy_result",)

pytestmark = pytest.mark.usefixtures("calm_emulator")


class _Postgres:
    """An embedded PostgreSQL of this test's own, which can be stopped and started again."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(str(data_dir), cleanup_mode="stop")  # type: ignore[attr-defined]
        self.url: str = self._server.get_uri()

    def stop(self) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=self._server.pgdata, user=self._server.system_user
        )

    def start(self) -> None:
        with self._server._lock:
            self._server.ensure_postgres_running()
        assert self._server.get_uri() == self.url

    def cleanup(self) -> None:
        self._server.cleanup()


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[_Postgres]:
    pg = _Postgres(tmp_path / "pg")
    try:
        yield pg
    finally:
        with contextlib.suppress(Exception):
            pg.start()
        pg.cleanup()


async def test_postgres_outage_mid_deploy_is_waited_out(
    temporal_client: Client,
    own_postgres: _Postgres,
    make_settings: Callable[..., Settings],
    make_request: Callable[..., DeployRequest],
    flysim: Any,
) -> None:
    settings = make_settings(name="outage", database_url=own_postgres.url)
    request = make_request()
    # The machine passes its checks only 4 s after it starts: the deploy is still rolling
    # out when the database goes away (a stop takes well under that), so the outage always
    # spans the write of the result, however fast or loaded the machine is.
    flysim.config.timing.healthy_after = 4.0
    async with running_worker(temporal_client, settings):
        handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)

        async def row_written() -> bool:
            rows = await deployment_rows(own_postgres.url, settings.db_schema, request.project_id)
            return bool(rows)

        await wait_until(row_written, "deployment row written", timeout=30)
        await asyncio.to_thread(own_postgres.stop)
        stopped_at = time.monotonic()
        await asyncio.sleep(OUTAGE_SECONDS)
        await asyncio.to_thread(own_postgres.start)
        restarted_at = time.monotonic()
        result = await asyncio.wait_for(handle.result(), 90)
        finished_at = time.monotonic()

    assert result.status is DeployStatus.DEPLOYED
    assert finished_at > restarted_at > stopped_at
    retried = [await max_attempt(handle, name) for name in DATABASE_WRITES]
    assert max(retried) >= 2, f"the outage did not span a database write: {retried}"
    [row] = await deployment_rows(own_postgres.url, settings.db_schema, request.project_id)
    assert row["status"] == "deployed"
    assert row["deployment_id"] == handle.deployment_id == result.deployment_id
    assert sorted(row["machine_ids"]) == sorted(result.machine_ids)
    assert row["commit_sha"] == result.commit_sha
    assert row["finished_at"] is not None


async def test_ssm_unreachable_fails_before_any_fly_call(
    temporal_client: Client,
    postgres_url: str,
    make_settings: Callable[..., Settings],
    make_request: Callable[..., DeployRequest],
    flysim: Any,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = make_settings(name="outage", ssm_endpoint=dead)
    request = make_request()
    async with running_worker(temporal_client, settings):
        handle = await start_deploy(temporal_client, request, task_queue=settings.task_queue)
        with pytest.raises(DEPLOY_FAILURES) as info:
            await asyncio.wait_for(handle.result(), 120)

    message = failure_message(info.value)
    assert "SSM" in message and "unreachable" in message, message
    assert await max_attempt(handle, "resolve_credentials") > 1, "SSM was not retried"
    assert api_requests_for(flysim, request.app_name) == 0, "Fly was called without a token"
    [row] = await deployment_rows(postgres_url, settings.db_schema, request.project_id)
    assert row["status"] == "failed"
    assert "SSM" in row["error"], row["error"]
    assert row["finished_at"] is not None
