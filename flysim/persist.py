"""The emulator's world kept in a file, so that a restarted emulator still knows its apps.

Fly does not forget an app or a machine when a client restarts; neither should the local
stack's emulator. `StateFile` writes the apps (machines, their events, versions, pending
transitions and leases, IP assignments, volumes, the lines of their logs) and the app
secrets to one JSON file:

- at start, `load()` reads it back, if it exists;
- every `interval` seconds while it serves, the file is written again when the world
  changed (`run`), so a killed emulator loses at most the last half second;
- and once more when the server stops (`save`).

Writes are atomic (a temporary file, then a rename), and the file is readable by its owner
only: like Fly's own vault, it holds the app secrets' values, and the key deploy tokens
are signed with (so the deploy tokens it minted stay valid). Tokens, counters, the request
log and the configuration are not kept: those come from the command line and the
environment each time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

from flysim.logs import LogLine
from flysim.secrets import SecretVault, _AppSecrets, _Secret, _Value, _Version
from flysim.server import FlySim
from flysim.state import App, Event, IPAssignment, Lease, Machine, Volume

FORMAT = 1
_SKIP = frozenset({"changed"})  # a machine's asyncio.Event: made anew on load

T = TypeVar("T")


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name not in _SKIP}


def _build(cls: type[T], data: dict[str, Any], **nested: Any) -> T:
    """`cls(**data)` for the fields `cls` has; fields added since the file was written
    take their defaults, fields since removed are ignored."""
    names = {f.name for f in dataclasses.fields(cls)} - _SKIP  # type: ignore[arg-type]
    return cls(**{k: v for k, v in {**data, **nested}.items() if k in names})


# ------------------------------------------------------------------------------ dump


def _machine(machine: Machine) -> dict[str, Any]:
    data = _fields(machine)
    data["lease"] = _fields(machine.lease) if machine.lease else None
    data["events"] = [_fields(e) for e in machine.events]
    data["pending"] = [list(p) for p in machine.pending]
    data["versions"] = [list(v) for v in machine.versions]
    return data


def _app(app: App) -> dict[str, Any]:
    data = _fields(app)
    data["machines"] = {mid: _machine(m) for mid, m in app.machines.items()}
    data["ips"] = [_fields(ip) for ip in app.ips]
    data["volumes"] = {vid: _fields(v) for vid, v in app.volumes.items()}
    data["request_lines"] = [_fields(line) for line in app.request_lines]
    return data


def _vault(vault: SecretVault) -> dict[str, Any]:
    apps: dict[str, Any] = {}
    for app_id, state in vault._apps.items():
        apps[app_id] = [
            {
                "number": v.number,
                "at": v.at,
                "secrets": {
                    name: {
                        "value": s.value.reveal(),
                        "digest": s.digest,
                        "created_at": s.created_at,
                        "updated_at": s.updated_at,
                    }
                    for name, s in v.secrets.items()
                },
            }
            for v in state.versions
        ]
    return {"key": base64.b64encode(vault._key).decode(), "apps": apps}


def dump(sim: FlySim) -> dict[str, Any]:
    """The emulator's world as JSON-ready data."""
    world = sim.world
    return {
        "format": FORMAT,
        "apps": [_app(a) for a in world.apps.values()],
        "ip_counter": world._ip_counter,
        "secrets": _vault(sim.secrets),
        "deploy_tokens": sim.deploy_tokens.to_json(),
    }


# ------------------------------------------------------------------------------ load


def _load_machine(data: dict[str, Any]) -> Machine:
    lease = data.get("lease")
    return _build(
        Machine,
        data,
        lease=_build(Lease, lease) if lease else None,
        events=[_build(Event, e) for e in data.get("events", [])],
        pending=[tuple(p) for p in data.get("pending", [])],
        versions=[tuple(v) for v in data.get("versions", [])],
    )


def _load_app(data: dict[str, Any]) -> App:
    return _build(
        App,
        data,
        machines={mid: _load_machine(m) for mid, m in data.get("machines", {}).items()},
        ips=[_build(IPAssignment, ip) for ip in data.get("ips", [])],
        volumes={vid: _build(Volume, v) for vid, v in data.get("volumes", {}).items()},
        request_lines=[_build(LogLine, line) for line in data.get("request_lines", [])],
    )


def _load_vault(vault: SecretVault, data: dict[str, Any]) -> None:
    vault._key = base64.b64decode(data["key"])
    vault._apps = {
        app_id: _AppSecrets(
            versions=[
                _Version(
                    v["number"],
                    v["at"],
                    {
                        name: _Secret(
                            _Value(s["value"]), s["digest"], s["created_at"], s["updated_at"]
                        )
                        for name, s in v["secrets"].items()
                    },
                )
                for v in versions
            ]
        )
        for app_id, versions in data.get("apps", {}).items()
    }


def restore(sim: FlySim, data: dict[str, Any]) -> None:
    """Replace the emulator's world with `data` (as `dump` made it)."""
    if data.get("format") != FORMAT:
        raise ValueError(f"unknown emulator state format: {data.get('format')!r}")
    apps = [_load_app(a) for a in data.get("apps", [])]
    sim.world.apps = {a.name: a for a in apps}
    sim.world._ip_counter = int(data.get("ip_counter", 0))
    _load_vault(sim.secrets, data.get("secrets") or {"key": "", "apps": {}})
    sim.deploy_tokens.load(data.get("deploy_tokens") or {})


# ------------------------------------------------------------------------ the file


class StateFile:
    """Keeps `sim`'s world in `path`: loaded at start, written on change and at stop."""

    def __init__(self, sim: FlySim, path: Path, *, interval: float = 0.5) -> None:
        self.sim = sim
        self.path = path
        self.interval = interval
        self._last: str | None = None

    def load(self) -> int:
        """Read the file if there is one; return the number of apps it held."""
        if not self.path.exists():
            return 0
        text = self.path.read_text()
        try:
            restore(self.sim, json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the emulator state in {self.path}: {exc}") from exc
        self._last = text
        return len(self.sim.world.apps)

    def save(self) -> bool:
        """Write the world if it changed since the last write; return whether it wrote."""
        text = json.dumps(dump(self.sim), separators=(",", ":"), sort_keys=True)
        if text == self._last:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as out:  # mkstemp: readable by its owner only
                out.write(text)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._last = text
        return True

    async def run(self) -> None:
        """Write the file whenever the world changed, every `interval` seconds, until
        cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.save()
