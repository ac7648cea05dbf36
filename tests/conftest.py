"""Real servers, started once per test session: PostgreSQL, moto's SSM, the Fly emulator,
and a Temporal dev server. Tests get fresh names (task queues, project ids) instead of
fresh servers, so the suite stays fast.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from turbodeploy import embedded

REFERENCE_DIR = Path(
    os.environ.get(
        "TURBODEPLOY_REFERENCE_DIR",
        Path(__file__).resolve().parents[2] / "shared" / "reference",
    )
)


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
    return f"p{uuid.uuid4().hex[:10]}"
