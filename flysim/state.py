"""The emulated platform: apps, machines, leases, and how machines change state over time.

State changes that take time are scheduled, not run by background tasks: every read
first applies the transitions that are due (`World.advance`). Waiters learn about a
change through the machine's `changed` event, and about a scheduled one through
`next_due`.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from flysim.config import SimConfig

# States from which a machine counts as gone for listing and the proxy.
GONE_STATES = frozenset({"destroying", "destroyed"})
RUNNING_STATES = frozenset({"started"})
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_WORDS_A = ("quiet", "bold", "lively", "ancient", "misty", "sparkling", "patient", "rough")
_WORDS_B = ("river", "forest", "meadow", "sun", "wind", "feather", "thunder", "field")


def ulid() -> str:
    """A ULID: Fly's machine versions (and instance ids) have this shape."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(secrets.token_bytes(10), "big")
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def image_ref(image: str) -> dict[str, Any]:
    """Split an image reference the way the platform reports it in `image_ref`."""
    rest, _, digest = image.partition("@")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
    else:
        registry, path = "docker-hub-mirror.fly.io", rest if slash else f"library/{rest}"
    colon = path.rfind(":")
    if colon > path.rfind("/"):
        repository, tag = path[:colon], path[colon + 1 :]
    else:
        repository, tag = path, "latest"
    return {
        "registry": registry,
        "repository": repository,
        "tag": tag,
        "digest": digest or "sha256:" + hashlib.sha256(image.encode()).hexdigest(),
        "labels": {},
    }


@dataclass
class Lease:
    nonce: str
    owner: str
    description: str
    expires_at: float
    version: str = field(default_factory=ulid)

    def to_json(self) -> dict[str, Any]:
        return {
            "nonce": self.nonce,
            "expires_at": int(self.expires_at),
            "owner": self.owner,
            "description": self.description,
            "version": self.version,
        }


@dataclass
class Event:
    type: str
    status: str
    source: str
    timestamp: float
    id: str = field(default_factory=ulid)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "source": self.source,
            "timestamp": int(self.timestamp * 1000),
            "request": {},
        }


