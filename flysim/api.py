"""The `/v1` Machines API routes: apps, IP assignments, machines, leases, wait.

Shapes follow the current Machines API spec (`fly-machines-openapi-2026.yml`); where it is
silent, what fly-go and flyctl expect of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flysim._http import ApiError, Handler, SimContext, flag, json_body, path_app, request_org
from flysim.state import GONE_STATES, App, Event, IPAssignment, Lease, Machine, iso, ulid
from flysim.validation import REGION_RE, ConfigError, app_name_error, check_machine_config
from flysim.volumes import check_mounts, volume_routes

LEASE_HEADER = "fly-machine-lease-nonce"
WAIT_STATES = frozenset({"started", "stopped", "destroyed", "suspended", "failed", "settled"})
# What `state=settled` waits for: any state the machine stays in until told otherwise.
SETTLED_STATES = frozenset({"started", "stopped", "suspended", "failed", "destroyed"})
# States a machine that could not run ends in: a wait for anything else gives up on them.
FAILED_STATES = frozenset({"failed", "launch_failed"})
SIGNALS = frozenset(
    {"SIGABRT", "SIGALRM", "SIGFPE", "SIGHUP", "SIGILL", "SIGINT", "SIGKILL", "SIGPIPE",
     "SIGQUIT", "SIGSEGV", "SIGTERM", "SIGTRAP", "SIGUSR1", "SIGUSR2"}
)  # fmt: skip
# States in which a machine runs (or is about to): destroying it needs `force`.
ACTIVE_STATES = frozenset({"started", "starting", "replacing", "updating", "restarting"})
_DEFAULT_REGION = "iad"
_WAIT_POLL_CAP = 0.5
_GO_DURATION_RE = re.compile(r"^(\d+)s$")


def _ok() -> JSONResponse:
    return JSONResponse({"ok": True})


class _Api:
    def __init__(self, sim: SimContext) -> None:
        self.sim = sim

    # ------------------------------------------------------------------ lookups

    def _app(self, request: Request) -> App:
        return path_app(self.sim.world, request)

    def _machine(self, request: Request) -> tuple[App, Machine]:
        app = self._app(request)
        machine_id = request.path_params["machine_id"]
        machine = app.machines.get(machine_id)
        if machine is None:
            raise ApiError(404, f"machine not found: {machine_id}")
        return app, machine

    def _check_lease(self, request: Request, machine: Machine) -> None:
        """Mutations of a leased machine need the holder's nonce."""
        lease = machine.active_lease(time.time())
        if lease is not None and request.headers.get(LEASE_HEADER) != lease.nonce:
            self.sim.stats.lease_conflicts += 1
            raise ApiError(
                409,
                f"machine {machine.id} is currently leased by {lease.owner}; "
                f"send the lease nonce in the {LEASE_HEADER} header",
            )

    def _json(self, machine: Machine) -> dict[str, Any]:
        return machine.to_json(self.sim.config, time.time())

    def _check_capacity(self, region: str) -> None:
        if region in self.sim.config.full_regions:
            raise ApiError(
                503,
                f"insufficient resources to create new machine in region {region}: "
                "no host has capacity",
                {"error": "out of capacity", "status": "insufficient_capacity"},
            )

    def _min_secrets_version(self, app: App, body: dict[str, Any], machine: Machine) -> None:
        """Take `min_secrets_version` from a create or update: a version the app's secrets
        have not reached is refused; without one, the `stale_secrets` fault makes the
        machine boot with the secrets of before their last change."""
        wanted = body.get("min_secrets_version")
        vault = getattr(self.sim, "secrets", None)
        current = vault.version(app) if vault is not None else 0
        if wanted is not None:
            if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 0:
                raise ApiError(400, "min_secrets_version must be a non-negative integer")
            if wanted > current:
                raise ApiError(
                    400,
                    f"min_secrets_version {wanted} is newer than the secrets of app "
                    f"{app.name} (version {current})",
                )
        machine.min_secrets_version = wanted
        machine.secrets_lag = 1 if wanted is None and self.sim.config.faults.stale_secrets else 0

    def _new_lease(self, machine: Machine, org: str, ttl: float, description: str) -> Lease:
        lease = Lease(
            nonce=secrets.token_hex(6),
            owner=f"{org}@flysim.local",
            description=description,
            expires_at=time.time() + ttl,
        )
        machine.lease = lease
        return lease

    # --------------------------------------------------------------------- apps

    async def apps_list(self, request: Request) -> Response:
        org = request_org(request)
        slug = request.query_params.get("org_slug")
        if not slug:
            raise ApiError(400, "org_slug is required")
        if slug != org:
            raise ApiError(403, f"not authorized to list apps of organization {slug}")
        apps = [a for a in self.sim.world.apps.values() if a.org == org]
        for app in apps:
            self.sim.world.advance(app)
        listed = [
            {"id": a.id, "name": a.name, "machine_count": len(a.live_machines())} for a in apps
        ]
        return JSONResponse({"total_apps": len(listed), "apps": listed})

    async def apps_create(self, request: Request) -> Response:
        org = request_org(request)
        body = await json_body(request)
        # The current API takes `name`; the 2023 spec's `app_name` is no longer read.
        name = body.get("name")
        if name is None:
            raise ApiError(400, "name is required")
        problem = app_name_error(name)
        if problem:
            raise ApiError(400, problem)
        assert isinstance(name, str)
        slug = body.get("org_slug") or org
        if slug != org:
            raise ApiError(403, f"not authorized to create apps in organization {slug}")
        if name in self.sim.world.apps:
            raise ApiError(
                422,
                "Validation failed: Name has already been taken",
                {"error": "Validation failed: Name has already been taken", "status": "name_taken"},
            )
        app = App(
            id=secrets.token_hex(10),
            name=name,
            org=org,
            network=str(body.get("network") or "default"),
            created_at=time.time(),
        )
        self.sim.world.apps[name] = app
        return JSONResponse(
            {**app.to_json(), "created_at": int(app.created_at * 1000)}, status_code=201
        )

    async def apps_show(self, request: Request) -> Response:
        return JSONResponse(self._app(request).to_json())

    async def apps_delete(self, request: Request) -> Response:
        app = self._app(request)
        now = time.time()
        for machine in app.machines.values():
            if machine.state != "destroyed":
                machine.pending = []
                machine.lease = None
                machine.set_state("destroyed", now, "destroy")
        del self.sim.world.apps[app.name]
        return Response(status_code=202)

    # ---------------------------------------------------------- IP assignments

    async def ips_list(self, request: Request) -> Response:
        app = self._app(request)
        return JSONResponse({"ips": [ip.to_json() for ip in app.ips]})

    async def ips_create(self, request: Request) -> Response:
        app = self._app(request)
        body = await json_body(request)
        kind = body.get("type")
        if kind not in {"v6", "v4", "shared_v4", "private_v6"}:
            raise ApiError(400, "type must be one of v6, v4, shared_v4, private_v6")
        if kind == "shared_v4" and any(ip.shared for ip in app.ips):
            raise ApiError(422, "app already has a shared IPv4 address")
        address, shared = self.sim.world.new_public_ip(str(kind))
        ip = IPAssignment(
            ip=address,
            region=str(body.get("region") or "global"),
            service_name=str(body.get("service_name") or ""),
            shared=shared,
            created_at=time.time(),
        )
        app.ips.append(ip)
        return JSONResponse(ip.to_json())

    async def ips_delete(self, request: Request) -> Response:
        app = self._app(request)
        address = request.path_params["ip"]
        remaining = [ip for ip in app.ips if ip.ip != address]
        if len(remaining) == len(app.ips):
            raise ApiError(404, f"ip assignment not found: {address}")
        app.ips = remaining
        return Response(status_code=204)

    # ------------------------------------------------------------------ machines

    async def machines_list(self, request: Request) -> Response:
        app = self._app(request)
        query = request.query_params
        include_deleted = flag(query.get("include_deleted"))
        region = query.get("region")
        wanted_meta = {k[9:]: v for k, v in query.items() if k.startswith("metadata.")}
        listed = []
        for machine in sorted(app.machines.values(), key=lambda m: m.created_at):
            if machine.state in GONE_STATES and not include_deleted:
                continue
            if region and machine.region != region:
                continue
            meta = machine.config.get("metadata") or {}
            if any(meta.get(k) != v for k, v in wanted_meta.items()):
                continue
            listed.append(self._json(machine))
        return JSONResponse(listed)

    async def machines_create(self, request: Request) -> Response:
        app = self._app(request)
        body = await json_body(request)
        try:
            config = check_machine_config(body.get("config"))
        except ConfigError as exc:
            raise ApiError(422, str(exc)) from None
        region = body.get("region") or _DEFAULT_REGION
        if not isinstance(region, str) or not REGION_RE.match(region):
            raise ApiError(422, f"invalid region {region!r}")
        check_mounts(app, config, region, None)
        lease_ttl = body.get("lease_ttl")
        if lease_ttl is not None and (not isinstance(lease_ttl, int) or lease_ttl <= 0):
            raise ApiError(400, "lease_ttl must be a positive number of seconds")
        self._check_capacity(region)
        now = time.time()
        instance = ulid()
        machine = Machine(
            id=self.sim.world.new_machine_id(),
            app=app.name,
            name=str(body.get("name") or self.sim.world.machine_name()),
            region=region,
            config=config,
            instance_id=instance,
            private_ip=self.sim.world.new_private_ip(),
            created_at=now,
            cordoned=bool(body.get("skip_service_registration")),
            versions=[(instance, config)],
        )
        self._min_secrets_version(app, body, machine)
        machine.set_state("created", now, "launch")
        app.machines[machine.id] = machine
        if not body.get("skip_launch"):
            machine.schedule(
                now, machine.boot_steps(self.sim.config, self.sim.config.timing.create_delay)
            )
        result = self._json(machine)
        if lease_ttl:
            result["nonce"] = self._new_lease(machine, request_org(request), lease_ttl, "").nonce
        return JSONResponse(result)

    async def machines_show(self, request: Request) -> Response:
        _, machine = self._machine(request)
        return JSONResponse(self._json(machine))

    async def machines_update(self, request: Request) -> Response:
        app, machine = self._machine(request)
        self._check_lease(request, machine)
        body = await json_body(request)
        if machine.state in GONE_STATES:
            raise ApiError(412, f"machine {machine.id} is {machine.state}")
        try:
            config = check_machine_config(body.get("config"))
        except ConfigError as exc:
            raise ApiError(422, str(exc)) from None
        check_mounts(app, config, machine.region, machine)
        current = body.get("current_version")
        if current and current != machine.instance_id:
            raise ApiError(409, f"machine version mismatch: current is {machine.instance_id}")
        skip_launch = bool(body.get("skip_launch"))
        if not skip_launch:
            self._check_capacity(machine.region)
        self._min_secrets_version(app, body, machine)
        timing = self.sim.config.timing
        now = time.time()
        was = machine.state
        machine.config = config
        machine.instance_id = ulid()
        machine.versions.append((machine.instance_id, config))
        if body.get("skip_service_registration"):
            machine.cordoned = True
        if was in ACTIVE_STATES:
            machine.set_state("replacing", now, "update")
            if skip_launch:
                machine.schedule(now, [(timing.stop_delay, "stopped", "exit")])
            else:
                machine.schedule(now, machine.boot_steps(self.sim.config, timing.stop_delay))
        elif skip_launch:
            machine.set_state("created" if was == "created" else "stopped", now, "update")
        else:
            machine.set_state("updating", now, "update")
            machine.schedule(now, machine.boot_steps(self.sim.config, 0.0))
        result = self._json(machine)
        lease_ttl = body.get("lease_ttl")
        if isinstance(lease_ttl, int) and lease_ttl > 0 and machine.active_lease(now) is None:
            result["nonce"] = self._new_lease(machine, request_org(request), lease_ttl, "").nonce
        return JSONResponse(result)

    async def machines_delete(self, request: Request) -> Response:
        _, machine = self._machine(request)
        self._check_lease(request, machine)
        if machine.state in GONE_STATES:
            raise ApiError(404, f"machine {machine.id} is already {machine.state}")
        force = flag(request.query_params.get("force")) or flag(request.query_params.get("kill"))
        running = machine.state in ACTIVE_STATES
        if running and not force:
            raise ApiError(
                412,
                f"unable to destroy machine {machine.id}: it is {machine.state}; "
                "stop it first or pass force=true",
            )
        now = time.time()
        machine.lease = None
        machine.set_state("destroying", now, "destroy")
        delay = self.sim.config.timing.stop_delay if running else 0.0
        machine.schedule(now, [(delay, "destroyed", "destroy")])
        return _ok()

    async def machines_start(self, request: Request) -> Response:
        _, machine = self._machine(request)
        self._check_lease(request, machine)
        previous = machine.state
        if previous in GONE_STATES:
            raise ApiError(412, f"unable to start machine {machine.id}: it is {previous}")
        if previous not in ACTIVE_STATES:
            self._check_capacity(machine.region)
            now = time.time()
            machine.set_state("starting", now, "start")
            machine.schedule(now, machine.boot_steps(self.sim.config, 0.0)[1:])
        return JSONResponse({"previous_state": previous, "migrated": False, "new_host": ""})

    async def machines_stop(self, request: Request) -> Response:
        _, machine = self._machine(request)
        self._check_lease(request, machine)
        await json_body(request)
        if machine.state in GONE_STATES:
            raise ApiError(412, f"unable to stop machine {machine.id}: it is {machine.state}")
        if machine.state not in {"stopped", "stopping", "suspended"}:
            now = time.time()
            machine.set_state("stopping", now, "stop")
            machine.schedule(now, [(self.sim.config.timing.stop_delay, "stopped", "exit")])
        return _ok()

    async def machines_suspend(self, request: Request) -> Response:
        _, machine = self._machine(request)
        self._check_lease(request, machine)
        if machine.state != "started":
            raise ApiError(412, f"unable to suspend machine {machine.id}: it is {machine.state}")
        now = time.time()
        machine.set_state("suspending", now, "suspend")
        machine.schedule(now, [(self.sim.config.timing.stop_delay, "suspended", "exit")])
        return _ok()

    async def machines_restart(self, request: Request) -> Response:
        _, machine = self._machine(request)
        self._check_lease(request, machine)
        if machine.state != "started":
            raise ApiError(412, f"unable to restart machine {machine.id}: it is {machine.state}")
        timing = self.sim.config.timing
        now = time.time()
        machine.set_state("restarting", now, "restart")
        machine.schedule(now, machine.boot_steps(self.sim.config, timing.stop_delay))
        return _ok()

    async def machines_cordon(self, request: Request) -> Response:
        _, machine = self._machine(request)
        self._check_lease(request, machine)
        machine.cordoned = request.url.path.endswith("/cordon")
        return _ok()

    async def machines_wait(self, request: Request) -> Response:
        """Block until the machine (at `version`, when given) is in one of the `state`s.

        `state` may repeat or list several comma-separated (`settled`: any state the
        machine stays in); `version` supersedes the deprecated `instance_id`. A machine
        that failed, or a version that was replaced, ends the wait with a 400 unless that
        is what was asked for, as flyd answers "machine failed to reach desired state".
        """
        app, machine = self._machine(request)
        query = request.query_params
        targets = {
            part.strip()
            for value in query.getlist("state")
            for part in value.split(",")
            if part.strip()
        } or {"started"}
        unknown = sorted(targets - WAIT_STATES)
        if unknown:
            raise ApiError(400, f"invalid state {unknown[0]!r}: use one of {sorted(WAIT_STATES)}")
        timeout = _wait_timeout(query.get("timeout"))
        version = query.get("version") or query.get("instance_id") or None
        if version and machine.version_of(version) is None:
            raise ApiError(400, f"unknown version {version!r} for machine {machine.id}")
        deadline = time.time() + timeout
        while True:
            now = time.time()
            self.sim.world.advance(app, now)
            reached = _reached(machine, targets, version)
            if reached is not None:
                return JSONResponse(
                    {
                        "ok": True,
                        "state": reached,
                        "version": version or machine.instance_id,
                        "event_id": machine.events[-1].id if machine.events else "",
                    }
                )
            wanted = ", ".join(sorted(targets))
            if version and version != machine.instance_id and targets & {"started", "suspended"}:
                raise ApiError(
                    400,
                    f"machine failed to reach desired state, {wanted}: version {version} of "
                    f"machine {machine.id} was replaced by {machine.instance_id}",
                )
            if machine.state in FAILED_STATES or machine.state == "destroyed":
                raise ApiError(
                    400,
                    f"machine failed to reach desired state, {wanted}: machine {machine.id} "
                    f"is {machine.state}",
                )
            if now >= deadline:
                raise ApiError(
                    408,
                    f"deadline_exceeded: machine {machine.id} did not reach {wanted} "
                    f"within {timeout}s (state: {machine.state})",
                )
            wake = min(deadline, now + _WAIT_POLL_CAP, machine.next_due() or deadline)
            changed = machine.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=max(0.0, wake - now))

    async def machines_ps(self, request: Request) -> Response:
        """The machine's processes: the image's command while it runs, nothing otherwise."""
        _, machine = self._machine(request)
        if machine.state != "started":
            return JSONResponse([])
        init = machine.config.get("init") or {}
        argv = init.get("exec") or [*(init.get("entrypoint") or []), *(init.get("cmd") or [])]
        command = " ".join(argv) or "node .output/server/index.mjs"
        ports = [
            {"address": f"0.0.0.0:{s.get('internal_port')}", "proto": "tcp"}
            for s in machine.services()
            if s.get("internal_port")
        ]
        uptime = max(0, int(time.time() - (machine.started_at or time.time())))
        processes = [
            {"pid": 1, "command": "/.fly/init", "directory": "/", "cpu": 0, "rss": 1_900_000,
             "rtime": uptime, "stime": 0, "listen_sockets": []},
            {"pid": 312, "command": command, "directory": "/app", "cpu": 1, "rss": 48_000_000,
             "rtime": uptime, "stime": 0, "listen_sockets": ports},
        ]  # fmt: skip
        sort_by = request.query_params.get("sort_by")
        if sort_by in {"pid", "cpu", "rss", "rtime", "stime"}:
            reverse = request.query_params.get("order", "asc").lower() == "desc"
            processes.sort(key=lambda p: int(str(p[sort_by])), reverse=reverse)
        return JSONResponse(processes)

    async def machines_signal(self, request: Request) -> Response:
        """Send a signal to the machine's process: SIGKILL and SIGTERM end it (the machine
        stops), any other is only delivered."""
        _, machine = self._machine(request)
        self._check_lease(request, machine)
        body = await json_body(request)
        signal = body.get("signal")
        if signal not in SIGNALS:
            raise ApiError(400, f"invalid signal {signal!r}: use one of {sorted(SIGNALS)}")
        if machine.state != "started":
            raise ApiError(412, f"unable to signal machine {machine.id}: it is {machine.state}")
        machine.last_signal = str(signal)
        now = time.time()
        machine.events.append(Event("signal", machine.state, "user", now))
        if signal in {"SIGKILL", "SIGTERM"}:
            machine.set_state("stopping", now, "stop")
            machine.schedule(now, [(self.sim.config.timing.stop_delay, "stopped", "exit")])
        return Response(status_code=200)

    # -------------------------------------------------------------------- leases

    async def lease_create(self, request: Request) -> Response:
        _, machine = self._machine(request)
        body = await json_body(request)
        ttl_raw = body.get("ttl", request.query_params.get("ttl"))
        try:
            ttl = (
                float(ttl_raw) if ttl_raw is not None else self.sim.config.timing.lease_default_ttl
            )
        except (TypeError, ValueError):
            raise ApiError(400, f"invalid ttl {ttl_raw!r}") from None
        if ttl <= 0:
            raise ApiError(400, "ttl must be positive")
        now = time.time()
        lease = machine.active_lease(now)
        nonce = request.headers.get(LEASE_HEADER)
        if lease is not None:
            if nonce != lease.nonce:
                self.sim.stats.lease_conflicts += 1
                message = (
                    f"lease currently held by {lease.owner}, expires at {iso(lease.expires_at)}"
                )
                raise ApiError(409, message, {"status": "error", "message": message})
            lease.expires_at = now + ttl
        else:
            lease = self._new_lease(
                machine, request_org(request), ttl, str(body.get("description") or "")
            )
        # The spec documents a bare Lease with 201; the live API wraps it, as fly-go reads it.
        return JSONResponse({"status": "success", "data": lease.to_json()}, status_code=201)

    async def lease_show(self, request: Request) -> Response:
        _, machine = self._machine(request)
        lease = machine.active_lease(time.time())
        if lease is None:
            raise ApiError(404, f"no active lease for machine {machine.id}")
        return JSONResponse({"status": "success", "data": lease.to_json()})

    async def lease_release(self, request: Request) -> Response:
        _, machine = self._machine(request)
        lease = machine.active_lease(time.time())
        if lease is None:
            raise ApiError(404, f"no active lease for machine {machine.id}")
        if request.headers.get(LEASE_HEADER) != lease.nonce:
            self.sim.stats.lease_conflicts += 1
            raise ApiError(409, "lease nonce does not match the current lease")
        machine.lease = None
        return _ok()

    # ------------------------------------------------------ metadata, versions

    async def metadata_show(self, request: Request) -> Response:
        _, machine = self._machine(request)
        return JSONResponse(dict(machine.config.get("metadata") or {}))

    async def metadata_get_key(self, request: Request) -> Response:
        _, machine = self._machine(request)
        key = request.path_params["key"]
        metadata = machine.config.get("metadata") or {}
        if key not in metadata:
            raise ApiError(404, f"metadata key {key!r} not found on machine {machine.id}")
        return JSONResponse({"value": metadata[key]})

    async def metadata_update(self, request: Request) -> Response:
        """Replace the machine's metadata whole (PATCH; PUT is its deprecated form)."""
        _, machine = self._machine(request)
        self._check_lease(request, machine)
        body = await json_body(request)
        metadata = body.get("metadata")
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ApiError(400, 'body must be {"metadata": {"<key>": "<string>", ...}}')
        expected = body.get("machine_version")
        if expected and expected != machine.instance_id:
            raise ApiError(412, f"machine version mismatch: current is {machine.instance_id}")
        machine.config = {**machine.config, "metadata": dict(metadata)}
        return Response(status_code=204)

    async def metadata_set(self, request: Request) -> Response:
        _, machine = self._machine(request)
        self._check_lease(request, machine)
        body = await json_body(request)
        value = body.get("value")
        if not isinstance(value, str):
            raise ApiError(400, 'body must be {"value": "<string>"}')
        metadata = dict(machine.config.get("metadata") or {})
        metadata[request.path_params["key"]] = value
        machine.config = {**machine.config, "metadata": metadata}
        return Response(status_code=204)

    async def metadata_delete(self, request: Request) -> Response:
        _, machine = self._machine(request)
        self._check_lease(request, machine)
        metadata = dict(machine.config.get("metadata") or {})
        metadata.pop(request.path_params["key"], None)
        machine.config = {**machine.config, "metadata": metadata}
        return Response(status_code=204)

    async def versions(self, request: Request) -> Response:
        _, machine = self._machine(request)
        return JSONResponse(
            [{"version": v, "user_config": c} for v, c in reversed(machine.versions)]
        )

    async def events(self, request: Request) -> Response:
        _, machine = self._machine(request)
        events = [e.to_json() for e in reversed(machine.events)]
        raw = request.query_params.get("limit")
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise ApiError(400, f"invalid limit {raw[:16]!r}: a positive number")
            events = events[: int(raw)]
        return JSONResponse(events)


