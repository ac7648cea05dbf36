"""The production stack (docker-compose.yml, Dockerfile, deploy/) checked without Docker.

The compose file is validated against the Compose specification, then cross-checked against
the code it runs: service names and ports, the worker's settings, the search attributes. The
scripts the stack mounts run here against the session's real PostgreSQL, Temporal and moto.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import boto3
import httpx
import pytest
import yaml
from pydantic import AliasChoices
from temporalio.client import Client

from core.settings import Settings
from flysim.cli import TOKENS_ENV, parse_tokens
from turbodeploy import embedded

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
OFFLINE_ENV_FILE = ROOT / "deploy" / "offline.env"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Ports each image's server listens on inside the compose network.
IMAGE_PORTS: dict[str, set[int]] = {
    "postgres": {5432},
    "temporalio/server": {7233, 7234, 7235, 7239, 6933, 6934, 6935, 6939},
    "temporalio/ui": {8080},
    "motoserver/moto": {5000},
    "temporalio/admin-tools": set(),
}
# Environment variables of the worker that are read by boto3 rather than by Settings.
AWS_SDK_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}

_INTERPOLATION = re.compile(
    r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^${}]*))?\}"
)
_ADDRESS = re.compile(r"(?:^|(?<=//)|(?<=@))(?P<host>[A-Za-z0-9_.-]+):(?P<port>\d+)(?=/|$)")
_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)(?P<unit>h|ms|m|s|us)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


# ------------------------------------------------------------------------------ helpers


def _interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:+alternative}` and `${VAR:?error}`,
    nested ones included (the innermost is resolved first)."""

    def resolve(m: re.Match[str]) -> str:
        name, op, arg = m["name"], m["op"], m["arg"] or ""
        current = env.get(name)
        if op == ":-":
            return current if current else arg
        if op == "-":
            return arg if current is None else current
        if op == ":+":
            return arg if current else ""
        if op == "+":
            return "" if current is None else arg
        if op in (":?", "?") and not current:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        return current or ""

    previous = None
    while previous != value:
        previous, value = value, _INTERPOLATION.sub(resolve, value)
    return value.replace("$$", "$")


def _read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def _environment(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """A service's environment as the container sees it; a key without a value is passed
    through from where compose runs, and left out when unset there."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    resolved: dict[str, str] = {}
    for key, value in raw.items():
        if value is None:
            if key in env:
                resolved[key] = env[key]
        else:
            resolved[key] = _interpolate(str(value), env)
    return resolved


def _image_name(image: str) -> str:
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


def _listening_ports(service: Mapping[str, Any], env: Mapping[str, str]) -> set[int]:
    if "build" in service:
        command = [str(part) for part in service.get("command") or []]
        return {int(command[i + 1]) for i, arg in enumerate(command[:-1]) if arg == "--port"}
    image = _image_name(_interpolate(service["image"], env))
    assert image in IMAGE_PORTS, f"no known ports for image {image!r}: add them to IMAGE_PORTS"
    return IMAGE_PORTS[image]


def _duration_seconds(value: str) -> float:
    parts = list(_DURATION.finditer(value))
    assert parts and "".join(p[0] for p in parts) == value, f"not a duration: {value!r}"
    return sum(float(p["n"]) * _SECONDS[p["unit"]] for p in parts)


def _settings_env_names() -> set[str]:
    """Every environment variable name Settings reads (upper case; it ignores case)."""
    prefix = Settings.model_config.get("env_prefix", "")
    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def _dockerfile_instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            instructions.append((keyword.upper(), args.strip()))
    return instructions


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins, `!` re-includes, `**` spans folders."""
    ignored = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, v) for c in candidates for v in variants) or (
            pattern.startswith("**/")
            and any(fnmatch.fnmatchcase(p, pattern.removeprefix("**/")) for p in parts)
        ):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = compose["services"]
    return result


