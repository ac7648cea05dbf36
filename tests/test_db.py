"""Deployment records against a real PostgreSQL, each test in a schema of its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from harness import row_version
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.deployments import DeploymentActivities, RecordResultInput, RecordStartInput
from core.db import (
    MAX_ERROR_CHARS,
    DeploymentConflict,
    DeploymentNotFound,
    DeploymentStore,
    ProjectNotRegistered,
    create_pool,
)
from core.db.queries import Queries
from core.db.store import _migrations
from core.models import DeploymentRow, DeployStatus
from core.settings import Settings
from turbodeploy import embedded

MIGRATIONS = [
    "0001_project_deployments.sql",
    "0002_releases.sql",
    "0003_first_run.sql",
    "0004_serving_image.sql",
    "0005_destroyed_and_projects.sql",
]


@pytest_asyncio.fixture
async def dead_pool() -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    """A pool aimed at a port where nothing listens; it connects only when used."""
    url = f"postgresql://turbodeploy@127.0.0.1:{embedded.free_port()}/turbodeploy"
    pool = await create_pool(url, 0, 2, connect_timeout=2)
    yield pool
    await pool.close()


def _deployment_id() -> str:
    return f"d-{uuid.uuid4().hex[:16]}"


async def _start(
    store: DeploymentStore, project_id: str, deployment_id: str, run: str = "r1"
) -> DeploymentRow:
    return await store.record_started(
        deployment_id=deployment_id,
        project_id=project_id,
        app_name=f"turbobackend-{project_id}",
        url=f"https://turbobackend-{project_id}.fly.dev",
        workflow_id=f"deploy-{project_id}",
        run_id=run,
        repo_url="https://github.com/acme/app.git",
        branch="main",
    )


# --------------------------------------------------------------------------- migrations


async def test_migrations_apply_once_even_when_workers_race(postgres_url: str, schema: str) -> None:
    pool_a = await create_pool(postgres_url, 1, 2)
    pool_b = await create_pool(postgres_url, 1, 2)
    try:
        first = await asyncio.gather(
            DeploymentStore(pool_a, schema).migrate(), DeploymentStore(pool_b, schema).migrate()
        )
        assert sorted(first, key=len) == [[], MIGRATIONS]
        assert await DeploymentStore(pool_a, schema).migrate() == []
        versions = await pool_a.fetch(f'SELECT version, name FROM "{schema}".schema_migrations')
        assert sorted((r["version"], r["name"]) for r in versions) == list(
            enumerate(MIGRATIONS, start=1)
        )

        index = await pool_a.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND tablename = $2",
            schema,
            "project_deployments",
        )
        assert index is not None  # the primary key's index at least
        indexes = [
            r["indexdef"]
            for r in await pool_a.fetch(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = $1", schema
            )
        ]
        assert any("(project_id, deployed_at DESC" in d for d in indexes), indexes
        assert any("releases USING btree (project_id, created_at DESC" in d for d in indexes)
        with pytest.raises(asyncpg.CheckViolationError):
            await pool_a.execute(
                f'INSERT INTO "{schema}".project_deployments (deployment_id, project_id,'
                " platform, app_name, url, status, deployed_at, last_updated)"
                " VALUES ('d1', 'p1', 'flyio', 'a', 'u', 'exploded', 0, 0)"
            )
    finally:
        await pool_a.close()
        await pool_b.close()


async def _apply_first_migration_only(pool: asyncpg.Pool[asyncpg.Record], schema: str) -> None:
    """The schema as a service of the first release left it: migration 0001 and nothing else."""
    first = next(m for m in _migrations() if m.version == 1)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(Queries.for_schema(schema).create_migrations)
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        await conn.execute(first.sql)
        await conn.execute(
            f'INSERT INTO "{schema}".schema_migrations (version, name, checksum)'
            " VALUES ($1, $2, $3)",
            first.version,
            first.name,
            first.checksum,
        )


async def test_releases_migration_applies_on_top_of_existing_rows(
    pool: asyncpg.Pool[asyncpg.Record], schema: str, project_id: str
) -> None:
    await _apply_first_migration_only(pool, schema)
    store = DeploymentStore(pool, schema)
    running, done, deployed = _deployment_id(), _deployment_id(), _deployment_id()
    table = f'"{schema}".project_deployments'
    # Rows as the first release wrote them (its statements, not today's).
    for deployment_id, status, error, image in [
        (running, "deploying", None, None),
        (done, "failed", "boom", "registry.fly.io/app:2"),
        (deployed, "deployed", None, "registry.fly.io/app:1"),
    ]:
        await pool.execute(
            f"INSERT INTO {table} (deployment_id, project_id, app_name, url, status,"
            " deployed_at, last_updated, finished_at, error, image)"
            " VALUES ($1, $2, 'app', 'https://app.fly.dev', $3::VARCHAR, 1, 1,"
            " CASE WHEN $3::VARCHAR = 'deploying' THEN NULL ELSE 2 END, $4, $5)",
            deployment_id,
            project_id,
            status,
            error,
            image,
        )
    # Before 0002 the statuses it adds are refused.
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            f"UPDATE {table} SET status = 'superseded' WHERE deployment_id = $1", done
        )

    assert await store.migrate() == MIGRATIONS[1:]
    assert await store.migrate() == []

    kept = await store.get(done)
    assert kept is not None and (kept.status, kept.error) == (DeployStatus.FAILED, "boom")
    # What served is known for a deployed row only: its own image.
    assert kept.serving_image is None
    old = await store.get(deployed)
    assert old is not None and old.serving_image == old.image == "registry.fly.io/app:1"
    superseded = await store.record_result(running, DeployStatus.SUPERSEDED)
    assert superseded.status is DeployStatus.SUPERSEDED
    assert superseded.finished_at is not None

    queued = _deployment_id()
    await _start(store, project_id, queued)
    await pool.execute(
        f"UPDATE {table} SET status = 'queued', finished_at = NULL WHERE deployment_id = $1", queued
    )
    # A queued deployment has not finished; a finished one has a time.
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(f"UPDATE {table} SET finished_at = 1 WHERE deployment_id = $1", queued)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(f"UPDATE {table} SET finished_at = NULL WHERE deployment_id = $1", done)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(f"UPDATE {table} SET status = 'exploded' WHERE deployment_id = $1", done)
    # A queued row can still be finished, with any final status.
    rolled_back = await store.record_result(queued, DeployStatus.ROLLED_BACK, error="unhealthy")
    assert rolled_back.status is DeployStatus.ROLLED_BACK and rolled_back.finished_at is not None


@pytest.mark.parametrize(
    "name", ["", "Public", "bad-name", "1abc", 'x"; DROP TABLE t; --', "a" * 64, "sch ema"]
)
async def test_invalid_schema_name_is_rejected_before_connecting(
    dead_pool: asyncpg.Pool[asyncpg.Record], name: str
) -> None:
    with pytest.raises(ValueError, match="schema name"):
        DeploymentStore(dead_pool, name)


async def test_a_valid_schema_name_only_connects_when_used(
    dead_pool: asyncpg.Pool[asyncpg.Record],
) -> None:
    store = DeploymentStore(dead_pool, "turbobackend")
    with pytest.raises(OSError):
        await store.migrate()


# ------------------------------------------------------------------------------- writes


async def test_record_started_twice_keeps_one_row(
    store: DeploymentStore, pool: asyncpg.Pool[asyncpg.Record], schema: str, project_id: str
) -> None:
    deployment_id = _deployment_id()
    first = await _start(store, project_id, deployment_id, run="run-1")
    second = await _start(store, project_id, deployment_id, run="run-2")

    count = await pool.fetchval(f'SELECT count(*) FROM "{schema}".project_deployments')
    assert count == 1
    assert first.status is second.status is DeployStatus.DEPLOYING
    assert second.deployed_at == first.deployed_at
    assert second.run_id == "run-2"  # the row follows the run that is deploying now
    assert first.platform == "flyio"
    assert first.deployed_at > 1_600_000_000  # epoch seconds, not milliseconds
    assert first.deployed_at < 10_000_000_000


async def test_a_queued_row_becomes_deploying_and_never_goes_back(
    store: DeploymentStore, pool: asyncpg.Pool[asyncpg.Record], schema: str, project_id: str
) -> None:
    def fields(deployment_id: str) -> dict[str, Any]:
        return {
            "deployment_id": deployment_id,
            "project_id": project_id,
            "app_name": f"turbobackend-{project_id}",
            "url": f"https://turbobackend-{project_id}.fly.dev",
            "workflow_id": f"deploy-{project_id}",
            "run_id": "r1",
            "image": "registry.fly.io/app:1",
        }

    waiting = _deployment_id()
    queued = await store.record_queued(**fields(waiting))
    assert queued.status is DeployStatus.QUEUED and queued.finished_at is None
    assert (await store.record_queued(**fields(waiting))).status is DeployStatus.QUEUED

    started = await _start(store, project_id, waiting)
    assert started.status is DeployStatus.DEPLOYING
    assert started.image == "registry.fly.io/app:1"  # kept from the queued row
    # A queued record that arrives late (its activity was retried) changes nothing.
    assert (await store.record_queued(**fields(waiting))).status is DeployStatus.DEPLOYING
    await store.record_result(waiting, DeployStatus.SUPERSEDED, None, None, [], "newer one")
    late = await store.record_queued(**fields(waiting))
    assert late.status is DeployStatus.SUPERSEDED and late.finished_at is not None

    other = _deployment_id()
    await _start(store, project_id, other)
    assert (await store.record_queued(**fields(other))).status is DeployStatus.DEPLOYING
    count = await pool.fetchval(f'SELECT count(*) FROM "{schema}".project_deployments')
    assert count == 2
    with pytest.raises(DeploymentConflict):
        await store.record_queued(**{**fields(other), "project_id": "someone-else"})


async def test_close_run_fails_only_the_open_rows_of_that_run(
    store: DeploymentStore, project_id: str
) -> None:
    done, running, other_run = _deployment_id(), _deployment_id(), _deployment_id()
    await _start(store, project_id, done)
    await store.record_result(done, DeployStatus.DEPLOYED, "abc", "img:1", ["m1"], None)
    await _start(store, project_id, running)
    queued = _deployment_id()
    await store.record_queued(
        deployment_id=queued,
        project_id=project_id,
        app_name=f"turbobackend-{project_id}",
        url=f"https://turbobackend-{project_id}.fly.dev",
        workflow_id=f"deploy-{project_id}",
        run_id="r1",
    )
    await _start(store, project_id, other_run, run="r2")

    closed = await store.close_run(project_id, "r1", "terminated by an operator: stuck")
    assert sorted(r.deployment_id for r in closed) == sorted([running, queued])
    for row in closed:
        assert row.status is DeployStatus.FAILED and row.finished_at is not None
        assert row.error == "terminated by an operator: stuck"
    assert (await store.get(done)).status is DeployStatus.DEPLOYED  # type: ignore[union-attr]
    assert (await store.get(other_run)).status is DeployStatus.DEPLOYING  # type: ignore[union-attr]
    assert await store.close_run(project_id, "r1", "again") == []
    assert await store.close_run("another-project", "r2", "not its run") == []


async def test_close_orphans_fails_the_open_rows_of_other_runs_only(
    store: DeploymentStore, project_id: str
) -> None:
    done, left, current = _deployment_id(), _deployment_id(), _deployment_id()
    await _start(store, project_id, done, run="r1")
    await store.record_result(done, DeployStatus.DEPLOYED, "abc", "img:1", ["m1"], None)
    await _start(store, project_id, left, run="r1")
    other_project = f"{project_id}x"
    elsewhere = _deployment_id()
    await _start(store, other_project, elsewhere, run="r1")
    await _start(store, project_id, current, run="r2")

    [orphan] = await store.close_orphans(project_id, "r2")
    assert orphan.deployment_id == left and orphan.status is DeployStatus.FAILED
    assert "its workflow run r1 ended without recording" in (orphan.error or "")
    assert (await store.get(current)).status is DeployStatus.DEPLOYING  # type: ignore[union-attr]
    assert (await store.get(done)).status is DeployStatus.DEPLOYED  # type: ignore[union-attr]
    assert (await store.get(elsewhere)).status is DeployStatus.DEPLOYING  # type: ignore[union-attr]
    assert await store.close_orphans(project_id, "r2") == []


async def test_record_result_finishes_the_row_and_a_repeat_changes_nothing(
    store: DeploymentStore, pool: asyncpg.Pool[asyncpg.Record], schema: str, project_id: str
) -> None:
    deployment_id = _deployment_id()
    await _start(store, project_id, deployment_id)
    image = "registry.fly.io/app:deployment-1"

    done = await store.record_result(
        deployment_id, DeployStatus.DEPLOYED, "abc123", image, ["m1", "m2"], None
    )
    assert done.status is DeployStatus.DEPLOYED
    assert (done.commit_sha, done.image, done.machine_ids) == ("abc123", image, ["m1", "m2"])
    finished_at = await pool.fetchval(
        f'SELECT finished_at FROM "{schema}".project_deployments WHERE deployment_id = $1',
        deployment_id,
    )
    assert finished_at is not None and finished_at >= done.deployed_at
    assert await store.get(deployment_id) == done

    version = await row_version(pool, schema, "project_deployments", deployment_id)
    again = await store.record_result(
        deployment_id, DeployStatus.DEPLOYED, "abc123", image, ["m1", "m2"], None
    )
    assert again == done
    assert await row_version(pool, schema, "project_deployments", deployment_id) == version


async def test_a_result_records_the_image_tried_and_the_image_serving(
    store: DeploymentStore, project_id: str
) -> None:
    tried, previous = "registry.fly.io/app:broken", "registry.fly.io/app:1"
    rolled_back, deployed, first = _deployment_id(), _deployment_id(), _deployment_id()
    for deployment_id in (rolled_back, deployed, first):
        await _start(store, project_id, deployment_id)

    row = await store.record_result(
        rolled_back, DeployStatus.ROLLED_BACK, image=tried, serving_image=previous
    )
    assert (row.image, row.serving_image) == (tried, previous)
    row = await store.record_result(
        deployed, DeployStatus.DEPLOYED, image=tried, serving_image=tried
    )
    assert (row.image, row.serving_image) == (tried, tried)
    # A failed first deploy whose machines were removed: nothing serves.
    row = await store.record_result(first, DeployStatus.FAILED, image=tried)
    assert (row.image, row.serving_image) == (tried, None)

    read = {r.deployment_id: r for r in await store.history(project_id)}
    assert read[rolled_back].outcome().serving_image == previous
    assert read[rolled_back].as_json()["image"] == tried
    assert read[first].as_json()["serving_image"] is None


async def test_a_reset_run_clears_what_the_finished_row_served(
    store: DeploymentStore, project_id: str
) -> None:
    deployment_id = _deployment_id()
    row = {
        "deployment_id": deployment_id,
        "project_id": project_id,
        "app_name": f"turbobackend-{project_id}",
        "url": f"https://turbobackend-{project_id}.fly.dev",
        "workflow_id": f"deploy-{project_id}",
        "first_run_id": "r1",
    }
    await store.record_started(**row, run_id="r1")
    image = "registry.fly.io/app:1"
    await store.record_result(
        deployment_id, DeployStatus.DEPLOYED, image=image, serving_image=image
    )
    again = await store.record_started(**row, run_id="r2")
    assert again.status is DeployStatus.DEPLOYING
    assert (again.image, again.serving_image) == (image, None)


async def test_a_final_status_never_changes(
    store: DeploymentStore, pool: asyncpg.Pool[asyncpg.Record], schema: str, project_id: str
) -> None:
    deployment_id = _deployment_id()
    await _start(store, project_id, deployment_id)
    await store.record_result(deployment_id, DeployStatus.FAILED, error="machine crashed")
    version = await row_version(pool, schema, "project_deployments", deployment_id)

    with pytest.raises(DeploymentConflict, match="already failed"):
        await store.record_result(deployment_id, DeployStatus.DEPLOYED)
    with pytest.raises(DeploymentConflict):
        await store.record_result(deployment_id, DeployStatus.DEPLOYING)
    # A start retried after the result (a late attempt) must not resurrect the deployment.
    late = await _start(store, project_id, deployment_id, run="late-run")

    assert late.status is DeployStatus.FAILED
    assert late.run_id == "r1"
    assert late.error == "machine crashed"
    assert await row_version(pool, schema, "project_deployments", deployment_id) == version


async def test_record_result_of_an_unknown_deployment_fails(store: DeploymentStore) -> None:
    with pytest.raises(DeploymentNotFound):
        await store.record_result("d-missing", DeployStatus.DEPLOYED)


async def test_a_deployment_id_belongs_to_one_project(
    store: DeploymentStore, project_id: str
) -> None:
    deployment_id = _deployment_id()
    await _start(store, project_id, deployment_id)
    with pytest.raises(DeploymentConflict, match=f"belongs to project {project_id}"):
        await _start(store, "other-project", deployment_id)


async def test_stored_errors_are_bounded_and_hold_no_token(
    store: DeploymentStore, project_id: str, fly_token: str
) -> None:
    deployment_id = _deployment_id()
    await _start(store, project_id, deployment_id)
    error = f"POST /v1/apps failed with Authorization: {fly_token}\x00 " + "x" * 10_000
    row = await store.record_result(deployment_id, DeployStatus.FAILED, error=error)

    assert row.error is not None
    assert len(row.error) <= MAX_ERROR_CHARS
    assert row.error.startswith("POST /v1/apps failed with Authorization: [redacted]")
    assert fly_token.split()[-1][:12] not in row.error
    assert "characters cut]" in row.error


async def test_history_is_newest_first(
    store: DeploymentStore, pool: asyncpg.Pool[asyncpg.Record], schema: str, project_id: str
) -> None:
    ids = [_deployment_id() for _ in range(4)]
    for deployment_id in ids:
        await _start(store, project_id, deployment_id)
    await _start(store, f"{project_id}-other", _deployment_id())
    # The first deployment is dated later than the rest; the others share one second.
    await pool.execute(
        f'UPDATE "{schema}".project_deployments SET deployed_at = deployed_at + 100'
        " WHERE deployment_id = $1",
        ids[0],
    )
    await pool.execute(
        f'UPDATE "{schema}".project_deployments SET deployed_at = $2 WHERE deployment_id = ANY($1)',
        ids[1:],
        1_700_000_000,
    )

    history = await store.history(project_id, limit=10)
    assert [r.deployment_id for r in history] == [ids[0], ids[3], ids[2], ids[1]]
    assert [r.deployment_id for r in await store.history(project_id, limit=2)] == [ids[0], ids[3]]
    latest = await store.latest(project_id)
    assert latest is not None and latest.deployment_id == ids[0]
    assert await store.latest("nobody") is None
    with pytest.raises(ValueError):
        await store.history(project_id, limit=0)


# --------------------------------------------------------------------------- activities


async def test_activities_record_a_deploy(store: DeploymentStore, project_id: str) -> None:
    settings = Settings(app_url_template="https://{app}.apps.example.test")
    activities = DeploymentActivities(store, settings)
    env = ActivityEnvironment()
    deployment_id = _deployment_id()
    start = RecordStartInput(
        deployment_id=deployment_id,
        project_id=project_id,
        app_name=f"turbobackend-{project_id}",
        workflow_id=f"deploy-{project_id}",
        run_id="run-1",
        repo_url="https://github.com/acme/app.git",
        branch="main",
        image="registry.fly.io/app:1",
    )

    started = await env.run(activities.record_started, start)
    retried = await env.run(activities.record_started, start)
    assert started.url == f"https://turbobackend-{project_id}.apps.example.test"
    assert retried == started

    result = RecordResultInput(
        deployment_id=deployment_id, status=DeployStatus.DEPLOYED, machine_ids=["m1"]
    )
    await env.run(activities.record_result, result)
    await env.run(activities.record_result, result)  # a retried attempt
    row = await store.get(deployment_id)
    assert row is not None
    assert (row.status, row.machine_ids, row.image) == (
        DeployStatus.DEPLOYED,
        ["m1"],
        "registry.fly.io/app:1",
    )

    with pytest.raises(ApplicationError) as conflict:
        await env.run(
            activities.record_result,
            RecordResultInput(deployment_id=deployment_id, status=DeployStatus.FAILED),
        )
    assert (conflict.value.type, conflict.value.non_retryable) == ("DeploymentConflict", True)

    with pytest.raises(ApplicationError) as missing:
        await env.run(
            activities.record_result,
            RecordResultInput(deployment_id="d-nowhere", status=DeployStatus.FAILED),
        )
    assert (missing.value.type, missing.value.non_retryable) == ("DeploymentNotFound", True)

    with pytest.raises(ApplicationError) as invalid:
        await env.run(
            activities.record_started,
            start.model_copy(update={"deployment_id": _deployment_id(), "project_id": ""}),
        )
    assert (invalid.value.type, invalid.value.non_retryable) == ("DeploymentRecordInvalid", True)


async def test_a_database_outage_is_retryable(
    dead_pool: asyncpg.Pool[asyncpg.Record], project_id: str
) -> None:
    activities = DeploymentActivities(DeploymentStore(dead_pool, "turbobackend"), Settings())
    env = ActivityEnvironment()

    with pytest.raises(ApplicationError) as started:
        await env.run(
            activities.record_started,
            RecordStartInput(
                deployment_id=_deployment_id(),
                project_id=project_id,
                app_name=f"turbobackend-{project_id}",
                workflow_id=f"deploy-{project_id}",
                run_id="run-1",
                repo_url="https://github.com/acme/app.git",
                branch="main",
            ),
        )
    assert (started.value.type, started.value.non_retryable) == ("DatabaseUnavailable", False)

    with pytest.raises(ApplicationError) as result:
        await env.run(
            activities.record_result,
            RecordResultInput(deployment_id="d-1", status=DeployStatus.DEPLOYED),
        )
    assert (result.value.type, result.value.non_retryable) == ("DatabaseUnavailable", False)


async def test_only_a_run_of_the_same_chain_starts_a_finished_deployment_again(
    store: DeploymentStore, project_id: str
) -> None:
    """A reset run shares its chain's first run id and restarts its own deployment; a new
    chain (the same request sent again) or a handler's request (no chain id) finds the
    recorded outcome and changes nothing."""
    deployment_id = _deployment_id()
    row = dict(
        deployment_id=deployment_id,
        project_id=project_id,
        app_name=f"turbobackend-{project_id}",
        url="https://x.fly.dev",
        workflow_id=f"deploy-{project_id}",
    )
    await store.record_started(**row, run_id="r1", first_run_id="r1")
    await store.record_result(deployment_id, DeployStatus.FAILED, error="unhealthy")

    for run_id, first_run_id in (("r9", "r9"), ("r9", None), ("r1", "r1")):
        again = await store.record_started(**row, run_id=run_id, first_run_id=first_run_id)
        assert (again.status, again.error, again.run_id) == (
            DeployStatus.FAILED,
            "unhealthy",
            "r1",
        ), (run_id, first_run_id)

    reset = await store.record_started(**row, run_id="r2", first_run_id="r1")
    assert (reset.status, reset.error, reset.run_id) == (DeployStatus.DEPLOYING, None, "r2")
    assert reset.finished_at is None
    done = await store.record_result(deployment_id, DeployStatus.DEPLOYED)
    assert done.status is DeployStatus.DEPLOYED and done.finished_at is not None


async def test_where_the_platform_has_a_projects_table_a_deployment_must_name_one_of_them(
    pool: asyncpg.Pool[asyncpg.Record], postgres_url: str
) -> None:
    schema = f"p_{uuid.uuid4().hex[:10]}"
    await pool.execute(f'CREATE SCHEMA "{schema}"')
    await pool.execute(f'CREATE TABLE "{schema}".projects (project_id VARCHAR PRIMARY KEY)')
    await pool.execute(f"INSERT INTO \"{schema}\".projects VALUES ('known')")
    store = DeploymentStore(pool, schema)
    await store.migrate()
    row = await _start(store, "known", _deployment_id())
    assert row.status is DeployStatus.DEPLOYING
    with pytest.raises(
        ProjectNotRegistered, match=rf"project stranger is not in {schema}.projects"
    ):
        await _start(store, "stranger", _deployment_id())
    assert await store.history("stranger") == []
    # Without such a table nothing is referenced (the test schemas of every other test).
    other = DeploymentStore(pool, f"q_{uuid.uuid4().hex[:10]}")
    await other.migrate()
    assert (await _start(other, "stranger", _deployment_id())).status is DeployStatus.DEPLOYING
