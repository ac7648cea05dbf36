"""fly.toml: render ours, merge it into the user's, and map it to a Machines API config.

Pure functions without I/O: the activities read and write the files, the Fly client sends the
configs. The mapping follows what `flyctl deploy` does for a single process group.
"""

from __future__ import annotations

import base64
import copy
import json
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
    "env.*": (
        "each variable of the deploy request; the file's other variables are kept, as strings "
        "(flyctl reads numbers and booleans as strings)"
    ),
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
    "vm.size": (
        '"shared-cpu-1x", on every [[vm]] (or its alias [[compute]]) that applies to the app '
        "process group"
    ),
    "vm.memory": '"256mb", on the same [[vm]] entries',
    "vm.cpu_kind": "removed from those entries: flyctl lets it override size",
    "vm.cpus": "removed from those entries: flyctl lets it override size",
    "vm.memory_mb": "removed from those entries: flyctl lets it override memory",
    "compute.size": "as vm.size, for [[compute]] entries that apply to the app group",
    "compute.memory": "as vm.memory",
    "compute.cpu_kind": "as vm.cpu_kind",
    "compute.cpus": "as vm.cpus",
    "compute.memory_mb": "as vm.memory_mb",
    "computes.size": "as vm.size, for [[computes]] entries that apply to the app group",
    "computes.memory": "as vm.memory",
    "computes.cpu_kind": "as vm.cpu_kind",
    "computes.cpus": "as vm.cpus",
    "computes.memory_mb": "as vm.memory_mb",
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
    out.update(_merged_vm(doc))
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


def _merged_env(raw: Any, request_env: Mapping[str, str]) -> dict[str, str]:
    # flyctl reads every value as a string (numbers and booleans too); written as strings,
    # the file also passes the fly.toml schema editors use.
    existing = {k: _scalar_str(v) for k, v in _env_table(raw).items()}
    env: dict[str, str] = {"PORT": str(INTERNAL_PORT), "NODE_ENV": "production"}
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