@pytest.fixture(scope="module")
def offline_env() -> dict[str, str]:
    return _read_env_file(OFFLINE_ENV_FILE)


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No variable of this process leaks into Settings() while a test sets its own."""
    names = _settings_env_names() | AWS_SDK_VARIABLES
    for key in list(os.environ):
        if key.upper() in names or key.upper().startswith("TURBODEPLOY_"):
            monkeypatch.delenv(key)
    yield monkeypatch


# --------------------------------------------------------------------- compose: schema


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    exe = embedded.find_executable("check-jsonschema", "TURBODEPLOY_CHECK_JSONSCHEMA")
    return subprocess.run(
        [exe, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_follows_the_compose_specification() -> None:
    result = _check_jsonschema(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_an_unknown_service_key(tmp_path: Path) -> None:
    # The validation above is only worth something if it can fail.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE_FILE.read_text().replace("  worker:\n", "  worker:\n    stop_grace: 45s\n", 1)
    )
    result = _check_jsonschema(broken)
    assert result.returncode != 0
    assert "stop_grace" in result.stdout + result.stderr


# --------------------------------------------------------------- compose: cross-checks


def test_dependencies_name_existing_services(services: dict[str, Any]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on") or []
        for dependency in depends_on:
            assert dependency in services, f"{name} depends on unknown service {dependency!r}"
            if (
                isinstance(depends_on, dict)
                and depends_on[dependency].get("condition") == "service_healthy"
            ):
                assert "healthcheck" in services[dependency], (
                    f"{name} waits for {dependency} to be healthy, which has no healthcheck"
                )


def test_optional_dependencies_are_the_offline_services(services: dict[str, Any]) -> None:
    # Compose refuses a required dependency on a service whose profile is not enabled.
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        for dependency, spec in deps.items() if isinstance(deps, dict) else []:
            if services[dependency].get("profiles") and not service.get("profiles"):
                assert spec.get("required") is False, f"{name} requires {dependency}"


def test_addresses_in_environments_name_a_service_and_a_port_it_listens_on(
    services: dict[str, Any], offline_env: dict[str, str]
) -> None:
    found: set[tuple[str, int]] = set()
    sources = [
        (f"{name}.environment", value)
        for name, service in services.items()
        for env in ({}, offline_env)
        for value in _environment(service, env).values()
    ] + [(f"offline.env {key}", value) for key, value in offline_env.items()]
    for where, value in sources:
        for match in _ADDRESS.finditer(value):
            host, port = match["host"], int(match["port"])
            if host == "localhost" or "." in host:
                continue  # the operator's machine or the internet, not the compose network
            assert host in services, f"{where}: {value!r} names no service"
            ports = _listening_ports(services[host], offline_env)
            assert port in ports, f"{where}: {host} listens on {sorted(ports)}, not {port}"
            found.add((host, port))
    assert {("temporal", 7233), ("postgresql", 5432), ("moto", 5000), ("flysim", 4280)} <= found


def test_exposed_ports_are_ports_the_service_listens_on(
    services: dict[str, Any], offline_env: dict[str, str]
) -> None:
    for name, service in services.items():
        listening = _listening_ports(service, offline_env)
        for port in service.get("expose") or []:
            assert int(port) in listening, f"{name} exposes {port}, listens on {listening}"
        for binding in service.get("ports") or []:
            container_port = int(str(binding).rsplit(":", 1)[-1].split("/")[0])
            assert container_port in listening, f"{name} publishes {binding}"


def test_worker_environment_names_are_read_by_settings(
    services: dict[str, Any], offline_env: dict[str, str]
) -> None:
    known = _settings_env_names()
    worker_env = services["worker"]["environment"]
    for key in worker_env:
        assert key.upper() in known | AWS_SDK_VARIABLES, f"worker: {key} is read by nothing"
    for key in offline_env:
        if key.upper() in known | AWS_SDK_VARIABLES:
            assert key in worker_env, f"offline.env sets {key}, which never reaches the worker"
        else:
            assert not key.startswith("TURBODEPLOY_"), f"offline.env: {key} is not a setting"


def test_worker_settings_point_at_the_stack(
    services: dict[str, Any], clean_environ: pytest.MonkeyPatch
) -> None:
    for key, value in _environment(services["worker"], {}).items():
        clean_environ.setenv(key, value)
    settings = Settings()
    assert settings.temporal_address == "temporal:7233"
    assert settings.database_url is not None
    db = urlsplit(settings.database_url)
    assert (db.scheme, db.hostname, db.port) == ("postgresql", "postgresql", 5432)
    assert settings.db_schema == "turbobackend"
    # Unset pass-through variables keep the production endpoints.
    assert settings.aws_endpoint_url is None
    assert settings.fly_api_base_url == "https://api.machines.dev/v1"
    assert "AWS_ACCESS_KEY_ID" not in os.environ

    grace = _duration_seconds(services["worker"]["stop_grace_period"])
    assert settings.graceful_shutdown_seconds < grace, "Docker would kill running activities"


def test_offline_env_file_points_the_worker_at_the_emulators(
    services: dict[str, Any], offline_env: dict[str, str], clean_environ: pytest.MonkeyPatch
) -> None:
    for key, value in _environment(services["worker"], offline_env).items():
        clean_environ.setenv(key, value)
    settings = Settings()
    assert settings.aws_endpoint_url == "http://moto:5000"
    assert urlsplit(settings.fly_api_base_url).netloc == "flysim:4280"
    assert urlsplit(settings.app_url("turbobackend-x")).netloc == "flysim:4280"
    assert os.environ["AWS_ACCESS_KEY_ID"]
    # The token flysim accepts is the one ssm-seed stores for the workers.
    flysim_env = _environment(services["flysim"], offline_env)
    seed_env = _environment(services["ssm-seed"], offline_env)
    assert parse_tokens(flysim_env[TOKENS_ENV]) == {
        seed_env["FLY_API_TOKEN"]: seed_env["FLY_ORG_SLUG"]
    }
    assert seed_env["FLY_API_TOKEN"]
    # Without the env file the emulator gets no token rather than a malformed one.
    assert _environment(services["flysim"], {})[TOKENS_ENV] == ""
    assert seed_env["TURBODEPLOY_FLY_TOKEN_PARAMETER"] == settings.fly_token_parameter


def test_flysim_service_serves_the_worker_with_the_seeded_token(
    services: dict[str, Any], offline_env: dict[str, str], clean_environ: pytest.MonkeyPatch
) -> None:
    """The flysim service's own command and environment, on loopback instead of 0.0.0.0."""
    service = services["flysim"]
    command = [str(part) for part in service["command"]]
    port = embedded.free_port()
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    exe = embedded.find_executable(command[0], "TURBODEPLOY_CLI")
    env = {**os.environ, **_environment(service, offline_env)}
    for key, value in _environment(services["worker"], offline_env).items():
        clean_environ.setenv(key, value)
    settings = Settings()
    seeded = _environment(services["ssm-seed"], offline_env)
    proc = subprocess.Popen(
        [exe, *command[1:]], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        # The emulator prints its banner once it listens, or its reason for not starting.
        banner = proc.stderr.readline()
        assert proc.poll() is None, f"flysim exited: {banner}{proc.stderr.read()}"
        embedded.wait_for_port("127.0.0.1", port, timeout=30)
        apps = urlsplit(settings.fly_api_base_url).path + "/apps"
        url = f"http://127.0.0.1:{port}{apps}"
        query = {"org_slug": seeded["FLY_ORG_SLUG"]}
        token = seeded["FLY_API_TOKEN"]
        accepted = httpx.get(url, params=query, headers={"Authorization": f"Bearer {token}"})
        assert accepted.status_code == 200, accepted.text
        refused = httpx.get(url, params=query, headers={"Authorization": "Bearer other"})
        assert refused.status_code == 401
        # The worker's health checks go where the emulator serves the apps.
        served = re.search(r"apps (\S+?),?(?:\s|$)", banner)
        assert served, banner
        assert urlsplit(served[1]).path == urlsplit(settings.app_url_template).path
        assert token not in banner
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stderr is not None:
            proc.stderr.close()


def test_offline_services_only_run_with_the_offline_profile(services: dict[str, Any]) -> None:
    for name in ("moto", "flysim", "ssm-seed"):
        assert services[name].get("profiles") == ["offline"], name
    for name in ("postgresql", "temporal", "temporal-ui", "worker"):
        assert not services[name].get("profiles"), name


def test_worker_can_be_scaled(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a published host port allows one worker only"
    assert "hostname" not in worker
    assert worker["build"]["context"] == "."
    assert worker["build"].get("dockerfile", "Dockerfile") == DOCKERFILE.name


def test_no_secret_on_a_command_line(services: dict[str, Any]) -> None:
    secret_names = re.compile(r"\$\{?[A-Z_]*(TOKEN|SECRET|PASSWORD|PWD)", re.IGNORECASE)
    for name, service in services.items():
        for key in ("command", "entrypoint"):
            value = service.get(key)
            text = " ".join(map(str, value)) if isinstance(value, list) else str(value or "")
            assert "FlyV1" not in text, f"{name}.{key} holds a token"
            assert not secret_names.search(text), f"{name}.{key} expands a secret: {text}"


def test_bind_mounts_exist(services: dict[str, Any]) -> None:
    mounted = 0
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
                mounted += 1
    assert mounted >= 4


def test_temporal_reads_the_mounted_dynamic_config(services: dict[str, Any]) -> None:
    temporal = services["temporal"]
    config_path = temporal["environment"]["DYNAMIC_CONFIG_FILE_PATH"]
    mount = next(v for v in temporal["volumes"] if "dynamicconfig" in v)
    source, target = mount.split(":")[:2]
    # Relative paths are resolved from the server's working directory, /etc/temporal.
    in_container = "/etc/temporal/" + config_path
    assert in_container.startswith(target + "/")
    config = yaml.safe_load((ROOT / source / in_container.removeprefix(target + "/")).read_text())
    for key, entries in config.items():
        assert isinstance(entries, list) and all("value" in e for e in entries), key


# -------------------------------------------------------------------- search attributes


def test_registered_search_attributes_are_the_workflows(services: dict[str, Any]) -> None:
    job = services["temporal-search-attributes"]
    assert job["environment"]["SEARCH_ATTRIBUTES"].split() == list(embedded.SEARCH_ATTRIBUTES)
    # On the namespace the namespace job made.
    assert job["depends_on"]["temporal-namespace"]["condition"] == "service_completed_successfully"
    assert (
        job["environment"]["TEMPORAL_NAMESPACE"]
        == (services["temporal-namespace"]["environment"]["DEFAULT_NAMESPACE"])
    )
    worker_deps = services["worker"]["depends_on"]
    assert worker_deps["temporal-search-attributes"]["condition"] == (
        "service_completed_successfully"
    )


async def test_registration_script_creates_keyword_attributes(
    services: dict[str, Any], temporal_client: Client, tmp_path: Path
) -> None:
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash is not installed")
    job = services["temporal-search-attributes"]
    script = next(
        ROOT / v.split(":")[0] for v in job["volumes"] if v.split(":")[1] == job["entrypoint"][-1]
    )
    cli = embedded.temporal_cli()
    namespace = f"ns-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "PATH": f"{Path(cli).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TEMPORAL_ADDRESS": temporal_client.service_client.config.target_host,
        "TEMPORAL_NAMESPACE": namespace,
        "SEARCH_ATTRIBUTES": job["environment"]["SEARCH_ATTRIBUTES"],
        "REGISTER_TIMEOUT_SECONDS": "30",
    }
    subprocess.run([cli, "operator", "namespace", "create", "-n", namespace], env=env, check=True)
    for _ in range(2):  # runs on every `compose up`: a second run must succeed too
        result = subprocess.run(
            [bash, str(script)], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    listed = subprocess.run(
        [cli, "operator", "search-attribute", "list", "-n", namespace, "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    custom = json.loads(listed.stdout)["customAttributes"]
    assert custom == dict.fromkeys(embedded.SEARCH_ATTRIBUTES, "INDEXED_VALUE_TYPE_KEYWORD")


# ------------------------------------------------------- Temporal on supported images

_VERSION = re.compile(r"\d+\.\d+\.\d+")


def _image(service: Mapping[str, Any]) -> tuple[str, str]:
    """A service's image name and its tag as compose resolves it with nothing set."""
    resolved = _interpolate(service["image"], {})
    name = _image_name(resolved)
    return name, resolved.removeprefix(name).lstrip(":")


def _script(service: Mapping[str, Any]) -> Path:
    """The mounted script a one-shot service runs."""
    target = service["entrypoint"][-1]
    return next(ROOT / v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == target)


def test_temporal_runs_on_the_supported_images_pinned(services: dict[str, Any]) -> None:
    images = {name: _image(service) for name, service in services.items() if "image" in service}
    assert not [n for n, (image, _) in images.items() if image == "temporalio/auto-setup"], (
        "temporalio/auto-setup is deprecated and no longer updated"
    )
    assert images["temporal"][0] == "temporalio/server"
    server_version = images["temporal"][1]
    assert _VERSION.fullmatch(server_version), f"temporalio/server is not pinned: {server_version}"
    admin = [n for n, (image, _) in images.items() if image == "temporalio/admin-tools"]
    assert {"temporal-schema", "temporal-namespace", "temporal-search-attributes"} <= set(admin)
    for name in admin:
        # The schema tool of another release would set up another schema version.
        assert images[name][1].split("-")[0] == server_version, f"{name}: {images[name][1]}"


def test_the_schema_is_set_up_before_the_server_starts(services: dict[str, Any]) -> None:
    schema, temporal = services["temporal-schema"], services["temporal"]
    assert schema["depends_on"]["postgresql"]["condition"] == "service_healthy"
    assert temporal["depends_on"]["temporal-schema"]["condition"] == (
        "service_completed_successfully"
    )
    assert schema.get("restart") == "no"
    # The job and the server use the same database server, user and password.
    job_env, server_env = _environment(schema, {}), _environment(temporal, {})
    assert job_env["POSTGRES_SEEDS"] == server_env["POSTGRES_SEEDS"] == "postgresql"
    assert job_env["POSTGRES_USER"] == server_env["POSTGRES_USER"]
    assert job_env["SQL_PASSWORD"] == server_env["POSTGRES_PWD"]
    assert job_env["DB_PORT"] == server_env["DB_PORT"] == "5432"
    assert server_env["DB"] == "postgres12"
    script = _script(schema).read_text()
    # Both of the server's databases, with the schema of its plugin (postgres12 -> v12).
    assert "--plugin postgres12" in script
    for db, folder in (("temporal", "temporal"), ("temporal_visibility", "visibility")):
        assert f"{db}:{folder}" in script
    for step in ("create", "setup-schema -v 0.0", "update-schema -d"):
        assert step in script
    assert "/etc/temporal/schema/postgresql/v12" in script


def test_the_namespace_exists_before_the_search_attributes(services: dict[str, Any]) -> None:
    job = services["temporal-namespace"]
    assert job["depends_on"]["temporal"]["condition"] == "service_healthy"
    env = _environment(job, {})
    assert env["TEMPORAL_ADDRESS"] == "temporal:7233"
    worker_env = _environment(services["worker"], {})
    assert env["DEFAULT_NAMESPACE"] == worker_env["TURBODEPLOY_TEMPORAL_NAMESPACE"]
    assert _duration_seconds(env["DEFAULT_NAMESPACE_RETENTION"]) >= 24 * 3600


async def test_namespace_script_creates_the_namespace_once(
    services: dict[str, Any], temporal_client: Client
) -> None:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("sh is not installed")
    job = services["temporal-namespace"]
    cli = embedded.temporal_cli()
    namespace = f"ns-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        "PATH": f"{Path(cli).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "TEMPORAL_ADDRESS": temporal_client.service_client.config.target_host,
        "DEFAULT_NAMESPACE": namespace,
        "DEFAULT_NAMESPACE_RETENTION": "48h",
        "NAMESPACE_TIMEOUT_SECONDS": "30",
    }
    outputs = []
    for _ in range(2):  # runs on every `compose up`: a second run must succeed too
        result = subprocess.run(
            [sh, str(_script(job))], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout)
    assert "created" in outputs[0] and "exists" in outputs[1]
    described = subprocess.run(
        [cli, "operator", "namespace", "describe", "-n", namespace, "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    config = json.loads(described.stdout)["config"]
    assert _duration_seconds(config["workflowExecutionRetentionTtl"]) == 48 * 3600


def test_schema_script_is_valid_shell() -> None:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("sh is not installed")
    for script in ("setup-schema.sh", "create-namespace.sh"):
        path = ROOT / "deploy" / "temporal" / script
        result = subprocess.run([sh, "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------- deploy/ scripts


async def test_postgres_init_script_creates_the_worker_database(
    services: dict[str, Any], postgres_url: str
) -> None:
    from pgserver._commands import POSTGRES_BIN_PATH

    psql = shutil.which("psql") or shutil.which("psql", path=str(POSTGRES_BIN_PATH))
    if psql is None:
        pytest.skip("psql is not installed")
    admin = await asyncpg.connect(postgres_url)
    try:
        if not await admin.fetchval("select rolsuper from pg_roles where rolname = current_user"):
            pytest.skip("the test database's user may not create roles")
        service = services["postgresql"]
        init_dir = next(
            ROOT / v.split(":")[0] for v in service["volumes"] if "docker-entrypoint-initdb.d" in v
        )
        suffix = uuid.uuid4().hex[:8]
        url = urlsplit(postgres_url)
        query = dict(p.split("=", 1) for p in url.query.split("&") if "=" in p)
        env = {
            **os.environ,
            "PATH": f"{Path(psql).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PGHOST": query.get("host") or url.hostname or "",
            "PGPORT": str(url.port or 5432),
            "PGPASSWORD": url.password or "",
            "POSTGRES_USER": url.username or "postgres",
            "POSTGRES_DB": url.path.lstrip("/") or "postgres",
            "APP_DB_USER": f"td_{suffix}",
            "APP_DB_NAME": f"td_{suffix}",
            # Quotes must reach the server as data, never as SQL.
            "APP_DB_PASSWORD": "pa'ss\"word",
        }
        assert set(_environment(service, {})) >= {"APP_DB_USER", "APP_DB_NAME", "APP_DB_PASSWORD"}
        scripts = sorted(init_dir.glob("*.sh"))
        assert scripts
        for script in scripts:
            assert os.access(script, os.X_OK), f"{script.name} is not executable"
            result = subprocess.run(
                [str(script)], env=env, capture_output=True, text=True, timeout=60
            )
            assert result.returncode == 0, result.stderr
        try:
            owner = await admin.fetchval(
                "select pg_get_userbyid(datdba) from pg_database where datname = $1",
                f"td_{suffix}",
            )
            assert owner == f"td_{suffix}"
            can_login = await admin.fetchval(
                "select rolcanlogin and not rolsuper from pg_roles where rolname = $1",
                f"td_{suffix}",
            )
            assert can_login is True
        finally:
            await admin.execute(f'drop database if exists "td_{suffix}"')
            await admin.execute(f'drop role if exists "td_{suffix}"')
    finally:
        await admin.close()


def test_ssm_seed_stores_the_token_from_the_environment(
    services: dict[str, Any], offline_env: dict[str, str], ssm_endpoint: str, fly_token: str
) -> None:
    service = services["ssm-seed"]
    script = next(
        ROOT / v.split(":")[0] for v in service["volumes"] if v.split(":")[1] in service["command"]
    )
    prefix = f"/t-{uuid.uuid4().hex[:10]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.upper().startswith("TURBODEPLOY_")},
        **_environment(service, offline_env),
        "TURBODEPLOY_AWS_ENDPOINT_URL": ssm_endpoint,
        "TURBODEPLOY_FLY_TOKEN_PARAMETER": f"{prefix}/token",
        "TURBODEPLOY_FLY_ORG_PARAMETER": f"{prefix}/org",
        "FLY_API_TOKEN": fly_token,
    }
    result = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert fly_token not in result.stdout + result.stderr
    ssm = boto3.client("ssm", endpoint_url=ssm_endpoint, region_name=env["AWS_REGION"])
    stored = ssm.get_parameter(Name=f"{prefix}/token", WithDecryption=True)["Parameter"]
    assert (stored["Value"], stored["Type"]) == (fly_token, "SecureString")
    org = ssm.get_parameter(Name=f"{prefix}/org")["Parameter"]["Value"]
    assert org == offline_env["OFFLINE_FLY_ORG"]

    env["FLY_API_TOKEN"] = ""
    refused = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert refused.returncode != 0 and "OFFLINE_FLY_TOKEN" in refused.stderr


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_the_worker_image() -> None:
    instructions = _dockerfile_instructions()
    by_keyword: dict[str, list[str]] = {}
    for keyword, args in instructions:
        by_keyword.setdefault(keyword, []).append(args)

    assert by_keyword["FROM"] == ["python:3.11-slim"]
    runs = " && ".join(by_keyword["RUN"])
    assert re.search(r"apt-get install[^&]*\bgit\b", runs), "git is not installed"
    assert re.search(r"\bpip install (\S+ )*\.(\s|$)", runs), "the project is not installed"

    # flyctl: the official installer, a pinned release, on PATH for the worker.
    pinned = [a for a in by_keyword["ARG"] if a.startswith("FLYCTL_VERSION=")]
    assert pinned and re.fullmatch(r"FLYCTL_VERSION=\d+\.\d+\.\d+", pinned[0])
    assert re.search(r"curl [^|]*https://fly\.io/install\.sh \| sh -s \"?\$\{?FLYCTL_VERSION", runs)
    env = " ".join(by_keyword["ENV"])
    install_dir = re.search(r"FLYCTL_INSTALL=(\S+)", env)
    assert install_dir, "FLYCTL_INSTALL decides where flyctl goes; set it"
    assert re.search(rf"PATH={re.escape(install_dir[1])}/bin:", env), "flyctl is not on PATH"
    assert "flyctl version" in runs, "a failed flyctl install must fail the build"

    users = by_keyword.get("USER", [])
    assert users and users[-1] not in {"root", "0", "0:0"}, "the worker must not run as root"
    assert by_keyword["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(by_keyword["CMD"][-1]) == ["python", "worker.py"]
    assert (ROOT / "worker.py").is_file()
    # The CMD runs from the copied sources.
    assert by_keyword["WORKDIR"] and by_keyword["COPY"]


def test_dockerignore_keeps_local_state_out_and_sources_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".turbodeploy/state.db",
        "turbodeploy/__pycache__/settings.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".mypy_cache/3.11/x.json",
        ".env",
    ):
        assert _dockerignored(path, patterns), f"{path} would be sent to the build"
    for path in (
        "pyproject.toml",
        "worker.py",
        "core/settings.py",
        "core/db/migrations/0001.sql",
        "workflows/__init__.py",
        "activities/__init__.py",
        "flyapi/__init__.py",
        "flysim/__init__.py",
    ):
        assert not _dockerignored(path, patterns), f"{path} is needed by the build"