@dataclass
class Machine:
    id: str
    app: str
    name: str
    region: str
    config: dict[str, Any]
    instance_id: str
    private_ip: str
    created_at: float
    state: str = "created"
    updated_at: float = 0.0
    started_at: float | None = None
    # Proxied traffic keeps an autostop machine awake.
    last_request_at: float = 0.0
    cordoned: bool = False
    lease: Lease | None = None
    # (due time, new state, event type, event source); applied in order by `advance`.
    pending: list[tuple[float, str, str, str]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    versions: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # The `min_secrets_version` of the last create or update, and how many secrets
    # versions behind the boot reads without one (the `stale_secrets` fault).
    min_secrets_version: int | None = None
    secrets_lag: int = 0
    # The last signal sent to the machine's process (`/signal`).
    last_signal: str | None = None

    def set_state(self, state: str, at: float, event: str, source: str = "user") -> None:
        self.state = state
        self.updated_at = at
        if state == "started":
            self.started_at = at
            self.last_request_at = at
        elif state not in {"starting", "replacing", "updating"}:
            self.started_at = None
        self.events.append(Event(event, state, source, at))
        self.notify()

    def schedule(self, now: float, steps: list[tuple[float, str, str]]) -> None:
        """Replace whatever was scheduled with `steps`: (delay from now, state, event)."""
        self.pending = []
        for delay, state, event in steps:
            self.pending.append((now + delay, state, event, "flyd"))
        self.notify()

    def notify(self) -> None:
        # Each waiter holds the event of the moment it started waiting; a fresh one
        # serves the next round.
        self.changed.set()
        self.changed = asyncio.Event()

    def advance(self, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            due, state, event, source = self.pending.pop(0)
            self.set_state(state, due, event, source)

    def boot_steps(self, config: SimConfig, delay: float) -> list[tuple[float, str, str]]:
        """What follows a start, `delay` seconds from now, given the injected faults."""
        timing, image = config.timing, str(self.config.get("image", ""))
        started_at = delay + timing.start_delay
        if image in config.failing_images:
            return [
                (delay, "starting", "start"),
                (started_at, "launch_failed", "launch"),
                (started_at, "failed", "exit"),
            ]
        steps = [(delay, "starting", "start"), (started_at, "started", "start")]
        if image in config.crashing_images:
            steps.append((started_at + timing.crash_after, "failed", "exit"))
        return steps

    def version_of(self, version: str) -> dict[str, Any] | None:
        for known, config in self.versions:
            if known == version:
                return config
        return None

    def next_due(self) -> float | None:
        return self.pending[0][0] if self.pending else None

    def active_lease(self, now: float) -> Lease | None:
        if self.lease is not None and self.lease.expires_at <= now:
            self.lease = None
        return self.lease

    def services(self) -> list[dict[str, Any]]:
        services = self.config.get("services") or []
        return [s for s in services if isinstance(s, dict)]

    def autostop_mode(self) -> str | None:
        """'stop' or 'suspend' when some service lets the proxy stop this machine."""
        for service in self.services():
            value = service.get("autostop")
            if value is True or value == "stop":
                return "stop"
            if value == "suspend":
                return "suspend"
        return None

    def min_machines_running(self) -> int:
        return max([int(s.get("min_machines_running") or 0) for s in self.services()] or [0])

    def check_specs(self) -> list[tuple[str, dict[str, Any]]]:
        specs: list[tuple[str, dict[str, Any]]] = []
        for service in self.services():
            for index, check in enumerate(service.get("checks") or []):
                kind = str(check.get("type") or "tcp")
                port = service.get("internal_port", check.get("port", 0))
                specs.append((f"servicecheck-{index:02d}-{kind}-{port}", check))
        checks = self.config.get("checks") or {}
        if isinstance(checks, dict):
            specs.extend((str(name), check) for name, check in checks.items())
        return specs

    def check_status(self, config: SimConfig, now: float) -> list[dict[str, Any]]:
        image = str(self.config.get("image", ""))
        statuses = []
        for name, spec in self.check_specs():
            target = f"{spec.get('method', 'GET')} {spec.get('path', '/')}"
            if self.state != "started" or self.started_at is None:
                status, output = "critical", "machine is not running"
            elif image in config.unhealthy_images:
                status, output = "critical", f"{target}: 500 Internal Server Error"
            elif now < self.started_at + config.timing.healthy_after:
                status, output = "warning", "waiting for the first check to pass"
            else:
                status, output = "passing", f"{target}: 200 OK"
            statuses.append(
                {"name": name, "status": status, "output": output, "updated_at": iso(now)}
            )
        return statuses

    def healthy(self, config: SimConfig, now: float) -> bool:
        return all(c["status"] == "passing" for c in self.check_status(config, now))

    def healthy_at(self, config: SimConfig) -> float | None:
        """When a started machine's checks will pass; None if they never will."""
        if self.started_at is None or str(self.config.get("image")) in config.unhealthy_images:
            return None
        return self.started_at + (config.timing.healthy_after if self.check_specs() else 0.0)

    def to_json(self, config: SimConfig, now: float) -> dict[str, Any]:
        metadata = self.config.get("metadata") or {}
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "region": self.region,
            "instance_id": self.instance_id,
            "version": self.instance_id,
            "private_ip": self.private_ip,
            "config": copy.deepcopy(self.config),
            "image_ref": image_ref(str(self.config.get("image", ""))),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at or self.created_at),
            "events": [e.to_json() for e in reversed(self.events)],
            "checks": self.check_status(config, now),
            "host_status": "ok",
            "metadata": dict(metadata) if isinstance(metadata, dict) else {},
        }


@dataclass
class IPAssignment:
    ip: str
    region: str
    service_name: str
    shared: bool
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "region": self.region,
            "service_name": self.service_name,
            "shared": self.shared,
            "created_at": iso(self.created_at),
        }


