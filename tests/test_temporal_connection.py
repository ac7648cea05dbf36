"""The Temporal connection, read as the `temporal` CLI reads it (`temporalio.envconfig`):
temporal.toml profiles, the TEMPORAL_* variables, TURBODEPLOY_TEMPORAL_* over them; and the
worker and the CLI reaching a server over mTLS with an API key by environment alone,
through a TLS-terminating proxy in front of the dev server that sees the key."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from harness import (
    IMAGE,
    PROJECT_ROOT,
    WorkerProcess,
    fast_timings,
    new_project_id,
    wait_for_pollers,
    worker_env,
)
from temporalio.client import Client
from temporalio.service import TLSConfig
from tlsproxy import Pki, TlsProxy, make_pki

from core.settings import Settings
from core.temporal import TemporalConfigError, temporal_connection
from turbodeploy import client as api


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """No TEMPORAL_* or TURBODEPLOY_TEMPORAL_* of this process, no config file of the user."""
    for key in list(os.environ):
        if key.startswith(("TEMPORAL_", "TURBODEPLOY_TEMPORAL_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(tmp_path / "absent.toml"))
    yield monkeypatch


def test_defaults_are_the_local_dev_server(clean_env: pytest.MonkeyPatch) -> None:
    c = temporal_connection(Settings())
    assert (c.target_host, c.namespace, c.tls, c.api_key) == (
        "localhost:7233",
        "default",
        False,
        None,
    )


def test_the_temporal_cli_variables_are_read(clean_env: pytest.MonkeyPatch) -> None:
    key = "key-" + uuid.uuid4().hex
    clean_env.setenv("TEMPORAL_ADDRESS", "eu-west-1.aws.api.temporal.io:7233")
    clean_env.setenv("TEMPORAL_NAMESPACE", "deploys.a1b2c")
    clean_env.setenv("TEMPORAL_API_KEY", key)
    clean_env.setenv("TEMPORAL_GRPC_META_X_TEAM", "platform")
    c = temporal_connection(Settings())
    assert c.target_host == "eu-west-1.aws.api.temporal.io:7233"
    assert c.namespace == "deploys.a1b2c"
    assert c.api_key == key and c.tls is True  # an API key means TLS (Temporal Cloud)
    assert c.rpc_metadata == {"x-team": "platform"}
    assert key not in c.describe() and key not in repr(c)
    assert "API key" in c.describe() and "TLS" in c.describe()


def test_turbodeploy_settings_win_over_the_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TEMPORAL_ADDRESS", "elsewhere:7233")
    clean_env.setenv("TEMPORAL_NAMESPACE", "elsewhere")
    clean_env.setenv("TURBODEPLOY_TEMPORAL_ADDRESS", "temporal:7233")
    clean_env.setenv("TURBODEPLOY_TEMPORAL_NAMESPACE", "prod")
    c = temporal_connection(Settings())
    assert (c.target_host, c.namespace) == ("temporal:7233", "prod")
    # Given in code, as the tests and the embedded stack do, they win as well.
    clean_env.delenv("TURBODEPLOY_TEMPORAL_NAMESPACE")
    c = temporal_connection(Settings(temporal_address="127.0.0.1:1"))
    assert (c.target_host, c.namespace) == ("127.0.0.1:1", "elsewhere")


def test_a_profile_of_temporal_toml_with_mtls(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    config = tmp_path / "temporal.toml"
    config.write_text(
        f"""
[profile.default]
address = "localhost:7233"

[profile.prod]
address = "temporal.internal:7233"
namespace = "deploys"

