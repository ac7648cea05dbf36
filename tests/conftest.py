"""Real servers, started once per test session: PostgreSQL, moto's SSM, the Fly emulator,
and a Temporal dev server. Tests get fresh names (task queues, project ids) instead of
fresh servers, so the suite stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import pytest
import pytest_asyncio
from harness import (
    Rows,
    deploy_request,
    deployment_rows,
    new_project_id,
    reset_faults,
    running_worker,
    worker_settings,
)
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.rollout import RolloutActivities
from activities.secrets import CredentialStore
from core.db import DeploymentStore, create_pool
from core.models import DeployRequest
from core.settings import Settings
from flyapi import FlyClient
from turbodeploy import embedded
from turbodeploy.stack import publish_example

REFERENCE_DIR = Path(
    os.environ.get(
        "TURBODEPLOY_REFERENCE_DIR",
        Path(__file__).resolve().parents[2] / "shared" / "reference",
    )
)


# Every Fly emulator the suite starts, in this process or as a subprocess that inherits the
# environment, checks each /v1 exchange against the current Machines API spec; a test
# during which one recorded a violation fails (`_exchanges_conform_to_the_spec`).
MACHINES_SPEC = Path(__file__).resolve().parent / "data" / "fly-machines-openapi-2026.yml"
os.environ.setdefault("FLYSIM_VALIDATE_SPEC", str(MACHINES_SPEC))


@pytest.fixture(autouse=True)
def _exchanges_conform_to_the_spec() -> Iterator[None]:
    """Fail the test if an emulator served an exchange the Machines API spec forbids
    during it (a request it accepted, or a response it gave). `flysim.spec.tolerated()`
    marks the requests a test breaks the spec with on purpose."""
    from flysim import spec

    before = len(spec.RECORDED)
    yield
    new = spec.RECORDED[before:]
    if new:
        lines = "\n".join(f"  {v}" for v in new[:20])
        more = f"\n  ... and {len(new) - 20} more" if len(new) > 20 else ""
        pytest.fail(
            f"{len(new)} exchange(s) with the Fly emulator do not conform to "
            f"{MACHINES_SPEC.name}:\n{lines}{more}",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _a_fresh_worker_memory_of_checks() -> None:
    """Each test deploys as a worker that has seen no other project's checks: a window
    learnt in an earlier test (one that made checks pass late on purpose) would set when
    this test's first deploys read theirs."""
    from activities._machines import RECENT_CHECKS

    RECENT_CHECKS.clear()


def reference_file(*parts: str) -> Path:
    """A file from the shared reference material, or skip the test saying why."""
    path = REFERENCE_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(
            f"reference material not found at {path}; set TURBODEPLOY_REFERENCE_DIR to the "
            "folder holding fly-machines-openapi.yaml and fly-toml-examples/"
        )
    return path


@pytest.fixture(scope="session")
def fly_token() -> str:
    return embedded.generate_fly_token()


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="session")
def postgres_url(state_dir: Path) -> Iterator[str]:
    pg = embedded.start_postgres(state_dir / "pg")
    yield pg.url
    pg.stop()


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    with embedded.fake_aws_credentials():
        yield


@pytest.fixture(scope="session")
def ssm_endpoint(aws_env: None, fly_token: str) -> Iterator[str]:
    server = embedded.start_moto()
    embedded.seed_ssm(server.endpoint_url, token=fly_token)
    yield server.endpoint_url
    server.stop()


@pytest.fixture(scope="session")
def flysim(fly_token: str) -> Iterator[object]:
    """The Fly Machines API emulator, in a thread, accepting the seeded token."""
    from flysim import FlySim, SimConfig

    sim = FlySim(SimConfig(tokens={fly_token: "personal"}))
    with sim.serve_in_thread():
        yield sim


@pytest_asyncio.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=embedded.temporal_cli(),
        data_converter=pydantic_data_converter,
        search_attributes=[SearchAttributeKey.for_keyword(n) for n in embedded.SEARCH_ATTRIBUTES],
        dev_server_log_level="error",
    )
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
def temporal_client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def task_queue() -> str:
    return f"tq-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def project_id() -> str:
    return new_project_id()


# --------------------------------------------------------------------------- deploys


@pytest.fixture
def make_settings(
    postgres_url: str, ssm_endpoint: str, flysim: Any, tmp_path: Path
) -> Callable[..., Settings]:
    """`harness.worker_settings` against the session servers: settings for a worker of the
    test's own (`make_settings(name="faults", fly_api_rate=0)`)."""
    return functools.partial(
        worker_settings,
        database_url=postgres_url,
        ssm_endpoint=ssm_endpoint,
        sim=flysim,
        work_dir=tmp_path / "work",
    )


@pytest.fixture
def settings(
    make_settings: Callable[..., Settings],
    task_queue: str,
    tmp_path: Path,
    temporal_client: Client,
) -> Settings:
    """Worker settings pointing at the session servers, with a schema of the test's own."""
    return make_settings(
        temporal_address=temporal_client.service_client.config.target_host,
        task_queue=task_queue,
        flyctl_path=str(embedded.flyctl_standin(tmp_path / "flyctl-bin")),
        # The shared request budget has tests of its own (test_faults.py).
        fly_api_rate=0,
    )


