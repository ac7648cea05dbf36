"""fly.toml against references we did not write: flyctl's own test data and expectations,
and SchemaStore's fly.toml schema (the one editors validate fly.toml with).

`tests/data/flyctl-appconfig/` is flyctl's `internal/appconfig/testdata` (Apache-2.0, see
its SOURCE.md); the expected machine configs below restate flyctl's
`internal/appconfig/machines_test.go` at the same commit, in the JSON form fly-go sends
(`omitempty` fields left out, autostop "stop"/"off" as true/false).
"""

from __future__ import annotations

import copy
import json
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from conftest import REFERENCE_DIR
from jsonschema import Draft7Validator

from core import flytoml
from core.flytoml import FlyTomlError, machine_config, overlay_managed, render_fly_toml

DATA = Path(__file__).parent / "data"
FLYCTL = DATA / "flyctl-appconfig"
ROOT = Path(__file__).resolve().parents[1]
APP = "turbobackend-p1"
IMAGE = "registry.fly.io/turbobackend-p1:deployment-1"
# flyctl refuses this one when loading it ("Unknown type for service concurrency").
REFUSED_BY_FLYCTL = {"always-invalid-v2.toml"}
# Groups flyctl's validation refuses (validation_test.go), with the reason it gives.
REFUSED_GROUPS = {
    ("validate-mounts.toml", "app"): "more than one \\[\\[mounts\\]\\]",
    ("validate-mounts.toml", "vpn"): "'15Mb' is smaller than 1GB",
    ("validate-mounts.toml", "foo"): "'unparseable' is not a size",
}
# Files fly.toml names for flyctl to read from the repository.
LOCAL_FILES = {"/local/path/config.yaml": b"key: value\n"}


def _flyctl_files() -> list[str]:
    return sorted(p.name for p in FLYCTL.glob("*.toml"))


def _accepted() -> list[str]:
    return [n for n in _flyctl_files() if n not in REFUSED_BY_FLYCTL]


def _read(name: str) -> str:
    return (FLYCTL / name).read_text()


def _render(existing: str | None) -> str:
    return render_fly_toml(app_name=APP, region="ams", env={"NEW_VAR": "x"}, existing=existing)


def _map(text: str, group: str = "app", **kwargs: Any) -> dict[str, Any]:
    return machine_config(text, image=IMAGE, metadata={}, process_group=group, **kwargs)


def _key_paths(value: Any, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        paths: set[str] = set()
        for key, sub in value.items():
            paths |= _key_paths(sub, f"{prefix}.{key}" if prefix else key)
        return paths
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return set().union(*(_key_paths(v, prefix) for v in value))
    return {prefix}


def _groups(text: str) -> list[str]:
    processes = flytoml.normalized(tomllib.loads(text)).get("processes") or {}
    return sorted({"app", *processes})


def test_the_copied_test_data_is_complete() -> None:
    # Everything of flyctl's testdata directory, with its licence and origin.
    assert len(_flyctl_files()) == 41
    assert "Apache License" in (FLYCTL / "LICENSE").read_text()
    assert "ad0172face303b77584eea95b46fa3ddc61d5ddd" in (FLYCTL / "SOURCE.md").read_text()


# ------------------------------------------------------- every file flyctl accepts


@pytest.mark.parametrize("name", _accepted())
def test_every_accepted_file_renders_merges_and_maps(name: str) -> None:
    original = _read(name)
    before = tomllib.loads(original)

    merged_text = _render(original)
    merged = tomllib.loads(merged_text)
    lost = {p for p in _key_paths(before) - _key_paths(merged) if not flytoml.is_managed_key(p)}
    assert not lost, f"unmanaged keys dropped from {name}: {sorted(lost)}"
    assert _render(merged_text) == merged_text

    for text in (original, merged_text):
        for group in _groups(text):
            refused = REFUSED_GROUPS.get((name, group))
            if refused:
                with pytest.raises(FlyTomlError, match=refused):
                    _map(text, group, local_files=LOCAL_FILES)
                continue
            config = _map(text, group, local_files=LOCAL_FILES)
            assert config["metadata"]["fly_process_group"] == group
            assert config["env"]["FLY_PROCESS_GROUP"] == group
            assert all(isinstance(v, str) for v in config["env"].values())
    if (name, "app") in REFUSED_GROUPS:
        return
    # What the deploy runs is the rendered file's app group.
    config = _map(merged_text, local_files=LOCAL_FILES)
    assert config["env"]["PRIMARY_REGION"] == "ams"
    assert config["env"]["NEW_VAR"] == "x"


def test_the_file_flyctl_refuses_is_refused() -> None:
    with pytest.raises(FlyTomlError, match="concurrency"):
        _map(_read("always-invalid-v2.toml"))


# ---------------------------------------------- the configs flyctl's tests expect

FLYCTL_TOMACHINE = {
    "env": {"FOO": "BAR", "PRIMARY_REGION": "mia", "FLY_PROCESS_GROUP": "app"},
    "services": [
        {
            "protocol": "tcp",
            "internal_port": 8080,
            "ports": [
                {"port": 80, "handlers": ["http"], "force_https": True},
                {"port": 443, "handlers": ["http", "tls"]},
            ],
        }
    ],
    "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"},
    "metrics": {"port": 9999, "path": "/metrics"},
    "statics": [
        {
            "guest_path": "/guest/path",
            "url_prefix": "/url/prefix",
            "tigris_bucket": "example-bucket",
            "index_document": "index.html",
        }
    ],
    "mounts": [{"name": "data", "path": "/data"}],
    "checks": {
        "listening": {"port": 8080, "type": "tcp"},
        "status": {
            "port": 8080,
            "type": "http",
            "interval": "10s",
            "timeout": "1s",
            "path": "/status",
        },
    },
    "stop_config": {"timeout": "10s", "signal": "SIGTERM"},
    "init": {"swap_size_mb": 512},
    "restart": {"policy": "always"},
    "dns": {"nameservers": ["1.2.3.4"]},
}


