"""A dependency goes away in the middle of a deploy: PostgreSQL is waited for, a missing SSM
ends the deploy cleanly before anything touches Fly."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pgserver
import pytest
from harness import (
    DEPLOY_FAILURES,
    IMAGE,
    api_requests_for,
    deployment_rows,
    failure_message,
    fast_timings,
    max_attempt,
    reset_faults,
    wait_until,
)
from temporalio.client import Client

from core.models import DeployRequest, DeployStatus
from core.settings import Settings
from turbodeploy.client import start_deploy
from turbodeploy.embedded import free_port
from turbodeploy.stack import publish_example
from worker import create_worker

# As long as a database restart or failover takes: the last write of the deploy meets a
# stopped database and is retried until it is back.
OUTAGE_SECONDS = 20.0
# The step that writes to PostgreSQL after the deployment row exists (with the release).
DATABASE_WRITES = ("record_deploy_result",)


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


@pytest.fixture(autouse=True)
def _calm(flysim: Any) -> None:
    reset_faults(flysim)


def _settings(database_url: str, ssm_endpoint: str, flysim: Any, tmp_path: Path) -> Settings:
    return Settings(
        task_queue=f"outage-{uuid.uuid4().hex[:10]}",
        database_url=database_url,
        db_schema=f"o_{uuid.uuid4().hex[:8]}",
        aws_endpoint_url=ssm_endpoint,
        fly_api_base_url=flysim.base_url,
        app_url_template=flysim.app_url_template,
        work_dir=str(tmp_path / "work"),
    )


@contextlib.asynccontextmanager
async def _running(client: Client, settings: Settings) -> AsyncIterator[None]:
    async with create_worker(client, settings) as w:
        task = asyncio.create_task(w.run())
        try:
            yield
        finally:
            await w.shutdown()
            await task


async def test_postgres_outage_mid_deploy_is_waited_out(
    temporal_client: Client,
    own_postgres: _Postgres,
    ssm_endpoint: str,
    flysim: Any,
    tmp_path: Path,
) -> None:
    settings = _settings(own_postgres.url, ssm_endpoint, flysim, tmp_path)
    request = DeployRequest(
        project_id=f"o{uuid.uuid4().hex[:10]}",
        repo_url=publish_example("nitro-hello", tmp_path / "repos"),
        image=IMAGE,
        timings=fast_timings(),
    )
    async with _running(temporal_client, settings):
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
    flysim: Any,
    tmp_path: Path,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = _settings(postgres_url, dead, flysim, tmp_path)
    request = DeployRequest(
        project_id=f"o{uuid.uuid4().hex[:10]}",
        repo_url=publish_example("nitro-hello", tmp_path / "repos"),
        image=IMAGE,
        timings=fast_timings(),
    )
    async with _running(temporal_client, settings):
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