@dataclass
class Volume:
    """A volume: one machine at a time mounts it, in the volume's region."""

    id: str
    name: str
    region: str
    size_gb: int
    created_at: float
    zone: str = field(default_factory=lambda: secrets.token_hex(2))
    encrypted: bool = True
    fstype: str = "ext4"
    snapshot_retention: int = 5
    auto_backup_enabled: bool = True
    state: str = "created"

    def attached_to(self, app: App) -> Machine | None:
        """The machine that mounts this volume and is not destroyed, if any."""
        for machine in app.machines.values():
            if machine.state == "destroyed":
                continue
            for mount in machine.config.get("mounts") or []:
                if isinstance(mount, dict) and mount.get("volume") == self.id:
                    return machine
        return None

    def to_json(self, app: App) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "size_gb": self.size_gb,
            "region": self.region,
            "zone": self.zone,
            "encrypted": self.encrypted,
            "fstype": self.fstype,
            "created_at": iso(self.created_at),
            "snapshot_retention": self.snapshot_retention,
            "auto_backup_enabled": self.auto_backup_enabled,
            "host_status": "ok",
            "type": "local",
            "block_size": 4096,
            "blocks": self.size_gb * 262144,
            "blocks_free": self.size_gb * 262144,
            "blocks_avail": self.size_gb * 262144,
            "bytes_total": self.size_gb * 2**30,
            "bytes_used": 0,
        }
        machine = self.attached_to(app)
        if machine is not None:
            # Absent, not null, when detached: the spec types these as strings.
            out["attached_machine_id"] = machine.id
            out["attached_alloc_id"] = machine.instance_id
        return out


@dataclass
class App:
    id: str
    name: str
    org: str
    network: str
    created_at: float
    machines: dict[str, Machine] = field(default_factory=dict)
    ips: list[IPAssignment] = field(default_factory=list)
    volumes: dict[str, Volume] = field(default_factory=dict)
    # What the proxy handed to the app's machines, for its logs (flysim.logs.LogLine).
    request_lines: list[Any] = field(default_factory=list)

    def live_machines(self) -> list[Machine]:
        return [m for m in self.machines.values() if m.state not in GONE_STATES]

    def status(self) -> str:
        live = self.live_machines()
        if not live:
            return "pending"
        return "deployed" if any(m.state == "started" for m in live) else "suspended"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status(),
            "organization": {"name": self.org, "slug": self.org},
        }


class World:
    """All apps of one emulator instance."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.apps: dict[str, App] = {}
        self._ip_counter = 0

    def advance(self, app: App, now: float | None = None) -> None:
        """Apply due transitions, then the idle stops the proxy would have made."""
        now = time.time() if now is None else now
        for machine in app.machines.values():
            machine.advance(now)
        idle_limit = self.config.timing.autostop_after
        if idle_limit is None:
            return
        running = [m for m in app.live_machines() if m.state == "started"]
        keep = max((m.min_machines_running() for m in running), default=0)
        idle = sorted(
            (m for m in running if m.autostop_mode() and not m.pending),
            key=lambda m: m.last_request_at,
        )
        for machine in idle:
            if len(running) <= keep:
                break
            idle_since = max(machine.last_request_at, machine.started_at or 0.0)
            if now - idle_since < idle_limit:
                continue
            stop_at = idle_since + idle_limit
            final = "suspended" if machine.autostop_mode() == "suspend" else "stopped"
            machine.set_state(final, stop_at, "exit", "flyproxy")
            running.remove(machine)

    def new_machine_id(self) -> str:
        existing = {m for a in self.apps.values() for m in a.machines}
        while True:
            candidate = secrets.token_hex(7)
            if candidate not in existing:
                return candidate

    def new_volume_id(self) -> str:
        existing = {v for a in self.apps.values() for v in a.volumes}
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        while True:
            candidate = "vol_" + "".join(secrets.choice(alphabet) for _ in range(16))
            if candidate not in existing:
                return candidate

    def new_private_ip(self) -> str:
        self._ip_counter += 1
        return f"fdaa:0:{self._ip_counter >> 16:x}:a7b:{self._ip_counter & 0xFFFF:x}:1:2:3"

    def new_public_ip(self, kind: str) -> tuple[str, bool]:
        self._ip_counter += 1
        n = self._ip_counter
        if kind == "shared_v4":
            return f"66.241.124.{n % 250 + 1}", True
        if kind == "v4":
            return f"137.66.{(n >> 8) % 256}.{n % 256}", False
        if kind == "private_v6":
            return f"fdaa:0:{n:x}:0:1::{n:x}", False
        return f"2a09:8280:1::{n:x}:{secrets.token_hex(2)}", False

    @staticmethod
    def machine_name() -> str:
        number = secrets.randbelow(9000) + 1000
        return f"{secrets.choice(_WORDS_A)}-{secrets.choice(_WORDS_B)}-{number}"