def _without_image(config: dict[str, Any]) -> dict[str, Any]:
    # flyctl's ToMachineConfig leaves the image to the deploy; ours takes it as an argument.
    assert config.pop("image") == IMAGE
    return config


def test_to_machine_config() -> None:  # TestToMachineConfig
    text = _read("tomachine.toml")
    assert _without_image(_map(text)) == FLYCTL_TOMACHINE

    # Updating a machine: fly.toml's sections replace the machine's, the rest survives.
    current = {
        "image": "old",
        "guest": {"cpus": 3},
        "schedule": "24/7",
        "auto_destroy": True,
        "restart": {"policy": "always"},
        "dns": {"skip_registration": True},
        "env": {"removed": "by-update"},
        "mounts": [{"name": "removed", "path": "/by/update"}],
        "metadata": {"retain": "propagated"},
        "init": {"cmd": ["removed", "by", "update"]},
    }
    got = overlay_managed(current, _map(text))
    assert got["env"] == FLYCTL_TOMACHINE["env"]
    assert got["services"] == FLYCTL_TOMACHINE["services"]
    assert got["checks"] == FLYCTL_TOMACHINE["checks"]
    assert got["mounts"] == FLYCTL_TOMACHINE["mounts"]
    assert got["guest"] == {"cpus": 3}
    assert got["schedule"] == "24/7"
    assert got["auto_destroy"] is True
    assert got["restart"] == {"policy": "always"}
    assert got["dns"] == {"skip_registration": True, "nameservers": ["1.2.3.4"]}
    assert got["metadata"]["retain"] == "propagated"
    assert not got["init"].get("cmd")


def test_to_machine_config_experimental() -> None:  # TestToMachineConfig_Experimental
    text = _read("tomachine-experimental.toml")
    assert _map(text)["init"] == {
        "cmd": ["/call", "me"],
        "entrypoint": ["/IgoFirst"],
        "exec": ["ignore", "others"],
    }
    overridden = text + '\n[processes]\napp = "/override experimental"\n'
    assert _map(overridden)["init"] == {
        "cmd": ["/override", "experimental"],
        "entrypoint": ["/IgoFirst"],
        "exec": ["ignore", "others"],
    }


def test_to_machine_config_nullifies_managed_fields() -> None:
    # TestToMachineConfig_nullifyManagedFields: an empty fly.toml clears what it manages.
    current = {
        "image": "old",
        "env": {"FOO": "BAR", "PRIMARY_REGION": "mia"},
        "services": FLYCTL_TOMACHINE["services"],
        "checks": FLYCTL_TOMACHINE["checks"],
        "statics": FLYCTL_TOMACHINE["statics"],
        "metrics": {"port": 9999, "path": "/metrics"},
        "mounts": [{"name": "data", "path": "/data", "volume": "vol_1"}],
    }
    got = overlay_managed(current, _map(""))
    assert got["env"] == {"FLY_PROCESS_GROUP": "app"}
    assert not got.get("services") and not got.get("checks") and not got.get("statics")
    # Where this deploy differs from flyctl, on purpose: a volume is never detached by a
    # deploy, and metrics set on the machine by hand stay until fly.toml sets its own.
    assert got["mounts"] == current["mounts"]
    assert got["metrics"] == current["metrics"]


