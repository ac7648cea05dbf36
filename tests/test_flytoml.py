"""fly.toml rendering, merging and the mapping to a Machines API config."""

from __future__ import annotations

import copy
import tomllib
from typing import Any

import pytest
import yaml
from conftest import REFERENCE_DIR, reference_file
from jsonschema import Draft4Validator
from jsonschema.exceptions import ValidationError

from core import flytoml
from core.flytoml import FlyTomlError, machine_config, overlay_managed, render_fly_toml

APP = "turbobackend-p1"
IMAGE = "registry.fly.io/turbobackend-p1:deployment-1"


def _render(existing: str | None = None, **env: str) -> str:
    return render_fly_toml(app_name=APP, region="ams", env=env, existing=existing)


def _example_names() -> list[str]:
    # Collected before any test runs: an absent folder gives an empty (skipped) parameter set.
    return sorted(p.name for p in (REFERENCE_DIR / "fly-toml-examples").glob("*.toml"))


def _key_paths(value: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf, array indices left out (as MANAGED_KEYS writes them)."""
    if isinstance(value, dict):
        paths: set[str] = set()
        for key, sub in value.items():
            paths |= _key_paths(sub, f"{prefix}.{key}" if prefix else key)
        return paths
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return set().union(*(_key_paths(v, prefix) for v in value))
    return {prefix}


def test_render_from_scratch_sets_every_managed_value() -> None:
    doc = tomllib.loads(_render(API_KEY="k", LOG_LEVEL="debug"))

    assert doc["app"] == APP
    assert doc["primary_region"] == "ams"
    assert doc["env"] == {
        "PORT": "3000",
        "NODE_ENV": "production",
        "API_KEY": "k",
        "LOG_LEVEL": "debug",
    }
    assert doc["http_service"] == {
        "internal_port": 3000,
        "force_https": True,
        "auto_stop_machines": "stop",
        "auto_start_machines": True,
        "min_machines_running": 0,
        "processes": ["app"],
        "concurrency": {"type": "requests", "soft_limit": 200, "hard_limit": 250},
        "checks": [
            {
                "method": "GET",
                "path": "/api/health",
                "grace_period": "10s",
                "interval": "15s",
                "timeout": "5s",
            }
        ],
    }
    assert doc["vm"] == [{"size": "shared-cpu-1x", "memory": "256mb"}]
    assert set(doc) == {"app", "primary_region", "env", "http_service", "vm"}


def test_render_writes_readable_sections() -> None:
    text = _render()
    assert "[[vm]]" in text
    assert "[[http_service.checks]]" in text
    assert 'processes = ["app"]' in text


def test_every_rendered_key_is_declared_managed() -> None:
    paths = _key_paths(tomllib.loads(_render(EXTRA="1")))
    assert all(flytoml.is_managed_key(p) for p in paths), sorted(
        p for p in paths if not flytoml.is_managed_key(p)
    )


def test_render_is_idempotent() -> None:
    once = _render(A="1", B="2")
    assert _render(once, A="1", B="2") == once
    assert _render(once, B="2", A="1") == once


def test_request_env_overrides_file_env_and_keeps_the_rest() -> None:
    existing = '[env]\nFOO = "old"\nKEEP = "me"\nPORT = "8080"\n'
    env = tomllib.loads(_render(existing, FOO="new"))["env"]
    assert env == {"PORT": "3000", "NODE_ENV": "production", "FOO": "new", "KEEP": "me"}


@pytest.mark.parametrize("name", _example_names())
def test_merge_keeps_every_unmanaged_key(name: str) -> None:
    original = (reference_file("fly-toml-examples") / name).read_text()
    before = tomllib.loads(original)

    merged_text = _render(original, NEW_VAR="x")
    merged = tomllib.loads(merged_text)

    lost = {p for p in _key_paths(before) - _key_paths(merged) if not flytoml.is_managed_key(p)}
    assert not lost, f"unmanaged keys dropped from {name}: {sorted(lost)}"
    for key in ("build", "deploy", "mounts", "mount", "statics", "files", "processes", "checks"):
        if key in before:
            assert merged[key] == before[key], key
    for key in ("kill_signal", "kill_timeout", "swap_size_mb", "console_command"):
        if key in before:
            assert merged[key] == before[key], key
    assert _render(merged_text, NEW_VAR="x") == merged_text


def test_merge_full_reference_details() -> None:
    original = reference_file("fly-toml-examples", "full-reference.toml").read_text()
    merged = tomllib.loads(_render(original))

    http = merged["http_service"]
    assert http["internal_port"] == 3000
    assert http["concurrency"] == {"type": "requests", "soft_limit": 200, "hard_limit": 250}
    # The user's own check is kept after ours; their TLS/HTTP options stay.
    assert [c["path"] for c in http["checks"]] == ["/api/health", "/"]
    assert http["checks"][1]["headers"] == {"My-Custom-Header": "whatever"}
    assert http["tls_options"]["alpn"] == ["h2", "http/1.1"]
    assert http["http_options"]["response"]["headers"]["fly-request-id"] is False
    # The services entry on another port survives; [experimental] keeps its valid keys.
    assert [s["internal_port"] for s in merged["services"]] == [8081]
    assert merged["experimental"]["auto_rollback"] is True
    # Every [[vm]] of the app group is ours, without keys that would override it.
    assert merged["vm"][0]["gpu_kind"] == "a100-pcie-40gb"
    for vm in merged["vm"]:
        assert vm["size"] == "shared-cpu-1x" and vm["memory"] == "256mb"
        assert not {"cpu_kind", "cpus", "memory_mb"} & set(vm)


COMMONLY_COPIED = """\
# "cost optimised" config found in many blog posts
app = "my-old-name"
primary_region = "lhr"
kill_signal = "SIGINT"
swap_size_mb = 256

[experimental]
  auto_stop_machines = true
  auto_start_machines = true
  min_machines_running = 0

[build]
  dockerfile = "Dockerfile.prod"

[env]
  PORT = "3000"
  DATABASE_POOL = "5"

[http_service]
  internal_port = 3000
  force_https = true
  auto_stop_machines = true
  auto_start_machines = true
  min_machines_running = 1

[[services]]
  internal_port = 3000
  protocol = "tcp"
  [[services.ports]]
    port = 80
    handlers = ["http"]
  [[services.ports]]
    port = 443
    handlers = ["tls", "http"]

[[services]]
  internal_port = 9091
  protocol = "tcp"
  auto_stop_machines = false
  [[services.ports]]
    port = 9091

[[vm]]
  cpu_kind = "shared"
  cpus = 2
  memory_mb = 1024
"""


def test_merge_repairs_the_commonly_copied_config() -> None:
    merged = tomllib.loads(_render(COMMONLY_COPIED))

    assert "experimental" not in merged
    assert merged["http_service"]["auto_stop_machines"] == "stop"
    assert merged["http_service"]["min_machines_running"] == 0
    # Only the duplicate of the http_service is gone; the legacy boolean is converted.
    assert [s["internal_port"] for s in merged["services"]] == [9091]
    assert merged["services"][0]["auto_stop_machines"] == "off"
    assert merged["vm"] == [{"size": "shared-cpu-1x", "memory": "256mb"}]
    assert merged["app"] == APP and merged["primary_region"] == "ams"
    assert merged["build"] == {"dockerfile": "Dockerfile.prod"}
    assert merged["env"]["DATABASE_POOL"] == "5"
    assert merged["kill_signal"] == "SIGINT" and merged["swap_size_mb"] == 256

    config = machine_config(_render(COMMONLY_COPIED), image=IMAGE, metadata={})
    autostops = {s["internal_port"]: s.get("autostop") for s in config["services"]}
    assert autostops == {3000: True, 9091: False}


def test_experimental_keeps_other_keys() -> None:
    text = "[experimental]\nauto_stop_machines = true\nauto_rollback = true\n"
    assert tomllib.loads(_render(text))["experimental"] == {"auto_rollback": True}


def test_services_on_the_old_http_port_are_dropped() -> None:
    text = (
        "[http_service]\ninternal_port = 8080\n\n"
        '[[services]]\ninternal_port = "8080"\n\n[[services]]\ninternal_port = 5432\n'
    )
    services = tomllib.loads(_render(text))["services"]
    assert [s["internal_port"] for s in services] == [5432]


def test_invalid_toml_names_the_line() -> None:
    with pytest.raises(FlyTomlError, match=r"line 3"):
        _render('app = "x"\n\n[http_service\ninternal_port = 1\n')


def test_wrong_shapes_are_rejected_clearly() -> None:
    with pytest.raises(FlyTomlError, match=r"\[http_service\] must be a table"):
        _render("http_service = 3\n")
    with pytest.raises(FlyTomlError, match="vm"):
        _render("vm = 3\n")


# ---------------------------------------------------------------------- machine config


@pytest.fixture(scope="module")
def machine_config_validator() -> Draft4Validator:
    spec = yaml.safe_load(reference_file("fly-machines-openapi.yaml").read_text())
    schemas = copy.deepcopy(spec["components"]["schemas"])
    # The spec renders Go's `map[string]any` response headers as `type: object`; the API
    # (and flyctl) use booleans, strings and lists there, as fly.toml does.
    schemas["api.HTTPResponseOptions"]["properties"]["headers"]["additionalProperties"] = {}
    root = {"$ref": "#/components/schemas/api.MachineConfig", "components": {"schemas": schemas}}
    return Draft4Validator(root)


def _validate(validator: Draft4Validator, config: dict[str, Any]) -> None:
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ValidationError("; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors))


@pytest.mark.parametrize("name", _example_names())
def test_machine_config_of_every_example_validates(
    name: str, machine_config_validator: Draft4Validator
) -> None:
    original = (reference_file("fly-toml-examples") / name).read_text()
    for text in (original, _render(original)):
        config = machine_config(text, image=IMAGE, metadata={"deployment_id": "d-1"})
        _validate(machine_config_validator, config)
        assert config["image"] == IMAGE
        assert config["metadata"]["fly_platform_version"] == "v2"
        assert config["metadata"]["fly_process_group"] == "app"
        assert config["metadata"]["deployment_id"] == "d-1"


def test_the_validator_catches_wrong_types(machine_config_validator: Draft4Validator) -> None:
    config = machine_config(_render(), image=IMAGE, metadata={})
    config["guest"]["memory_mb"] = "256mb"
    with pytest.raises(ValidationError, match="memory_mb"):
        _validate(machine_config_validator, config)


def test_machine_config_of_a_rendered_file() -> None:
    config = machine_config(_render(A="1"), image=IMAGE, metadata={"fly_release_id": "r1"})
    assert config["env"] == {
        "PORT": "3000",
        "NODE_ENV": "production",
        "A": "1",
        "FLY_PROCESS_GROUP": "app",
        "PRIMARY_REGION": "ams",
    }
    assert config["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}
    assert config["metadata"] == {
        "fly_release_id": "r1",
        "fly_platform_version": "v2",
        "fly_process_group": "app",
    }
    (service,) = config["services"]
    assert service == {
        "protocol": "tcp",
        "internal_port": 3000,
        "ports": [
            {"port": 80, "handlers": ["http"], "force_https": True},
            {"port": 443, "handlers": ["http", "tls"]},
        ],
        "autostop": True,
        "autostart": True,
        "min_machines_running": 0,
        "concurrency": {"type": "requests", "soft_limit": 200, "hard_limit": 250},
        "checks": [
            {
                "type": "http",
                "method": "GET",
                "path": "/api/health",
                "grace_period": "10s",
                "interval": "15s",
                "timeout": "5s",
            }
        ],
    }


def test_machine_config_of_the_full_reference() -> None:
    text = reference_file("fly-toml-examples", "full-reference.toml").read_text()
    config = machine_config(text, image=IMAGE, metadata={})

    # The file's groups are web and task: sections without `processes` belong to the
    # default group (task, the first name), as flyctl flattens them; app gets its own.
    assert config["metadata"]["fly_process_group"] == "app"
    assert config["env"] == {"FOO": "BAR", "FLY_PROCESS_GROUP": "app", "PRIMARY_REGION": "sea"}
    # Two [[vm]] entries apply to the app group; the one naming it wins, as in flyctl.
    assert config["guest"] == {
        "cpu_kind": "performance",
        "cpus": 8,
        "memory_mb": 8192,
        "gpu_kind": "a100-pcie-40gb",
        "gpus": 2,
        "kernel_args": ["quiet"],
        "host_dedication_id": "isolated-xxx",
    }
    (other,) = config["services"]
    assert other["internal_port"] == 8081 and other["min_machines_running"] == 1
    assert [c["type"] for c in other["checks"]] == ["tcp", "http", "http"]
    assert "checks" not in config and "metrics" not in config and "mounts" not in config
    assert "restart" not in config  # [[restart]] only applies to the web group
    assert config["stop_config"] == {"signal": "SIGTERM", "timeout": "3s"}
    assert config["init"] == {
        "cmd": ["cmd"],
        "entrypoint": ["entrypoint"],
        "exec": ["exec"],
        "swap_size_mb": 512,
    }

    task = machine_config(text, image=IMAGE, metadata={}, process_group="task")
    (http,) = task["services"]
    assert http["internal_port"] == 8080 and http["autostop"] is False
    assert http["checks"][0]["headers"] == [{"name": "My-Custom-Header", "values": ["whatever"]}]
    assert http["ports"][1]["tls_options"]["versions"] == ["TLSv1.2", "TLSv1.3"]
    assert task["checks"]["status"]["port"] == 2020
    assert task["metrics"] == {"port": 9999, "path": "/metrics"}
    assert task["mounts"] == [{"name": "data", "path": "/data"}]
    assert task["init"]["cmd"] == ["task", "all", "day"]
    assert task["guest"] == {
        "cpu_kind": "shared",
        "cpus": 1,
        "memory_mb": 4096,
        "host_dedication_id": "06031957",
    }
    # raw_value is encoded as written (flyctl does not take it for base64).
    assert task["files"] == [
        {"guest_path": "/path/to/hello.txt", "raw_value": "YUdWc2JHOGdkMjl5YkdRSw=="},
        {"guest_path": "/path/to/secret.txt", "secret_name": "SUPER_SECRET"},
    ]
    assert (
        task["statics"]
        == config["statics"]
        == [
            {
                "guest_path": "/path/to/statics",
                "url_prefix": "/static-assets",
                "tigris_bucket": "example-bucket",
                "index_document": "index.html",
            }
        ]
    )

    # A local file is read from what the caller provides, and refused clearly without it.
    with pytest.raises(FlyTomlError, match=r"local_path '/local/path/config\.yaml'"):
        machine_config(text, image=IMAGE, metadata={}, process_group="web")
    web = machine_config(
        text,
        image=IMAGE,
        metadata={},
        process_group="web",
        local_files={"/local/path/config.yaml": b"a: 1\n"},
    )
    assert web["files"] == [{"guest_path": "/path/to/config.yaml", "raw_value": "YTogMQo="}]
    assert web["restart"] == {"policy": "always", "max_retries": 3}
    assert web["metrics"] == {"port": 9998, "path": "/metrics"}
    assert web["init"]["cmd"] == ["run", "web"]
    assert web["metadata"]["fly_process_group"] == "web"


def test_machine_config_of_old_formats() -> None:
    text = reference_file("fly-toml-examples", "old-format.toml").read_text()
    config = machine_config(text, image=IMAGE, metadata={})
    assert config["env"] == {"FOO": "STRING", "BAR": "123", "FLY_PROCESS_GROUP": "app"}
    (service,) = config["services"]
    assert service["internal_port"] == 8080
    assert service["ports"] == [{"port": 80, "handlers": ["http"]}]
    assert service["concurrency"] == {"type": "requests", "soft_limit": 12, "hard_limit": 23}
    assert service["autostop"] is False
    tcp1, tcp2, http1, http2 = service["checks"]
    assert (tcp1["interval"], tcp1["timeout"]) == ("10s", "2s")
    assert (tcp2["interval"], tcp2["timeout"]) == ("20s", "3s")
    assert http1["headers"] == [{"name": "origin", "values": ["http://localhost:8000"]}]
    assert "grace_period" not in http2
    assert {"name": "metoo", "values": ["true"]} in http2["headers"]

    env_list = reference_file("fly-toml-examples", "env-list.toml").read_text()
    assert machine_config(env_list, image=IMAGE, metadata={})["env"] == {
        "FOO": "BAR",
        "TWO": "2",
        "TRUE": "true",
        "FLY_PROCESS_GROUP": "app",
    }
    quirks = reference_file("fly-toml-examples", "format-quirks.toml").read_text()
    assert machine_config(quirks, image=IMAGE, metadata={})["guest"]["memory_mb"] == 512


@pytest.mark.parametrize(
    ("raw", "mb"),
    [("256mb", 256), ("1gb", 1024), ("8g", 8192), ("512", 512), (2048, 2048), ("1GiB", 1024)],
)
def test_parse_memory(raw: str | int, mb: int) -> None:
    assert flytoml.parse_memory_mb(raw) == mb


def test_sizes() -> None:
    config = machine_config('[[vm]]\nsize = "performance-2x"\n', image=IMAGE, metadata={})
    assert config["guest"] == {"cpu_kind": "performance", "cpus": 2, "memory_mb": 4096}
    with pytest.raises(FlyTomlError, match="size"):
        machine_config('[[vm]]\nsize = "huge"\n', image=IMAGE, metadata={})
    with pytest.raises(FlyTomlError, match="memory"):
        machine_config('[[vm]]\nmemory = "lots"\n', image=IMAGE, metadata={})


def test_autostop_modes() -> None:
    def autostop(value: str) -> Any:
        text = f"[http_service]\ninternal_port = 3000\nauto_stop_machines = {value}\n"
        return machine_config(text, image=IMAGE, metadata={})["services"][0]["autostop"]

    assert autostop('"stop"') is True
    assert autostop('"off"') is False
    assert autostop('"suspend"') == "suspend"
    assert autostop("true") is True
    with pytest.raises(FlyTomlError, match="auto_stop_machines"):
        autostop('"sometimes"')


def test_overlay_managed_keeps_unmanaged_fields() -> None:
    current = {
        "image": "registry.fly.io/app:old",
        "env": {"PORT": "3000", "GONE": "1"},
        "guest": {"cpu_kind": "shared", "cpus": 2, "memory_mb": 512},
        "services": [{"internal_port": 8080, "protocol": "tcp"}],
        "checks": {"old": {"type": "tcp", "port": 8080}},
        "restart": {"policy": "always"},
        "dns": {"skip_registration": True},
        "schedule": "daily",
        "mounts": [{"volume": "vol_1", "path": "/data"}],
        "init": {"entrypoint": ["/bin/sh"], "swap_size_mb": 64, "tty": True},
        "metadata": {"fly_release_id": "r1", "fly_platform_version": "v2", "owner": "me"},
    }
    snapshot = copy.deepcopy(current)
    new = machine_config(_render(NEW="1"), image=IMAGE, metadata={"turbodeploy_deployment": "d-2"})

    merged = overlay_managed(current, new)

    assert current == snapshot  # the input is not modified
    assert merged["image"] == IMAGE
    assert merged["env"] == new["env"] and "GONE" not in merged["env"]
    assert merged["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}
    assert merged["services"] == new["services"]
    assert "checks" not in merged  # fly.toml no longer defines top-level checks
    assert merged["restart"] == {"policy": "always"}
    assert merged["dns"] == {"skip_registration": True}
    assert merged["schedule"] == "daily"
    assert merged["mounts"] == [{"volume": "vol_1", "path": "/data"}]
    # fly.toml manages the command, entrypoint, exec and swap (as flyctl does); not the rest.
    assert merged["init"] == {"tty": True}
    assert merged["metadata"] == {
        "fly_release_id": "r1",
        "fly_platform_version": "v2",
        "owner": "me",
        "turbodeploy_deployment": "d-2",
        "fly_process_group": "app",
    }

    with_restart = overlay_managed(current, {**new, "restart": {"policy": "no"}})
    assert with_restart["restart"] == {"policy": "no"}