def _wait_timeout(raw: str | None) -> int:
    if raw is None or raw == "":
        return 60
    match = _GO_DURATION_RE.match(raw)
    try:
        value = int(match.group(1) if match else raw)
    except ValueError:
        raise ApiError(400, f"invalid timeout {raw!r}: seconds between 1 and 60") from None
    if not 1 <= value <= 60:
        raise ApiError(400, f"invalid timeout {value}: must be between 1 and 60 seconds")
    return value


def _reached(machine: Machine, targets: set[str], version: str | None) -> str | None:
    """The state of `targets` the machine (at `version`) is in, or None."""
    if version is None or version == machine.instance_id:
        state = machine.state
        if state in targets:
            return state
        if "settled" in targets and state in SETTLED_STATES:
            return state
        return None
    # An older version is gone once replaced: it is stopped and destroyed for good.
    for state in ("stopped", "destroyed", "settled"):
        if state in targets:
            return "replaced" if state == "settled" else state
    return None


def api_routes(sim: SimContext) -> list[Route]:
    api = _Api(sim)
    m = "/v1/apps/{app_name}/machines/{machine_id}"
    table: list[tuple[str, Handler, list[str]]] = [
        ("/v1/apps", api.apps_list, ["GET"]),
        ("/v1/apps", api.apps_create, ["POST"]),
        ("/v1/apps/{app_name}", api.apps_show, ["GET"]),
        ("/v1/apps/{app_name}", api.apps_delete, ["DELETE"]),
        ("/v1/apps/{app_name}/ip_assignments", api.ips_list, ["GET"]),
        ("/v1/apps/{app_name}/ip_assignments", api.ips_create, ["POST"]),
        ("/v1/apps/{app_name}/ip_assignments/{ip}", api.ips_delete, ["DELETE"]),
        ("/v1/apps/{app_name}/machines", api.machines_list, ["GET"]),
        ("/v1/apps/{app_name}/machines", api.machines_create, ["POST"]),
        (m, api.machines_show, ["GET"]),
        (m, api.machines_update, ["POST"]),
        (m, api.machines_delete, ["DELETE"]),
        (f"{m}/start", api.machines_start, ["POST"]),
        (f"{m}/stop", api.machines_stop, ["POST"]),
        (f"{m}/suspend", api.machines_suspend, ["POST"]),
        (f"{m}/restart", api.machines_restart, ["POST"]),
        (f"{m}/cordon", api.machines_cordon, ["POST"]),
        (f"{m}/uncordon", api.machines_cordon, ["POST"]),
        (f"{m}/wait", api.machines_wait, ["GET"]),
        (f"{m}/ps", api.machines_ps, ["GET"]),
        (f"{m}/signal", api.machines_signal, ["POST"]),
        (f"{m}/lease", api.lease_create, ["POST"]),
        (f"{m}/lease", api.lease_show, ["GET"]),
        (f"{m}/lease", api.lease_release, ["DELETE"]),
        (f"{m}/metadata", api.metadata_show, ["GET"]),
        (f"{m}/metadata", api.metadata_update, ["PATCH", "PUT"]),
        (f"{m}/metadata/{{key}}", api.metadata_get_key, ["GET"]),
        (f"{m}/metadata/{{key}}", api.metadata_set, ["POST"]),
        (f"{m}/metadata/{{key}}", api.metadata_delete, ["DELETE"]),
        (f"{m}/versions", api.versions, ["GET"]),
        (f"{m}/events", api.events, ["GET"]),
    ]
    routes = [Route(path, handler, methods=methods) for path, handler, methods in table]
    return routes + volume_routes(sim)