@pytest.mark.parametrize(
    ("group", "init", "services", "checks"),
    [
        (
            "app",
            {"cmd": ["run-nginx"]},
            [
                {
                    "protocol": "tcp",
                    "internal_port": 8080,
                    "ports": [
                        {"port": 80, "handlers": ["http"]},
                        {"port": 443, "handlers": ["http", "tls"]},
                    ],
                },
                {"protocol": "tcp", "internal_port": 1111},
            ],
            {"listening": {"port": 8080, "type": "tcp"}},
        ),
        (
            "vpn",
            {"cmd": ["run-tailscale"]},
            [
                {"protocol": "udp", "internal_port": 9999},
                {"protocol": "tcp", "internal_port": 1111},
            ],
            None,
        ),
        (
            "foo",
            {"cmd": ["keep", "me", "alive"]},
            [{"protocol": "tcp", "internal_port": 1111}],
            {"listening": {"port": 8080, "type": "tcp"}},
        ),
    ],
)
def test_to_machine_config_process_groups(
    group: str, init: dict[str, Any], services: list[Any], checks: dict[str, Any] | None
) -> None:  # TestToMachineConfig_multiProcessGroups
    got = _map(_read("tomachine-processgroups.toml"), group)
    assert got["metadata"]["fly_process_group"] == group
    assert got["init"] == init
    assert got["services"] == services
    assert got.get("checks") == checks


def test_default_fly_toml_for_new_apps() -> None:  # TestToMachineConfig_defaultV2flytoml
    text = _read("tomachine-default-for-new-apps.toml")
    assert _without_image(_map(text)) == {
        "env": {"PRIMARY_REGION": "ord", "FLY_PROCESS_GROUP": "app"},
        "services": [
            {
                "protocol": "tcp",
                "internal_port": 8080,
                "ports": [
                    {"port": 80, "handlers": ["http"], "force_https": True},
                    {"port": 443, "handlers": ["http", "tls"]},
                ],
            }
        ],
        "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"},
        "checks": {
            "alive": {
                "port": 8080,
                "type": "tcp",
                "interval": "15s",
                "timeout": "2s",
                "grace_period": "5s",
            }
        },
    }
    # A top-level check without a port needs an http_service to take it from.
    without_http = text.replace("[http_service]", "[unused]")
    with pytest.raises(FlyTomlError, match="has no port set"):
        _map(without_http)
    # Rendered, the check takes our http_service's port.
    assert _map(_render(text))["checks"]["alive"]["port"] == flytoml.INTERNAL_PORT


@pytest.mark.parametrize(
    ("group", "mounts"),
    [
        ("app", [{"name": "data", "path": "/data"}]),
        ("back", [{"name": "trash", "path": "/trash"}]),
        ("hola", None),
    ],
)
def test_mounts_of_process_groups(group: str, mounts: list[Any] | None) -> None:
    # TestToReleaseMachineConfig_processGroupsAndMounts
    assert _map(_read("tomachine-mounts.toml"), group).get("mounts") == mounts


def test_services() -> None:  # TestToMachineConfig_services
    assert _map(_read("tomachine-services.toml"))["services"] == [
        {
            "protocol": "tcp",
            "internal_port": 8080,
            "autostart": True,
            "autostop": True,
            "ports": [
                {"port": 80, "handlers": ["http"], "force_https": True},
                {"port": 443, "handlers": ["http", "tls"]},
            ],
        },
        {"protocol": "tcp", "internal_port": 1000, "autostart": True, "autostop": True},
        {"protocol": "tcp", "internal_port": 1001, "autostart": False, "autostop": False},
        {"protocol": "tcp", "internal_port": 1002, "autostart": False},
        {"protocol": "tcp", "internal_port": 1003, "autostop": True},
        {"protocol": "tcp", "internal_port": 1004},
    ]