@pytest_asyncio.fixture
async def worker(temporal_client: Client, settings: Settings) -> AsyncIterator[None]:
    """A worker composed as `python worker.py` composes it, on the test's task queue."""
    async with running_worker(temporal_client, settings):
        yield


@pytest.fixture
def repo(tmp_path: Path) -> str:
    """A bare git repository holding the example project (nitro-hello)."""
    return publish_example("nitro-hello", tmp_path / "repos")


@pytest.fixture
def request_defaults() -> Callable[[], dict[str, Any]]:
    """The fields each request of `make_request` starts from, over `harness.deploy_request`'s:
    none. A module whose tests all want others (timings, a deployment id chosen by the
    caller) overrides this fixture."""
    return dict


@pytest.fixture
def make_request(
    project_id: str, repo: str, request_defaults: Callable[[], dict[str, Any]]
) -> Callable[..., DeployRequest]:
    """Requests to deploy the test's project from `repo`: `make_request(machine_count=2)`."""

    def make(**overrides: Any) -> DeployRequest:
        return deploy_request(project_id, repo, **(request_defaults() | overrides))

    return make


@pytest.fixture
def rows_of(settings: Settings) -> Rows:
    """The deployment rows a project has in the test's schema, oldest first."""

    async def read(project_id: str) -> list[asyncpg.Record]:
        assert settings.database_url
        return await deployment_rows(settings.database_url, settings.db_schema, project_id)

    return read


@pytest.fixture
def credentials(settings: Settings) -> CredentialStore:
    return CredentialStore(settings)


@pytest_asyncio.fixture
async def fly(settings: Settings, credentials: CredentialStore) -> AsyncIterator[FlyClient]:
    """A Fly client as the worker builds it: the token is read per request, inside activity
    code only. No request retries, so a test sees each provider error as it comes."""
    async with FlyClient(settings.fly_api_base_url, credentials.fly_token) as client:
        yield client


@pytest.fixture
def heartbeats() -> list[tuple[Any, ...]]:
    """What an activity run through `env` heartbeats, in order."""
    return []


@pytest.fixture
def env(heartbeats: list[tuple[Any, ...]]) -> ActivityEnvironment:
    """Runs activities as the worker would, recording their heartbeats."""
    environment = ActivityEnvironment()
    environment.on_heartbeat = lambda *details: heartbeats.append(details)
    return environment


@pytest.fixture
def rollout(fly: FlyClient, settings: Settings) -> RolloutActivities:
    return RolloutActivities(fly)


# -------------------------------------------------------------------- deployment records


@pytest_asyncio.fixture(scope="module")
async def pool(postgres_url: str) -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    pool = await create_pool(postgres_url, 1, 5)
    yield pool
    await pool.close()


@pytest_asyncio.fixture
async def schema(pool: asyncpg.Pool[asyncpg.Record]) -> AsyncIterator[str]:
    """A fresh schema of the test's own, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    await pool.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest_asyncio.fixture
async def store(pool: asyncpg.Pool[asyncpg.Record], schema: str) -> DeploymentStore:
    store = DeploymentStore(pool, schema)
    await store.migrate()
    return store


@pytest.fixture
def calm_emulator(flysim: Any) -> Iterator[Any]:
    """The emulator without faults, delays or unhealthy images, before and after a test."""
    reset_faults(flysim)
    yield flysim
    reset_faults(flysim)


@pytest.fixture
def faults(calm_emulator: Any) -> Any:
    """The emulator's fault knobs, none injected before and after the test."""
    return calm_emulator.config.faults


@pytest.fixture
def ssm(ssm_endpoint: str) -> Any:
    """A boto3 SSM client of moto's server."""
    return boto3.client("ssm", endpoint_url=ssm_endpoint, region_name="us-east-1")


# --------------------------------------------------------------------------- Fly apps


@pytest.fixture
def app_name() -> str:
    """A Fly app name no other test uses; nothing is created."""
    return f"turbobackend-a{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture
async def app(fly: FlyClient, app_name: str) -> str:
    """An app of that name, created in the emulator."""
    await fly.create_app(app_name, "personal")
    return app_name


@pytest.fixture
def image() -> str:
    """An image repository no other test uses: `f"{image}:v1"`."""
    return f"registry.fly.io/app-{uuid.uuid4().hex[:8]}"


def readable_history(history: Any) -> str:
    """A workflow history as text a person could read: the exported JSON plus every payload
    decoded (the export holds payload bodies base64-encoded, where a plain search for a
    secret would find nothing)."""
    import base64
    import binascii
    import json

    exported = history.to_json_dict()
    decoded: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "data" and isinstance(value, str):
                    with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                        decoded.append(base64.b64decode(value, validate=True).decode("utf-8"))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(exported)
    return json.dumps(exported) + "\n" + "\n".join(decoded)
