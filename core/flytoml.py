"""fly.toml: render ours, merge it into the user's, and map it to a Machines API config.

Pure functions without I/O: the activities read and write the files, the Fly client sends the
configs. The mapping follows what `flyctl deploy` does for a single process group.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from fnmatch import fnmatchcase
from typing import Any, Final

import tomli_w


class FlyTomlError(ValueError):
    """A fly.toml that cannot be parsed, or holds values that cannot be deployed."""


APP_PROCESS_GROUP: Final = "app"
INTERNAL_PORT: Final = 3000
HEALTH_PATH: Final = "/api/health"

_HEALTH_CHECK: Final[Mapping[str, str]] = {
    "method": "GET",
    "path": HEALTH_PATH,
    # A cold start of a Nitro server takes a second or two; 10 s leaves room for a slow
    # image pull without failing a healthy first boot.
    "grace_period": "10s",
    "interval": "15s",
    "timeout": "5s",
}
# Counted in requests rather than connections so idle keep-alive connections from the proxy
# do not count against a machine. A Node process on 256 MB serves a few hundred light
# concurrent requests; past the soft limit the proxy prefers (and auto-starts) another
# machine, and the hard limit sits just above so a burst queues at the proxy instead of
# pushing one small machine into garbage-collection thrash or out of memory.
_CONCURRENCY: Final[Mapping[str, Any]] = {"type": "requests", "soft_limit": 200, "hard_limit": 250}
_VM: Final[Mapping[str, str]] = {"size": "shared-cpu-1x", "memory": "256mb"}
# flyctl applies these after `size` and `memory`, so they would silently win over ours.
_VM_OVERRIDING_KEYS: Final = ("cpu_kind", "cpus", "memory_mb")
_EXPERIMENTAL_INVALID: Final = ("auto_stop_machines", "auto_start_machines", "min_machines_running")

MANAGED_KEYS: Final[Mapping[str, str]] = {
    # Dotted key paths (array indices left out, `*` matches any name) and what a deploy
    # writes there. Every other key of an existing fly.toml is kept as it is.
    "app": "the Fly app name, turbobackend-<project id>",
    "primary_region": "the region of the deploy request",
    "env.PORT": '"3000"',
    "env.NODE_ENV": '"production"',
    "env.*": "each variable of the deploy request (the file's other variables are kept)",
    "http_service.internal_port": "3000",
    "http_service.force_https": "true",
    "http_service.auto_stop_machines": '"stop"',
    "http_service.auto_start_machines": "true",
    "http_service.min_machines_running": "0",
    "http_service.processes": '["app"]',
    "http_service.concurrency": '{type = "requests", soft_limit = 200, hard_limit = 250}',
    "http_service.checks": (
        "a GET /api/health check (grace_period 10s, interval 15s, timeout 5s), first; "
        "the file's checks on other paths are kept"
    ),
    "vm.size": '"shared-cpu-1x", on every [[vm]] that applies to the app process group',
    "vm.memory": '"256mb", on the same [[vm]] entries',
    "vm.cpu_kind": "removed from those entries: flyctl lets it override size",
    "vm.cpus": "removed from those entries: flyctl lets it override size",
    "vm.memory_mb": "removed from those entries: flyctl lets it override memory",
    "experimental.auto_stop_machines": "removed: not a valid key, flyctl ignores it",
    "experimental.auto_start_machines": "removed: not a valid key, flyctl ignores it",
    "experimental.min_machines_running": "removed: not a valid key, flyctl ignores it",
    "experimental": "removed when the removals above leave it empty",
    "services": (
        "an entry on the http_service's internal port (old or new) is removed: it would be a "
        "second service without autostop; other entries are kept"
    ),
    "services.auto_stop_machines": 'legacy booleans become "stop" (true) or "off" (false)',
}

_HEADER: Final = (
    "# Fly.io configuration of this app. Rewritten on every deploy: the deploy's own keys\n"
    "# are overwritten, all other keys are kept (comments are not).\n\n"
)


def is_managed_key(path: str) -> bool:
    """Whether a dotted key path (without array indices) is one of MANAGED_KEYS."""
    return any(fnmatchcase(path, k) or fnmatchcase(path, f"{k}.*") for k in MANAGED_KEYS)


# ---------------------------------------------------------------------------- rendering


def render_fly_toml(
    *, app_name: str, region: str, env: Mapping[str, str], existing: str | None = None
) -> str:
    """The fly.toml to commit: ours, merged into `existing` when the repository has one.

    Deterministic: rendering an already rendered file again gives the same bytes, so a
    deploy that changes nothing commits nothing. Variables of an earlier request stay in
    `[env]` (they cannot be told apart from the user's own).
    """
    doc = _parse(existing) if existing is not None else {}
    old_http = _table(doc, "http_service")
    old_port = _int_or_none(old_http.get("internal_port")) if old_http else None

    out: dict[str, Any] = {"app": app_name, "primary_region": region}
    out["env"] = _merged_env(doc.get("env"), env)
    out["http_service"] = _merged_http_service(old_http)
    services = _merged_services(doc.get("services"), {INTERNAL_PORT, old_port})
    if services is not None:
        out["services"] = services
    out["vm"] = _merged_vm(doc.get("vm"))
    experimental = _merged_experimental(doc.get("experimental"))

    for key, value in doc.items():
        if key in out or key == "experimental":
            continue
        out[key] = value
    if experimental is not None:
        out["experimental"] = experimental
    return _HEADER + _dumps(_ordered_top(out))


def _ordered_top(doc: dict[str, Any]) -> dict[str, Any]:
    # Managed sections go first in a fixed order, the user's keep theirs: a re-render
    # reads this order back and reproduces it.
    first = ("app", "primary_region", "build", "deploy", "env", "http_service", "services", "vm")
    ordered = {k: doc[k] for k in first if k in doc}
    ordered.update((k, v) for k, v in doc.items() if k not in ordered)
    return ordered


def _merged_env(raw: Any, request_env: Mapping[str, str]) -> dict[str, Any]:
    existing = _env_table(raw)
    env: dict[str, Any] = {"PORT": str(INTERNAL_PORT), "NODE_ENV": "production"}
    for name, value in existing.items():
        if name not in env:
            env[name] = request_env.get(name, value)
    for name in sorted(request_env):
        if name not in env:
            env[name] = request_env[name]
    return env


def _env_table(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return dict(raw)
    # flyctl accepts `[[env]]` and merges the entries in order.
    if isinstance(raw, list) and all(isinstance(e, dict) for e in raw):
        merged: dict[str, Any] = {}
        for entry in raw:
            merged.update(entry)
        return merged
    raise FlyTomlError("fly.toml: [env] must be a table of variables")


def _merged_http_service(old: dict[str, Any] | None) -> dict[str, Any]:
    svc: dict[str, Any] = {
        "internal_port": INTERNAL_PORT,
        "force_https": True,
        "auto_stop_machines": "stop",
        "auto_start_machines": True,
        "min_machines_running": 0,
        "processes": [APP_PROCESS_GROUP],
        "concurrency": dict(_CONCURRENCY),
    }
    old = old or {}
    checks: list[dict[str, Any]] = [dict(_HEALTH_CHECK)]
    for check in _list_of_tables(old.get("checks"), "http_service.checks"):
        if _check_target(check) != _check_target(_HEALTH_CHECK):
            checks.append(check)
    svc["checks"] = checks
    for key, value in old.items():
        if key not in svc:
            svc[key] = value
    return svc


def _check_target(check: Mapping[str, Any]) -> tuple[str, str]:
    return str(check.get("method", "GET")).upper(), str(check.get("path", "/"))


def _merged_services(raw: Any, http_ports: set[int | None]) -> list[dict[str, Any]] | None:
    if raw is None:
        return None
    kept = []
    for entry in _list_of_tables(raw, "services"):
        if _int_or_none(entry.get("internal_port")) in http_ports:
            continue
        entry = dict(entry)
        stop = entry.get("auto_stop_machines")
        if isinstance(stop, bool):
            entry["auto_stop_machines"] = "stop" if stop else "off"
        kept.append(entry)
    return kept


def _merged_vm(raw: Any) -> list[dict[str, Any]]:
    entries = [dict(e) for e in _list_of_tables(raw, "vm")]
    applying = [e for e in entries if _applies(e, APP_PROCESS_GROUP)]
    if not applying:
        new: dict[str, Any] = dict(_VM)
        if entries:
            new["processes"] = [APP_PROCESS_GROUP]
        return [new, *entries]
    for entry in applying:
        for key in _VM_OVERRIDING_KEYS:
            entry.pop(key, None)
        rest = {k: v for k, v in entry.items() if k not in _VM}
        entry.clear()
        entry.update(_VM)
        entry.update(rest)
    return entries


def _merged_experimental(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise FlyTomlError("fly.toml: [experimental] must be a table")
    kept = {k: v for k, v in raw.items() if k not in _EXPERIMENTAL_INVALID}
    return kept or None


# ------------------------------------------------------------------------- TOML writing


def _dumps(doc: Mapping[str, Any]) -> str:
    lines: list[str] = []
    _emit_table(doc, (), lines, array_item=False)
    return "\n".join(lines).strip("\n") + "\n"


def _emit_table(
    table: Mapping[str, Any], path: tuple[str, ...], lines: list[str], *, array_item: bool
) -> None:
    # tomli_w writes arrays of tables inline; fly.toml readers expect `[[vm]]` sections.
    literals = [(k, v) for k, v in table.items() if not isinstance(v, dict) and not _is_aot(v)]
    tables = [(k, v) for k, v in table.items() if isinstance(v, dict) or _is_aot(v)]
    name = ".".join(_key(p) for p in path)
    if path and (array_item or literals or not tables):
        lines.append("")
        lines.append(f"[[{name}]]" if array_item else f"[{name}]")
    lines.extend(f"{_key(k)} = {_literal(v)}" for k, v in literals)
    for key, value in tables:
        if isinstance(value, dict):
            _emit_table(value, (*path, key), lines, array_item=False)
        else:
            for item in value:
                _emit_table(item, (*path, key), lines, array_item=True)


def _is_aot(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(key: str) -> str:
    return key if _BARE_KEY_RE.match(key) else _literal(key)


def _literal(value: Any) -> str:
    if isinstance(value, list) and not any(isinstance(v, dict | list) for v in value):
        one_line = "[" + ", ".join(_literal(v) for v in value) + "]"
        if len(one_line) <= 80:
            return one_line
    rendered = tomli_w.dumps({"v": value})
    return rendered[len("v = ") :].rstrip("\n")


# ------------------------------------------------------------------- machine config


def machine_config(
    fly_toml: str,
    *,
    image: str,
    metadata: Mapping[str, str],
    process_group: str = APP_PROCESS_GROUP,
) -> dict[str, Any]:
    """The Machines API `config` for one machine of `process_group`, as flyctl builds it.

    Build-time (`[build]`) and orchestration (`[deploy]`) settings have no place in it;
    `[mounts]` need volume ids and are attached by whoever creates the machine.
    """
    if not image:
        raise FlyTomlError("an image is required for a machine config")
    doc = _parse(fly_toml)
    config: dict[str, Any] = {"image": image}

    env = {k: _scalar_str(v) for k, v in _env_table(doc.get("env")).items()}
    if env:
        config["env"] = env
    guest = _guest(doc.get("vm"), process_group)
    if guest:
        config["guest"] = guest
    init = _init(doc, process_group)
    if init:
        config["init"] = init

    services = []
    http = _table(doc, "http_service")
    if http and _applies(http, process_group):
        services.append(_http_service(http))
    for svc in _list_of_tables(doc.get("services"), "services"):
        if _applies(svc, process_group):
            services.append(_service(svc))
    if services:
        config["services"] = services

    checks = _top_level_checks(doc.get("checks"), process_group)
    if checks:
        config["checks"] = checks
    metrics = _first_applying(doc.get("metrics"), "metrics", process_group)
    if metrics is not None and "port" in metrics:
        config["metrics"] = {"port": _int(metrics["port"], "metrics.port")}
        config["metrics"]["path"] = str(metrics.get("path", "/metrics"))
    restart = _first_applying(doc.get("restart"), "restart", process_group)
    if restart is not None:
        config["restart"] = _restart(restart)
    stop = _stop_config(doc)
    if stop:
        config["stop_config"] = stop

    meta: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise FlyTomlError(f"machine metadata {key!r} must be a string")
        meta[key] = value
    meta["fly_platform_version"] = "v2"
    meta["fly_process_group"] = process_group
    config["metadata"] = meta
    return config


# Always taken from fly.toml: dropped from the machine when fly.toml no longer sets them.
_REPLACED: Final = ("image", "env", "guest", "services", "checks")
# Taken from fly.toml when it sets them, otherwise left as the machine has them.
_OVERLAID_WHEN_SET: Final = ("metrics", "restart", "stop_config")


def overlay_managed(current: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A machine's next config: its current one with what fly.toml manages replaced.

    An update replaces the whole config, so fields fly.toml does not manage (`dns`,
    `schedule`, `mounts`, `files`, other metadata, ...) must be carried over.
    """
    merged = copy.deepcopy(dict(current))
    for key in _REPLACED:
        if key in new:
            merged[key] = copy.deepcopy(new[key])
        else:
            merged.pop(key, None)
    for key in _OVERLAID_WHEN_SET:
        if key in new:
            merged[key] = copy.deepcopy(new[key])
    if "init" in new:
        merged["init"] = {**(merged.get("init") or {}), **copy.deepcopy(new["init"])}
    merged["metadata"] = {**(merged.get("metadata") or {}), **dict(new.get("metadata") or {})}
    return merged


_SIZE_RE = re.compile(r"^(shared-cpu|performance)-(\d+)x$")
_MEMORY_PER_CPU = {"shared": 256, "performance": 2048}


def _guest(raw: Any, group: str) -> dict[str, Any] | None:
    entries = [e for e in _list_of_tables(raw, "vm") if _applies(e, group)]
    if not entries:
        return None
    vm: dict[str, Any] = {}
    for entry in entries:  # flyctl merges the entries of a group in order
        vm.update({k: v for k, v in entry.items() if k != "processes"})
    size = str(vm.get("size") or _VM["size"])
    match = _SIZE_RE.match(size)
    if not match:
        raise FlyTomlError(
            f"fly.toml: [[vm]] size {size!r} is not supported; use shared-cpu-<n>x or "
            "performance-<n>x"
        )
    cpu_kind = "shared" if match.group(1) == "shared-cpu" else "performance"
    cpus = int(match.group(2))
    guest: dict[str, Any] = {
        "cpu_kind": cpu_kind,
        "cpus": cpus,
        "memory_mb": cpus * _MEMORY_PER_CPU[cpu_kind],
    }
    if vm.get("memory") not in (None, "", 0):
        guest["memory_mb"] = parse_memory_mb(vm["memory"])
    if vm.get("cpu_kind"):
        guest["cpu_kind"] = str(vm["cpu_kind"])
    if vm.get("cpus"):
        guest["cpus"] = _int(vm["cpus"], "vm.cpus")
    if vm.get("memory_mb"):
        guest["memory_mb"] = _int(vm["memory_mb"], "vm.memory_mb")
    if vm.get("gpu_kind"):
        guest["gpu_kind"] = str(vm["gpu_kind"])
    if vm.get("gpus"):
        guest["gpus"] = _int(vm["gpus"], "vm.gpus")
    if vm.get("kernel_args"):
        guest["kernel_args"] = [str(a) for a in vm["kernel_args"]]
    if vm.get("host_dedication_id"):
        guest["host_dedication_id"] = str(vm["host_dedication_id"])
    return guest


_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEMORY_FACTOR = {"": 1.0, "k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0 * 1024}


def parse_memory_mb(value: Any) -> int:
    """fly.toml memory (`"256mb"`, `"1gb"`, `"8g"`, `512`) in MiB; plain numbers are MiB."""
    if isinstance(value, bool):
        raise FlyTomlError(f"fly.toml: memory {value!r} is not a size")
    if isinstance(value, int):
        mb = value
    else:
        match = _MEMORY_RE.match(str(value))
        if not match:
            raise FlyTomlError(f"fly.toml: memory {value!r} is not a size like '256mb' or '1gb'")
        mb = round(float(match.group(1)) * _MEMORY_FACTOR[match.group(2).lower()])
    if mb <= 0:
        raise FlyTomlError(f"fly.toml: memory {value!r} must be positive")
    return mb


def _http_service(http: Mapping[str, Any]) -> dict[str, Any]:
    port = _int(http.get("internal_port", 8080), "http_service.internal_port")
    plain: dict[str, Any] = {"port": 80, "handlers": ["http"]}
    tls: dict[str, Any] = {"port": 443, "handlers": ["tls", "http"]}
    if http.get("force_https"):
        plain["force_https"] = True
    if isinstance(http.get("http_options"), dict):
        plain["http_options"] = copy.deepcopy(http["http_options"])
        tls["http_options"] = copy.deepcopy(http["http_options"])
    if isinstance(http.get("tls_options"), dict):
        tls["tls_options"] = copy.deepcopy(http["tls_options"])
    svc: dict[str, Any] = {"protocol": "tcp", "internal_port": port, "ports": [plain, tls]}
    _autoscaling(http, svc, "http_service")
    checks = [
        _check(c, kind="http", port=port, where="http_service.checks")
        for c in _list_of_tables(http.get("checks"), "http_service.checks")
    ]
    if checks:
        svc["checks"] = checks
    return svc


def _service(raw: Mapping[str, Any]) -> dict[str, Any]:
    port = _int(raw.get("internal_port"), "services.internal_port")
    svc: dict[str, Any] = {"protocol": str(raw.get("protocol", "tcp")), "internal_port": port}
    ports = []
    for p in _list_of_tables(raw.get("ports"), "services.ports"):
        out: dict[str, Any] = {}
        for key in ("port", "start_port", "end_port"):
            if key in p:
                out[key] = _int(p[key], f"services.ports.{key}")
        if "handlers" in p:
            out["handlers"] = [str(h) for h in p["handlers"]]
        if "force_https" in p:
            out["force_https"] = bool(p["force_https"])
        for key in ("http_options", "tls_options", "proxy_proto_options"):
            if isinstance(p.get(key), dict):
                out[key] = copy.deepcopy(p[key])
        ports.append(out)
    if ports:
        svc["ports"] = ports
    _autoscaling(raw, svc, "services")
    checks = [
        _check(c, kind="tcp", port=port, where="services.tcp_checks")
        for c in _list_of_tables(raw.get("tcp_checks"), "services.tcp_checks")
    ] + [
        _check(c, kind="http", port=port, where="services.http_checks")
        for c in _list_of_tables(raw.get("http_checks"), "services.http_checks")
    ]
    if checks:
        svc["checks"] = checks
    return svc


def _autoscaling(raw: Mapping[str, Any], svc: dict[str, Any], where: str) -> None:
    if "auto_stop_machines" in raw:
        svc["autostop"] = _autostop(raw["auto_stop_machines"], where)
    if "auto_start_machines" in raw:
        svc["autostart"] = bool(raw["auto_start_machines"])
    if "min_machines_running" in raw:
        svc["min_machines_running"] = _int(
            raw["min_machines_running"], f"{where}.min_machines_running"
        )
    concurrency = _concurrency(raw.get("concurrency"), where)
    if concurrency:
        svc["concurrency"] = concurrency


def _autostop(value: Any, where: str) -> bool | str:
    # The 2023 API takes a boolean; only "suspend" needs the newer string form.
    if isinstance(value, bool):
        return value
    if value == "stop":
        return True
    if value == "off":
        return False
    if value == "suspend":
        return "suspend"
    raise FlyTomlError(
        f'fly.toml: {where}.auto_stop_machines must be "off", "stop" or "suspend", not {value!r}'
    )


def _concurrency(raw: Any, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        # The old "soft,hard" string form.
        try:
            limits = sorted(int(p) for p in raw.split(","))
        except ValueError:
            raise FlyTomlError(f"fly.toml: {where}.concurrency {raw!r} is malformed") from None
        if len(limits) != 2:
            raise FlyTomlError(f"fly.toml: {where}.concurrency {raw!r} is malformed")
        return {"soft_limit": limits[0], "hard_limit": limits[1]}
    if not isinstance(raw, dict):
        raise FlyTomlError(f"fly.toml: {where}.concurrency must be a table")
    out: dict[str, Any] = {}
    if "type" in raw:
        out["type"] = str(raw["type"])
    for key in ("soft_limit", "hard_limit"):
        if key in raw:
            out[key] = _int(raw[key], f"{where}.concurrency.{key}")
    return out


def _check(raw: Mapping[str, Any], *, kind: str, port: int, where: str) -> dict[str, Any]:
    kind = str(raw.get("type", kind))
    check: dict[str, Any] = {"type": kind, "port": _int(raw.get("port", port), f"{where}.port")}
    for key in ("grace_period", "interval", "timeout"):
        duration = _duration(raw.get(key), f"{where}.{key}", int_unit="ms")
        if duration:
            check[key] = duration
    if kind == "http":
        check["method"] = str(raw.get("method", "GET")).upper()
        check["path"] = str(raw.get("path", "/"))
        if "protocol" in raw:
            check["protocol"] = str(raw["protocol"])
        if "tls_skip_verify" in raw:
            check["tls_skip_verify"] = bool(raw["tls_skip_verify"])
        if raw.get("tls_server_name"):
            check["tls_server_name"] = str(raw["tls_server_name"])
        headers = _headers(raw.get("headers"), where)
        if headers:
            check["headers"] = headers
    return check


def _headers(raw: Any, where: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    pairs: Iterable[tuple[Any, Any]]
    if isinstance(raw, dict):
        pairs = raw.items()
    elif isinstance(raw, list) and all(isinstance(h, dict) and "name" in h for h in raw):
        pairs = [(h["name"], h.get("value", h.get("values", ""))) for h in raw]
    else:
        raise FlyTomlError(f"fly.toml: {where}.headers must be a table of header values")
    out = []
    for name, value in pairs:
        values = value if isinstance(value, list) else [value]
        out.append({"name": str(name), "values": [_scalar_str(v) for v in values]})
    return out


def _top_level_checks(raw: Any, group: str) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(c, dict) for c in raw.values()):
        raise FlyTomlError("fly.toml: [checks] must hold named check tables ([checks.<name>])")
    checks = {}
    for name, check in raw.items():
        if not _applies(check, group):
            continue
        if "port" not in check:
            raise FlyTomlError(f"fly.toml: checks.{name} needs a port")
        checks[name] = _check(
            check, kind=str(check.get("type", "http")), port=0, where=f"checks.{name}"
        )
    return checks


def _restart(raw: Mapping[str, Any]) -> dict[str, Any]:
    policy = {"never": "no", "no": "no", "always": "always", "on-failure": "on-failure"}.get(
        str(raw.get("policy", "")).lower()
    )
    if policy is None:
        raise FlyTomlError(
            f'fly.toml: restart policy {raw.get("policy")!r} must be "always", "never" or '
            '"on-failure"'
        )
    out: dict[str, Any] = {"policy": policy}
    if "retries" in raw:
        out["max_retries"] = _int(raw["retries"], "restart.retries")
    return out


def _stop_config(doc: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    if doc.get("kill_signal"):
        out["signal"] = str(doc["kill_signal"])
    # An integer kill_timeout is seconds (flyctl's old format).
    timeout = _duration(doc.get("kill_timeout"), "kill_timeout", int_unit="s")
    if timeout:
        out["timeout"] = timeout
    return out


def _init(doc: Mapping[str, Any], group: str) -> dict[str, Any]:
    init: dict[str, Any] = {}
    experimental = doc.get("experimental")
    if isinstance(experimental, dict):
        for key in ("cmd", "entrypoint", "exec"):
            if experimental.get(key):
                init[key] = _command(experimental[key], f"experimental.{key}")
    processes = doc.get("processes")
    if isinstance(processes, dict) and processes.get(group):
        init["cmd"] = _command(processes[group], f"processes.{group}")
    if doc.get("swap_size_mb"):
        init["swap_size_mb"] = _int(doc["swap_size_mb"], "swap_size_mb")
    return init


def _command(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return shlex.split(value)
    if isinstance(value, list):
        return [str(v) for v in value]
    raise FlyTomlError(f"fly.toml: {where} must be a string or a list of strings")


# ------------------------------------------------------------------------------ helpers


def _parse(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message names the line and column: "Invalid value (at line 3, column 7)".
        raise FlyTomlError(f"fly.toml is not valid TOML: {exc}") from None


def _table(doc: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FlyTomlError(f"fly.toml: [{key}] must be a table")
    return value


def _list_of_tables(raw: Any, where: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if isinstance(raw, dict):  # a single `[vm]` / `[metrics]` instead of `[[...]]`
        return [raw]
    if isinstance(raw, list) and all(isinstance(e, dict) for e in raw):
        return raw
    raise FlyTomlError(f"fly.toml: {where} must be a table or an array of tables")


def _first_applying(raw: Any, where: str, group: str) -> dict[str, Any] | None:
    for entry in _list_of_tables(raw, where):
        if _applies(entry, group):
            return entry
    return None


def _applies(entry: Mapping[str, Any], group: str) -> bool:
    processes = entry.get("processes")
    return not processes or group in processes


def _int(value: Any, where: str) -> int:
    result = _int_or_none(value)
    if result is None:
        raise FlyTomlError(f"fly.toml: {where} must be an integer, not {value!r}")
    return result


def _int_or_none(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


_DURATION_RE = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _duration(value: Any, where: str, *, int_unit: str) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if int_unit == "ms" and value % 1000 == 0:
            return f"{value // 1000}s"
        return f"{value}{int_unit}"
    if isinstance(value, str) and _DURATION_RE.match(value):
        return value
    raise FlyTomlError(f"fly.toml: {where} {value!r} is not a duration like '10s' or '1m30s'")


def _scalar_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