@pytest.mark.parametrize(
    ("name", "group", "guest"),
    [
        # TestToMachineConfig_compute
        ("tomachine-compute.toml", "app", {"cpu_kind": "shared", "cpus": 2, "memory_mb": 512}),
        ("tomachine-compute.toml", "worker", {"cpu_kind": "shared", "cpus": 2, "memory_mb": 512}),
        (
            "tomachine-compute.toml",
            "whisper",
            {
                "cpu_kind": "performance",
                "cpus": 8,
                "memory_mb": 65536,
                "gpu_kind": "a100-pcie-40gb",
            },
        ),
        (
            "tomachine-compute.toml",
            "isolated",
            {
                "cpu_kind": "shared",
                "cpus": 1,
                "memory_mb": 256,
                "host_dedication_id": "lookma-iamsolo",
            },
        ),
        # TestToMachineConfig_compute_none
        ("tomachine-compute-nodefault.toml", "app", None),
        ("tomachine-compute-nodefault.toml", "woo", None),
        (
            "tomachine-compute-nodefault.toml",
            "bar",
            {"cpu_kind": "performance", "cpus": 4, "memory_mb": 8192},
        ),
        # TestToMachineConfig_hostdedicationid
        ("tomachine-hostdedicationid.toml", "front", None),
        (
            "tomachine-hostdedicationid.toml",
            "back",
            {
                "cpu_kind": "shared",
                "cpus": 1,
                "memory_mb": 256,
                "host_dedication_id": "specific",
            },
        ),
        (
            "tomachine-hostdedicationid.toml",
            "other",
            {
                "cpu_kind": "shared",
                "cpus": 4,
                "memory_mb": 1024,
                "host_dedication_id": "toplevel",
            },
        ),
    ],
)
def test_guests(name: str, group: str, guest: dict[str, Any] | None) -> None:
    assert _map(_read(name), group).get("guest") == guest


def test_compute_alias_is_managed_when_rendered() -> None:
    # [[compute]] applying to the app group gets our size where it is written.
    text = '[[compute]]\nsize = "performance-2x"\nmemory_mb = 8192\n'
    merged = tomllib.loads(_render(text))
    assert merged["compute"] == [{"size": "shared-cpu-1x", "memory": "256mb"}]
    assert "vm" not in merged
    assert _map(_render(text))["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256}


def test_durations_as_go_writes_them() -> None:
    text = (
        "kill_timeout = 120\n[http_service]\ninternal_port = 8080\n"
        '[[http_service.checks]]\ninterval = 90000\ntimeout = "1500ms"\ngrace_period = "90s"\n'
    )
    config = _map(text)
    assert config["stop_config"] == {"timeout": "2m0s"}
    assert config["services"][0]["checks"] == [
        {"type": "http", "interval": "1m30s", "timeout": "1.5s", "grace_period": "1m30s"}
    ]


# ---------------------------------------------------------- SchemaStore's fly.json


@cache
def _schema() -> Draft7Validator:
    return Draft7Validator(json.loads((DATA / "fly.schema.json").read_text()))


def _schema_errors(text: str) -> set[tuple[Any, ...]]:
    return {tuple(e.absolute_path) for e in _schema().iter_errors(tomllib.loads(text))}


def _schema_examples() -> list[Path]:
    paths = sorted(FLYCTL.glob("*.toml"))
    paths += sorted((REFERENCE_DIR / "fly-toml-examples").glob("*.toml"))
    paths += sorted((ROOT / "examples").rglob("fly.toml"))
    return paths


@pytest.mark.parametrize("path", _schema_examples(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_rendered_file_validates_whenever_its_input_did(path: Path) -> None:
    original = path.read_text()
    before = _schema_errors(original)
    after = _schema_errors(_render(original))
    # No new errors; an input the schema accepts gives an output it accepts.
    assert after <= before, f"{path.name}: new schema errors at {sorted(after - before)}"


def test_rendered_from_scratch_validates() -> None:
    assert _schema_errors(_render(None)) == set()


def test_env_values_are_written_as_strings() -> None:
    text = '[env]\nWORKERS = 4\nDEBUG = true\nRATIO = 0.5\nNAME = "x"\n'
    assert _schema_errors(text) == {("env", "WORKERS"), ("env", "DEBUG"), ("env", "RATIO")}
    rendered = _render(text)
    assert tomllib.loads(rendered)["env"] == {
        "PORT": "3000",
        "NODE_ENV": "production",
        "WORKERS": "4",
        "DEBUG": "true",
        "RATIO": "0.5",
        "NAME": "x",
        "NEW_VAR": "x",
    }
    assert _schema_errors(rendered) == set()


def test_the_schema_catches_what_it_should() -> None:
    # The validator is live: a wrong type where the schema is strict is reported.
    doc = tomllib.loads(_render(None))
    broken = copy.deepcopy(doc)
    broken["http_service"]["internal_port"] = "3000"
    assert list(_schema().iter_errors(broken))