def _merged_vm(doc: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    # `[[compute]]` and `[[computes]]` are flyctl's aliases of `[[vm]]`: an entry there that
    # applies to the app group is managed where it is.
    sections = {
        key: [dict(e) for e in _list_of_tables(doc.get(key), key)]
        for key in ("vm", "compute", "computes")
        if key in doc
    }
    applying = [
        e for entries in sections.values() for e in entries if _applies(e, APP_PROCESS_GROUP)
    ]
    if not applying:
        new: dict[str, Any] = dict(_VM)
        if any(sections.values()):
            new["processes"] = [APP_PROCESS_GROUP]
        sections["vm"] = [new, *sections.get("vm", [])]
        return sections
    for entry in applying:
        for key in _VM_OVERRIDING_KEYS:
            entry.pop(key, None)
        rest = {k: v for k, v in entry.items() if k not in _VM}
        entry.clear()
        entry.update(_VM)
        entry.update(rest)
    return sections


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
#
# What follows is flyctl's `internal/appconfig` (patches.go, processgroups.go, machines.go,
# service.go, toplevelcheck.go): the file is first normalised as flyctl's patches do, then
# flattened to one process group and mapped to the Machines API config.


def machine_config(
    fly_toml: str,
    *,
    image: str,
    metadata: Mapping[str, str],
    process_group: str = APP_PROCESS_GROUP,
    local_files: Mapping[str, bytes] | None = None,
) -> dict[str, Any]:
    """The Machines API `config` for one machine of `process_group`, as flyctl builds it.

    Build-time (`[build]`) and orchestration (`[deploy]`) settings have no place in it.
    `[mounts]` become `mounts` entries naming the volume (`name`) and its `path`; the volume
    id is attached by whoever creates the machine. `[[files]]` with `local_path` (and an
    `[experimental] machine_config` naming a file) read their content from `local_files`
    (path as written in fly.toml → bytes).
    """
    if not image:
        raise FlyTomlError("an image is required for a machine config")
    doc = normalized(_parse(fly_toml))
    group = process_group
    files = local_files or {}
    config: dict[str, Any] = _machine_config_json(doc, files)
    config["image"] = image
    _select_container(config, doc, image)

    metrics = _applying(doc, doc.get("metrics") or [], group)
    if metrics:
        config["metrics"] = _metrics(metrics[0])
    init = _init(doc, group)
    if init:
        config["init"] = init

    meta: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise FlyTomlError(f"machine metadata {key!r} must be a string")
        meta[key] = value
    meta["fly_platform_version"] = "v2"
    meta["fly_process_group"] = group
    config["metadata"] = meta

    http = doc.get("http_service")
    if http is not None and not _applies_to(doc, http, group):
        http = None
    services = [_http_service(http)] if http is not None else []
    services += [_service(s) for s in _applying(doc, doc.get("services") or [], group)]
    if services:
        config["services"] = services

    checks = _top_level_checks(doc, group, http)
    if checks:
        config["checks"] = checks

    env = dict(doc.get("env") or {})
    env["FLY_PROCESS_GROUP"] = group
    if doc.get("primary_region"):
        env["PRIMARY_REGION"] = str(doc["primary_region"])
    config["env"] = env

    statics = [_static(s) for s in _list_of_tables(doc.get("statics"), "statics")]
    if statics:
        config["statics"] = statics
    mounts = mount_specs_of(doc, group)
    if mounts:
        config["mounts"] = [m.machine_mount() for m in mounts]
    stop = _stop_config(doc)
    if stop:
        config["stop_config"] = stop
    machine_files = [
        _file(f, files) for f in _applying(doc, _list_of_tables(doc.get("files"), "files"), group)
    ]
    if machine_files:
        config["files"] = machine_files
    guest = _guest(doc, group)
    if guest:
        config["guest"] = guest
    restarts = _applying(doc, _list_of_tables(doc.get("restart"), "restart"), group)
    if restarts:
        config["restart"] = _restart(restarts[-1])
    return config


# Replaced by what fly.toml says, and dropped when it says nothing (as flyctl does).
_REPLACED: Final = ("image", "env", "services", "checks", "statics", "files")
# Taken from fly.toml when it sets them, otherwise left as the machine has them: flyctl
# clears them, but a deploy here keeps what was set by hand (`fly machine update`).
_OVERLAID_WHEN_SET: Final = ("metrics", "restart", "stop_config", "guest")
_INIT_MANAGED: Final = ("cmd", "entrypoint", "exec", "swap_size_mb")
_MAPPED: Final = frozenset({*_REPLACED, *_OVERLAID_WHEN_SET, "init", "metadata", "mounts"})


def overlay_managed(current: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A machine's next config: its current one with what fly.toml manages replaced.

    An update replaces the whole config, so fields fly.toml does not manage (`dns`,
    `schedule`, other metadata, ...) must be carried over. Mounts keep their volume: a
    mount of fly.toml on a path (or volume name) the machine already mounts keeps that
    volume id, and a machine whose fly.toml has no `[mounts]` keeps the volumes it has.
    """
    merged = copy.deepcopy(dict(current))
    for key, value in new.items():  # from `[experimental] machine_config`, merged as JSON is
        if key not in _MAPPED:
            merged[key] = _deep_merged(merged.get(key), value)
    for key in _REPLACED:
        if key in new:
            merged[key] = copy.deepcopy(new[key])
        else:
            merged.pop(key, None)
    for key in _OVERLAID_WHEN_SET:
        if key in new:
            merged[key] = copy.deepcopy(new[key])
    init = {k: v for k, v in (merged.get("init") or {}).items() if k not in _INIT_MANAGED}
    init.update(copy.deepcopy(new.get("init") or {}))
    if init:
        merged["init"] = init
    else:
        merged.pop("init", None)
    merged["metadata"] = {**(merged.get("metadata") or {}), **dict(new.get("metadata") or {})}
    if new.get("mounts"):
        merged["mounts"] = carry_volumes(current.get("mounts") or [], new["mounts"])
    return merged


def carry_volumes(
    current: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """`new` mounts, each with the volume id of the current mount on its path or volume name."""
    current = [m for m in current if isinstance(m, Mapping)]
    out = []
    for mount in new:
        mount = dict(mount)
        if not mount.get("volume"):
            same = next(
                (
                    c
                    for c in current
                    if c.get("volume")
                    and (c.get("path") == mount.get("path") or c.get("name") == mount.get("name"))
                ),
                None,
            )
            if same is not None:
                mount["volume"] = same["volume"]
        out.append(mount)
    return out


def _deep_merged(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        merged = dict(old)
        for key, value in new.items():
            merged[key] = _deep_merged(old.get(key), value)
        return merged
    return copy.deepcopy(new)


# -------------------------------------------------------------------------- normalising


def normalized(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed fly.toml in the shape flyctl's patches give it (`patches.go`).

    `[env]` values as strings (`[[env]]` merged), `[processes]` as a table, `[checks]` as
    named tables, `[[compute]]`/`[[computes]]`/`[[vm]]` as one `vm` list, `[mount]`/`[mounts]`
    as one `mounts` list, `[metric]`/`[metrics]` as one `metrics` list, empty `[[services]]`
    dropped, `[experimental]` commands as lists (its `kill_timeout` and `metrics_*` moved
    out), and `kill_timeout` as a duration.
    """
    cfg = copy.deepcopy(dict(doc))
    if "env" in cfg:
        cfg["env"] = {k: _scalar_str(v) for k, v in _env_table(cfg["env"]).items()}
    if "services" in cfg:
        cfg["services"] = [s for s in _list_of_tables(cfg["services"], "services") if s]
    _normalize_processes(cfg)
    _normalize_experimental(cfg)
    if "checks" in cfg:
        cfg["checks"] = _named_checks(cfg["checks"])
        if not cfg["checks"]:
            del cfg["checks"]
    compute: list[dict[str, Any]] = []
    for key in ("compute", "computes", "vm"):
        if key in cfg:
            compute += _list_of_tables(cfg.pop(key), key)
    cfg["vm"] = compute
    mounts: list[dict[str, Any]] = []
    for key in ("mount", "mounts"):
        if key in cfg:
            mounts += _list_of_tables(cfg.pop(key), key)
    cfg["mounts"] = mounts
    metrics: list[dict[str, Any]] = []
    for key in ("metric", "metrics"):
        if key in cfg:
            metrics += _list_of_tables(cfg.pop(key), key)
    cfg["metrics"] = metrics
    if "kill_timeout" in cfg:
        cfg["kill_timeout"] = _duration(cfg["kill_timeout"], "kill_timeout", int_unit=_SECOND)
    http = cfg.get("http_service")
    if http is not None and not isinstance(http, dict):
        raise FlyTomlError("fly.toml: [http_service] must be a table")
    return cfg


def _normalize_processes(cfg: dict[str, Any]) -> None:
    raw = cfg.get("processes")
    if raw is None or isinstance(raw, dict):
        if raw is not None:
            cfg["processes"] = {str(k): _scalar_str(v) for k, v in raw.items()}
        return
    if isinstance(raw, list):  # the old [[processes]] name/command form
        processes = {
            _scalar_str(p["name"]): _scalar_str(p.get("command", ""))
            for p in raw
            if isinstance(p, dict) and "name" in p
        }
        if processes:
            cfg["processes"] = processes
        else:
            del cfg["processes"]
        return
    raise FlyTomlError("fly.toml: [processes] must be a table of group = command")


def _normalize_experimental(cfg: dict[str, Any]) -> None:
    raw = cfg.get("experimental")
    if raw is None:
        return
    if not isinstance(raw, dict):
        raise FlyTomlError("fly.toml: [experimental] must be a table")
    metrics = {}
    for key, value in raw.items():
        if key in ("cmd", "entrypoint", "exec"):
            raw[key] = _string_list(value, f"experimental.{key}")
        elif key == "kill_timeout" and "kill_timeout" not in cfg:
            cfg["kill_timeout"] = value
        elif key in ("metrics_port", "metrics_path"):
            metrics[key.removeprefix("metrics_")] = value
    if not raw:
        del cfg["experimental"]
    if metrics and "metrics" not in cfg:
        cfg["metrics"] = metrics


def _named_checks(raw: Any) -> dict[str, dict[str, Any]]:
    if isinstance(raw, dict) and all(isinstance(c, dict) for c in raw.values()):
        return dict(raw)
    if isinstance(raw, list) and all(isinstance(c, dict) and "name" in c for c in raw):
        return {str(c["name"]): c for c in raw}
    raise FlyTomlError("fly.toml: [checks] must hold named check tables ([checks.<name>])")


def _string_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise FlyTomlError(f"fly.toml: {where} must be a string or a list of strings")


# ------------------------------------------------------------------------ process groups


def default_process_group(doc: Mapping[str, Any]) -> str:
    """flyctl's default group: `app` when there are no processes or one is named so, else
    the first name in order."""
    names = sorted(str(k) for k in (doc.get("processes") or {}))
    if not names or APP_PROCESS_GROUP in names:
        return APP_PROCESS_GROUP
    return names[0]


def _group_matches(doc: Mapping[str, Any], group: str, processes: Any) -> bool:
    # A section without `processes` belongs to the default group only.
    if not processes:
        return group == default_process_group(doc)
    if isinstance(processes, str):
        processes = [processes]
    return group in processes or ("" in processes and group == default_process_group(doc))


def _applies_to(doc: Mapping[str, Any], entry: Mapping[str, Any], group: str) -> bool:
    return _group_matches(doc, group, entry.get("processes"))


def _applying(
    doc: Mapping[str, Any], entries: list[dict[str, Any]], group: str
) -> list[dict[str, Any]]:
    return [e for e in entries if _applies_to(doc, e, group)]


def compute_for_group(doc: Mapping[str, Any], group: str) -> dict[str, Any] | None:
    """The `[[vm]]` of a group (flyctl's ComputeForGroup): one naming the group beats one
    for every group (without `processes`)."""
    chosen: dict[str, Any] | None = None
    for entry in doc.get("vm") or []:
        processes = entry.get("processes") or []
        if processes and not _group_matches(doc, group, processes):
            continue
        if chosen is None or group in processes:
            chosen = entry
    return chosen


# ------------------------------------------------------------------------------ mounts


class MountSpec:
    """One `[mounts]` entry of a group: the volume a machine needs and where it goes."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        self.source = str(raw.get("source") or "")
        self.destination = str(raw.get("destination") or "")
        if not self.source or not self.destination:
            raise FlyTomlError("fly.toml: [mounts] needs a source (volume name) and a destination")
        self.initial_size_gb = (
            parse_volume_size_gb(raw["initial_size"], "mounts.initial_size")
            if raw.get("initial_size") not in (None, "")
            else None
        )
        self.snapshot_retention = _optional_int(raw, "snapshot_retention", "mounts")
        scheduled = raw.get("scheduled_snapshots")
        self.scheduled_snapshots = bool(scheduled) if scheduled is not None else None
        self.extend_threshold_percent = _optional_int(raw, "auto_extend_size_threshold", "mounts")
        self.add_size_gb = _optional_size(raw, "auto_extend_size_increment")
        self.size_gb_limit = _optional_size(raw, "auto_extend_size_limit")

    def machine_mount(self) -> dict[str, Any]:
        mount: dict[str, Any] = {"path": self.destination, "name": self.source}
        if self.extend_threshold_percent:
            mount["extend_threshold_percent"] = self.extend_threshold_percent
        if self.add_size_gb:
            mount["add_size_gb"] = self.add_size_gb
        if self.size_gb_limit:
            mount["size_gb_limit"] = self.size_gb_limit
        return mount


def mount_specs(fly_toml: str, process_group: str = APP_PROCESS_GROUP) -> list[MountSpec]:
    """The `[mounts]` of one process group (at most one: a machine mounts one volume)."""
    return mount_specs_of(normalized(_parse(fly_toml)), process_group)


def mount_specs_of(doc: Mapping[str, Any], group: str) -> list[MountSpec]:
    mounts = [MountSpec(m) for m in _applying(doc, doc.get("mounts") or [], group)]
    if len(mounts) > 1:
        raise FlyTomlError(
            f"fly.toml: group {group!r} has more than one [[mounts]] section defined; a "
            "machine mounts one volume"
        )
    return mounts


_VOLUME_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)\s*$", re.IGNORECASE)
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}


def parse_volume_size_gb(value: Any, where: str) -> int:
    """A volume size in GB as flyctl reads it: plain numbers are GB, `"30gb"` is 30,
    decimal units (`"1tb"` is 1000), and less than 1 GB is refused."""
    if isinstance(value, bool):
        raise FlyTomlError(f"fly.toml: {where} {value!r} is not a size")
    if isinstance(value, int):
        gb = value
    else:
        text = str(value)
        if text.strip().isdigit():
            gb = int(text)
        else:
            match = _VOLUME_SIZE_RE.match(text)
            if not match:
                raise FlyTomlError(f"fly.toml: {where} {value!r} is not a size like '10gb'")
            number, unit, binary = float(match.group(1)), match.group(2).lower(), match.group(3)
            factor = 1024 ** "kmgtp".index(unit) * 1024 if binary and unit else _DECIMAL[unit]
            gb = int(number * factor // 10**9)
    if gb < 1:
        raise FlyTomlError(f"fly.toml: {where} {value!r} is smaller than 1GB")
    return gb


def _optional_size(raw: Mapping[str, Any], key: str) -> int | None:
    value = raw.get(key)
    return None if value in (None, "") else parse_volume_size_gb(value, f"mounts.{key}")


def _optional_int(raw: Mapping[str, Any], key: str, where: str) -> int | None:
    return None if raw.get(key) is None else _int(raw[key], f"{where}.{key}")


# --------------------------------------------------------------------------- sections


def _machine_config_json(doc: Mapping[str, Any], files: Mapping[str, bytes]) -> dict[str, Any]:
    experimental = doc.get("experimental") or {}
    raw = experimental.get("machine_config") or doc.get("machine_config")
    if not raw:
        return {}
    if not isinstance(raw, str):
        raise FlyTomlError("fly.toml: machine_config must be a JSON string or a file name")
    text = raw
    if not raw.lstrip().startswith("{"):
        if raw not in files:
            raise FlyTomlError(f"fly.toml: machine_config file {raw!r} was not provided")
        text = files[raw].decode()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FlyTomlError(f"fly.toml: machine_config is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise FlyTomlError("fly.toml: machine_config must be a JSON object")
    return parsed


def _select_container(config: dict[str, Any], doc: Mapping[str, Any], image: str) -> None:
    # The container that runs the deployed image: the one named by `container`, else
    # "app", else the first (flyctl's containerconfig).
    containers = config.get("containers")
    if not isinstance(containers, list) or not containers:
        return
    wanted = str(doc.get("container") or "")
    chosen = next((c for c in containers if c.get("name") == (wanted or "app")), None)
    if chosen is None:
        if wanted:
            raise FlyTomlError(f"fly.toml: container {wanted!r} not found in machine_config")
        chosen = containers[0]
    for container in containers:
        if container is chosen:
            container["image"] = image
        elif not container.get("image"):
            raise FlyTomlError(f"fly.toml: container {container.get('name')!r} needs an image")


def _metrics(raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if raw.get("port"):
        out["port"] = _int(raw["port"], "metrics.port")
    if raw.get("path"):
        out["path"] = str(raw["path"])
    if raw.get("https"):
        out["https"] = True
    return out


def _init(doc: Mapping[str, Any], group: str) -> dict[str, Any]:
    init: dict[str, Any] = {}
    command = (doc.get("processes") or {}).get(group)
    cmd = _command(command, f"processes.{group}") if command else None
    experimental = doc.get("experimental")
    if isinstance(experimental, dict):
        cmd = cmd or experimental.get("cmd") or None
        for key in ("entrypoint", "exec"):
            if experimental.get(key):
                init[key] = list(experimental[key])
    if cmd:
        init["cmd"] = cmd
    if doc.get("swap_size_mb") is not None:
        init["swap_size_mb"] = _int(doc["swap_size_mb"], "swap_size_mb")
    return init


def _command(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise FlyTomlError(f"fly.toml: {where} cannot be parsed: {exc}") from None
    if isinstance(value, list):
        return [str(v) for v in value]
    raise FlyTomlError(f"fly.toml: {where} must be a string or a list of strings")


def _static(raw: Mapping[str, Any]) -> dict[str, str]:
    # fly-go sends all four fields, empty ones included.
    static = {k: str(raw.get(k) or "") for k in ("guest_path", "url_prefix")}
    if not static["guest_path"] or not static["url_prefix"]:
        raise FlyTomlError("fly.toml: [[statics]] needs guest_path and url_prefix")
    static["tigris_bucket"] = str(raw.get("tigris_bucket") or "")
    static["index_document"] = str(raw.get("index_document") or "")
    return static


def _file(raw: Mapping[str, Any], files: Mapping[str, bytes]) -> dict[str, str]:
    guest_path = str(raw.get("guest_path") or "")
    if not guest_path:
        raise FlyTomlError("fly.toml: [[files]] needs a guest_path")
    out = {"guest_path": guest_path}
    if raw.get("local_path"):
        local = str(raw["local_path"])
        if local not in files:
            raise FlyTomlError(f"fly.toml: [[files]] local_path {local!r} was not provided")
        out["raw_value"] = base64.b64encode(files[local]).decode()
    elif raw.get("secret_name"):
        out["secret_name"] = str(raw["secret_name"])
    elif raw.get("raw_value"):
        # flyctl encodes the value as written (even when it looks like base64 already).
        out["raw_value"] = base64.b64encode(str(raw["raw_value"]).encode()).decode()
    return out


_SIZE_PRESETS: Final[Mapping[str, Mapping[str, Any]]] = {
    **{
        f"shared-cpu-{n}x": {"cpu_kind": "shared", "cpus": n, "memory_mb": n * 256}
        for n in (1, 2, 4, 6, 8)
    },
    **{
        f"performance-{n}x": {"cpu_kind": "performance", "cpus": n, "memory_mb": n * 2048}
        for n in (1, 2, 4, 6, 8, 10, 12, 14, 16)
    },
    **{
        size: {
            "gpu_kind": kind,
            "gpus": 1,
            "cpu_kind": "performance",
            "cpus": 8,
            "memory_mb": 32768,
        }
        for size, kind in (
            ("a100-40gb", "a100-pcie-40gb"),
            ("a100-80gb", "a100-sxm4-80gb"),
            ("l40s", "l40s"),
            ("a10", "a10"),
        )
    },
}
_GUEST_KEYS: Final = (
    "cpu_kind",
    "cpus",
    "memory_mb",
    "gpu_kind",
    "gpus",
    "kernel_args",
    "host_dedication_id",
    "persist_rootfs",
)


def _guest(doc: Mapping[str, Any], group: str) -> dict[str, Any] | None:
    # No [[vm]] for the group: no guest, so what `fly scale` set stays (flyctl).
    vm = compute_for_group(doc, group)
    if vm is None:
        return None
    size = str(vm.get("size") or ("performance-8x" if vm.get("gpu_kind") else _VM["size"]))
    if size not in _SIZE_PRESETS:
        kind = "performance" if size.startswith("performance") else "shared"
        valid = sorted(s for s in _SIZE_PRESETS if s.startswith(kind))
        raise FlyTomlError(
            f"fly.toml: [[vm]] size {size!r} is not a machine size; choose one of "
            + ", ".join(valid)
        )
    guest: dict[str, Any] = dict(_SIZE_PRESETS[size])
    hdid = vm.get("host_dedication_id") or doc.get("host_dedication_id")
    if hdid:
        guest["host_dedication_id"] = str(hdid)
    if vm.get("memory") not in (None, ""):
        guest["memory_mb"] = parse_memory_mb(vm["memory"])
    for key in _GUEST_KEYS:  # set fields of the section override the size (copier IgnoreEmpty)
        value = vm.get(key)
        if value in (None, "", 0, [], False):
            continue
        if key in ("cpus", "memory_mb", "gpus"):
            guest[key] = _int(value, f"vm.{key}")
        elif key == "kernel_args":
            guest[key] = [str(a) for a in value]
        else:
            guest[key] = str(value)
    return guest


_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_MEMORY_FACTOR = {
    "": 1 / 1024 / 1024,
    "k": 1 / 1024,
    "m": 1.0,
    "g": 1024.0,
    "t": 1024.0**2,
    "p": 1024.0**3,
}


def parse_memory_mb(value: Any) -> int:
    """fly.toml memory (`"256mb"`, `"1gb"`, `"8g"`, `512`) in MiB; plain numbers are MiB,
    units are binary (docker's RAMInBytes, as flyctl reads it)."""
    if isinstance(value, bool):
        raise FlyTomlError(f"fly.toml: memory {value!r} is not a size")
    if isinstance(value, int):
        mb = value
    elif str(value).strip().isdigit():
        mb = int(str(value).strip())
    else:
        match = _MEMORY_RE.match(str(value))
        if not match:
            raise FlyTomlError(f"fly.toml: memory {value!r} is not a size like '256mb' or '1gb'")
        mb = int(float(match.group(1)) * _MEMORY_FACTOR[match.group(2).lower()])
    if mb <= 0:
        raise FlyTomlError(f"fly.toml: memory {value!r} must be positive")
    return mb


def _http_service(http: Mapping[str, Any]) -> dict[str, Any]:
    port = _int(http.get("internal_port", 0), "http_service.internal_port")
    plain: dict[str, Any] = {"port": 80, "handlers": ["http"]}
    tls: dict[str, Any] = {"port": 443, "handlers": ["http", "tls"]}
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
        _service_check(c, "http", "http_service.checks")
        for c in _list_of_tables(http.get("checks"), "http_service.checks")
    ]
    if checks:
        svc["checks"] = checks
    return svc


_PORT_KEYS: Final = (
    "handlers",
    "force_https",
    "http_options",
    "tls_options",
    "proxy_proto_options",
)


def _service(raw: Mapping[str, Any]) -> dict[str, Any]:
    svc: dict[str, Any] = {"protocol": str(raw.get("protocol") or "tcp")}
    if raw.get("internal_port") is not None:
        svc["internal_port"] = _int(raw["internal_port"], "services.internal_port")
    ports = []
    for p in _list_of_tables(raw.get("ports"), "services.ports"):
        out: dict[str, Any] = {}
        for key in ("port", "start_port", "end_port"):
            if key in p:
                out[key] = _int(p[key], f"services.ports.{key}")
        for key in _PORT_KEYS:
            if key in p and p[key] not in (None, False):
                out[key] = copy.deepcopy(p[key])
        ports.append(out)
    if ports:
        svc["ports"] = ports
    _autoscaling(raw, svc, "services")
    checks = [
        _service_check(c, "tcp", "services.tcp_checks")
        for c in _list_of_tables(raw.get("tcp_checks"), "services.tcp_checks")
    ] + [
        _service_check(c, "http", "services.http_checks")
        for c in _list_of_tables(raw.get("http_checks"), "services.http_checks")
    ]
    if checks:
        svc["checks"] = checks
    return svc


def _autoscaling(raw: Mapping[str, Any], svc: dict[str, Any], where: str) -> None:
    if raw.get("auto_stop_machines") is not None:
        svc["autostop"] = _autostop(raw["auto_stop_machines"], where)
    if raw.get("auto_start_machines") is not None:
        svc["autostart"] = bool(raw["auto_start_machines"])
    if raw.get("min_machines_running") is not None:
        svc["min_machines_running"] = _int(
            raw["min_machines_running"], f"{where}.min_machines_running"
        )
    concurrency = _concurrency(raw.get("concurrency"), where)
    if concurrency:
        svc["concurrency"] = concurrency


def _autostop(value: Any, where: str) -> bool | str:
    # As fly-go sends it: "off" and "stop" as booleans, "suspend" as the string.
    if isinstance(value, bool):
        return value
    if value in ("stop", "true"):
        return True
    if value in ("off", "false"):
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
        soft, sep, hard = raw.partition(",")
        try:
            limits = {"type": "requests", "hard_limit": int(hard), "soft_limit": int(soft)}
        except ValueError:
            raise FlyTomlError(f"fly.toml: {where}.concurrency {raw!r} is malformed") from None
        if not sep:
            raise FlyTomlError(f"fly.toml: {where}.concurrency {raw!r} is malformed")
        return limits
    if not isinstance(raw, dict):
        raise FlyTomlError(
            f"fly.toml: {where}.concurrency must be a table (type, soft_limit, hard_limit), "
            f"not {raw!r}"
        )
    out: dict[str, Any] = {}
    if "type" in raw:
        out["type"] = str(raw["type"])
    for key in ("soft_limit", "hard_limit"):
        if key in raw:
            out[key] = _int(raw[key], f"{where}.concurrency.{key}")
    return out


def _check_fields(raw: Mapping[str, Any], check: dict[str, Any], where: str) -> None:
    for key in ("interval", "timeout", "grace_period"):
        duration = _duration(raw.get(key), f"{where}.{key}", int_unit=_MILLISECOND)
        if duration:
            check[key] = duration
    for key in ("path", "protocol", "tls_server_name"):
        if raw.get(key):
            check[key] = str(raw[key])
    if raw.get("tls_skip_verify") is not None:
        check["tls_skip_verify"] = bool(raw["tls_skip_verify"])
    headers = _headers(raw.get("headers"), where)
    if headers:
        check["headers"] = headers


def _service_check(raw: Mapping[str, Any], kind: str, where: str) -> dict[str, Any]:
    check: dict[str, Any] = {"type": kind}
    _check_fields(raw, check, where)
    if kind == "http" and raw.get("method"):
        check["method"] = str(raw["method"])
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


def _top_level_checks(
    doc: Mapping[str, Any], group: str, http: Mapping[str, Any] | None
) -> dict[str, dict[str, Any]]:
    checks = {}
    for name, raw in (doc.get("checks") or {}).items():
        if not _applies_to(doc, raw, group):
            continue
        kind = raw.get("type")
        if kind not in ("http", "tcp"):
            raise FlyTomlError(
                f"fly.toml: checks.{name} has a missing or invalid type, must be 'http' or 'tcp'"
            )
        check: dict[str, Any] = {"type": kind}
        if raw.get("port") is not None:
            check["port"] = _int(raw["port"], f"checks.{name}.port")
        elif http is not None:
            # flyctl's default for new apps: the check of the group's http_service port.
            check["port"] = _int(http.get("internal_port", 0), "http_service.internal_port")
        else:
            raise FlyTomlError(
                f"fly.toml: check {name!r} for process group {group!r} has no port set and "
                "the group has no http_service to take it from"
            )
        _check_fields(raw, check, f"checks.{name}")
        if raw.get("method"):
            check["method"] = str(raw["method"]).upper()
        checks[name] = check
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
    if raw.get("retries"):
        out["max_retries"] = _int(raw["retries"], "restart.retries")
    return out


def _stop_config(doc: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    if doc.get("kill_signal"):
        out["signal"] = str(doc["kill_signal"])
    if doc.get("kill_timeout"):  # already a duration (normalized)
        out["timeout"] = str(doc["kill_timeout"])
    return out


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


_NANOSECOND: Final = 1
_MILLISECOND: Final = 10**6
_SECOND: Final = 10**9
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_NS: Final = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "μs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


def _duration(value: Any, where: str, *, int_unit: int) -> str | None:
    """A duration as flyctl sends it: Go's `time.Duration` string (`"10s"`, `"1m30s"`).

    Numbers are in `int_unit` (milliseconds for checks, seconds for kill_timeout)."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return go_duration(int(value * int_unit))
    if isinstance(value, str):
        text = value.strip()
        if text == "0":
            return go_duration(0)
        parts = _DURATION_PART_RE.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            ns = sum(round(float(n) * _UNIT_NS[u]) for n, u in parts)
            return go_duration(ns)
    raise FlyTomlError(f"fly.toml: {where} {value!r} is not a duration like '10s' or '1m30s'")


def go_duration(ns: int) -> str:
    """Go's `time.Duration.String()` of `ns` nanoseconds."""
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < _SECOND:
        for unit, size in (("ms", 10**6), ("µs", 10**3), ("ns", 1)):
            if ns >= size:
                return sign + _decimal(ns, size) + unit
    hours, rest = divmod(ns, 3600 * _SECOND)
    minutes, rest = divmod(rest, 60 * _SECOND)
    seconds = _decimal(rest, _SECOND) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return sign + seconds


def _decimal(value: int, size: int) -> str:
    whole, part = divmod(value, size)
    if not part:
        return str(whole)
    digits = str(part).rjust(len(str(size)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def _scalar_str(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
