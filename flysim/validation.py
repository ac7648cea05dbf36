"""The cheap checks the platform makes on names and machine configs before accepting them."""

from __future__ import annotations

import re
from typing import Any

APP_NAME_RE = re.compile(r"^[a-z0-9-]{1,63}$")
REGION_RE = re.compile(r"^[a-z]{3}$")
_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$")
_CPU_KINDS = frozenset({"shared", "performance"})
_RESTART_POLICIES = frozenset({"no", "always", "on-failure"})
_AUTOSTOP_VALUES = (True, False, "off", "stop", "suspend")


class ConfigError(ValueError):
    """A machine config the platform would refuse (HTTP 422)."""


def app_name_error(name: object) -> str | None:
    if not isinstance(name, str) or not APP_NAME_RE.match(name):
        return (
            "Validation failed: Name may only contain lowercase letters, numbers and dashes, "
            "and be at most 63 characters"
        )
    return None


def check_machine_config(config: object) -> dict[str, Any]:
    """Return the config when it is acceptable, else raise `ConfigError` saying why."""
    if not isinstance(config, dict):
        raise ConfigError("config is required and must be an object")
    image = config.get("image")
    if not isinstance(image, str) or not image.strip():
        raise ConfigError("config.image is required")
    _check_guest(config.get("guest"))
    _check_string_map(config, "env")
    _check_string_map(config, "metadata")
    services = config.get("services")
    if services is not None:
        if not isinstance(services, list):
            raise ConfigError("config.services must be a list")
        for index, service in enumerate(services):
            _check_service(index, service)
    checks = config.get("checks")
    if checks is not None:
        if not isinstance(checks, dict):
            raise ConfigError("config.checks must be an object of named checks")
        for name, check in checks.items():
            _check_check(f"config.checks.{name}", check)
    restart = config.get("restart")
    if isinstance(restart, dict) and restart.get("policy") not in (None, *_RESTART_POLICIES):
        raise ConfigError(f"config.restart.policy must be one of {sorted(_RESTART_POLICIES)}")
    return config


def _check_guest(guest: object) -> None:
    if guest is None:
        return
    if not isinstance(guest, dict):
        raise ConfigError("config.guest must be an object")
    memory = guest.get("memory_mb")
    if memory is not None and (
        not isinstance(memory, int) or isinstance(memory, bool) or memory <= 0 or memory % 256
    ):
        raise ConfigError(
            f"invalid config.guest.memory_mb {memory!r}: memory must be a multiple of 256 MB"
        )
    cpus = guest.get("cpus")
    if cpus is not None and (not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1):
        raise ConfigError(f"invalid config.guest.cpus {cpus!r}: must be a positive integer")
    kind = guest.get("cpu_kind")
    if kind is not None and kind not in _CPU_KINDS:
        raise ConfigError(f"invalid config.guest.cpu_kind {kind!r}: use shared or performance")


def _check_string_map(config: dict[str, Any], key: str) -> None:
    value = config.get(key)
    if value is None:
        return
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"config.{key} must be an object of string values")


def _check_port(where: str, port: object) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"{where} must be a port number between 1 and 65535, got {port!r}")


def _check_service(index: int, service: object) -> None:
    where = f"config.services[{index}]"
    if not isinstance(service, dict):
        raise ConfigError(f"{where} must be an object")
    _check_port(f"{where}.internal_port", service.get("internal_port"))
    protocol = service.get("protocol", "tcp")
    if protocol not in ("tcp", "udp"):
        raise ConfigError(f"{where}.protocol must be tcp or udp")
    for p_index, port in enumerate(service.get("ports") or []):
        if not isinstance(port, dict):
            raise ConfigError(f"{where}.ports[{p_index}] must be an object")
        if "port" in port:
            _check_port(f"{where}.ports[{p_index}].port", port["port"])
    if service.get("autostop", False) not in _AUTOSTOP_VALUES:
        raise ConfigError(f"{where}.autostop must be a boolean, 'off', 'stop' or 'suspend'")
    if not isinstance(service.get("autostart", False), bool):
        raise ConfigError(f"{where}.autostart must be a boolean")
    for c_index, check in enumerate(service.get("checks") or []):
        _check_check(f"{where}.checks[{c_index}]", check)


def _check_check(where: str, check: object) -> None:
    if not isinstance(check, dict):
        raise ConfigError(f"{where} must be an object")
    for key in ("grace_period", "interval", "timeout"):
        value = check.get(key)
        if value is None or (isinstance(value, int) and not isinstance(value, bool)):
            continue  # numbers are nanoseconds
        if not isinstance(value, str) or not (_DURATION_RE.match(value) or value == "0"):
            raise ConfigError(f"{where}.{key} must be a duration such as '10s', got {value!r}")
    if "port" in check:
        _check_port(f"{where}.port", check["port"])