[profile.prod.tls]
server_name = "temporal.internal"
server_ca_cert_path = "{pki.ca}"
client_cert_path = "{pki.client_cert}"
client_key_path = "{pki.client_key}"
"""
    )
    clean_env.setenv("TEMPORAL_CONFIG_FILE", str(config))
    assert temporal_connection(Settings()).tls is False
    for pick in ("env", "setting"):
        if pick == "env":
            clean_env.setenv("TEMPORAL_PROFILE", "prod")
            settings = Settings()
        else:
            clean_env.delenv("TEMPORAL_PROFILE")
            settings = Settings(temporal_profile="prod")
        c = temporal_connection(settings)
        assert (c.target_host, c.namespace, c.profile) == (
            "temporal.internal:7233",
            "deploys",
            "prod",
        )
        assert isinstance(c.tls, TLSConfig)
        assert c.tls.domain == "temporal.internal"
        assert c.tls.server_root_ca_cert == pki.ca.read_bytes()
        assert c.tls.client_cert == pki.client_cert.read_bytes()
        assert c.tls.client_private_key == pki.client_key.read_bytes()
        assert "mTLS" in c.describe()


def test_a_missing_profile_is_a_clear_error(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "temporal.toml"
    config.write_text('[profile.default]\naddress = "localhost:7233"\n')
    clean_env.setenv("TEMPORAL_CONFIG_FILE", str(config))
    with pytest.raises(TemporalConfigError, match="profile prod"):
        temporal_connection(Settings(temporal_profile="prod"))


# ------------------------------------------------------------ over TLS, with an API key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest_asyncio.fixture
async def proxy(temporal_client: Client, pki: Pki) -> AsyncIterator[TlsProxy]:
    upstream = temporal_client.service_client.config.target_host
    async with TlsProxy(upstream, pki).serving() as p:
        yield p


def _tls_env(proxy: TlsProxy, pki: Pki, key: str) -> dict[str, str]:
    return {
        "TEMPORAL_ADDRESS": proxy.address,
        "TEMPORAL_NAMESPACE": "default",
        "TEMPORAL_API_KEY": key,
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(pki.ca),
        "TEMPORAL_TLS_CLIENT_CERT_PATH": str(pki.client_cert),
        "TEMPORAL_TLS_CLIENT_KEY_PATH": str(pki.client_key),
        "TEMPORAL_TLS_SERVER_NAME": "localhost",
        "TEMPORAL_CONFIG_FILE": str(Path(pki.ca).parent / "absent.toml"),
    }


async def test_the_python_api_connects_over_mtls_with_an_api_key(
    proxy: TlsProxy, pki: Pki, clean_env: pytest.MonkeyPatch
) -> None:
    key = "api-" + uuid.uuid4().hex
    for name, value in _tls_env(proxy, pki, key).items():
        clean_env.setenv(name, value)
    client = await api.connect()
    await client.count_workflows()
    assert key in proxy.api_keys()

    # The proxy does refuse a client without a certificate: the test above is not vacuous.
    clean_env.delenv("TEMPORAL_TLS_CLIENT_CERT_PATH")
    clean_env.delenv("TEMPORAL_TLS_CLIENT_KEY_PATH")
    seen = len(proxy.requests)
    with pytest.raises(RuntimeError):
        await asyncio.wait_for(api.connect(), 30)
    assert len(proxy.requests) == seen, "no request got through without a certificate"


@pytest.mark.usefixtures("calm_emulator")
async def test_worker_and_cli_deploy_over_mtls_with_api_keys_from_the_environment(
    proxy: TlsProxy,
    pki: Pki,
    temporal_client: Client,
    postgres_url: str,
    ssm_endpoint: str,
    flysim: Any,
    repo: str,
    tmp_path: Path,
) -> None:
    worker_key, cli_key = "worker-" + uuid.uuid4().hex, "cli-" + uuid.uuid4().hex
    task_queue = f"tls-{uuid.uuid4().hex[:8]}"
    schema = f"tls_{uuid.uuid4().hex[:8]}"
    env = worker_env(
        temporal_address="unused",
        task_queue=task_queue,
        database_url=postgres_url,
        db_schema=schema,
        ssm_endpoint=ssm_endpoint,
        fly_api_base_url=flysim.base_url,
        app_url_template=flysim.app_url_template,
        work_dir=tmp_path / "work",
        extra=_tls_env(proxy, pki, worker_key),
    )
    del env["TURBODEPLOY_TEMPORAL_ADDRESS"]  # the TEMPORAL_* variables alone
    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        await wait_for_pollers(temporal_client, task_queue, timeout=60)
        assert worker_key in proxy.api_keys()
        cli_env = {
            "PATH": os.environ["PATH"],
            "HOME": env["HOME"],
            "PYTHONPATH": str(PROJECT_ROOT),
            "TURBODEPLOY_TASK_QUEUE": task_queue,
            **_tls_env(proxy, pki, cli_key),
        }
        project = new_project_id("tls")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "turbodeploy.cli", "deploy", project, "--repo", repo,
            "--image", IMAGE, "--timings", fast_timings().model_dump_json(),
            "--wait", "--json",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env, cwd=PROJECT_ROOT,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode() + out.decode()
        assert '"deployed"' in out.decode()
    finally:
        worker.stop()
    assert cli_key in proxy.api_keys()
    log = worker.output()
    assert "API key" in log and "mTLS" in log, log[-2000:]
    assert worker_key not in log and cli_key not in out.decode() + err.decode()
    # Every request through the proxy carried a key: none went in without one.
    assert all("authorization" in h for h in proxy.requests if ":path" in h)
