"""App secrets: `/v1/apps/{app}/secrets`, as Fly's newer Machines API serves them.

    GET    /v1/apps/{app}/secrets              {"secrets": [{"name", "digest", ...}]}
           ?min_version=n                      404 until the secrets reach version n
           ?version=n                          the secrets as of version n (fly-go)
    POST   /v1/apps/{app}/secrets              {"values": {"NAME": "value" | null, ...}}
                                               -> {"secrets": [...], "version": n}
    GET    /v1/apps/{app}/secrets/{name}       {"name", "digest", ...}
    POST   /v1/apps/{app}/secrets/{name}       {"value": "..."} -> {"name", "digest", "version"}
    DELETE /v1/apps/{app}/secrets/{name}       {"version": n}

Values live in this process's memory, and in the state file of a stack that keeps its
world (`flysim.persist`, readable by its owner only). No answer, snapshot or log line
carries one: the API shows names and digests, like Fly's, whose API servers can encrypt
but not decrypt. A machine gets the secrets as they were when it last booted, the way Fly's host
agent injects them at boot; `FlySim.machine_runtime_env` shows that environment to tests.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flysim._http import ApiError, Handler, SimContext, flag, json_body, path_app
from flysim.state import App, iso

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_MAX_VALUE_BYTES = 64 * 1024
_MAX_SECRETS = 500


class _Value:
    """A secret value that does not show itself in reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Value) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


@dataclass(frozen=True)
class _Secret:
    value: _Value
    digest: str
    created_at: float
    updated_at: float

    def to_json(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "digest": self.digest,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


@dataclass(frozen=True)
class _Version:
    number: int
    at: float
    secrets: dict[str, _Secret]


@dataclass
class _AppSecrets:
    versions: list[_Version] = field(default_factory=lambda: [_Version(0, 0.0, {})])

    @property
    def current(self) -> _Version:
        return self.versions[-1]

    def as_of(self, when: float) -> _Version:
        for version in reversed(self.versions):
            if version.at <= when:
                return version
        return self.versions[0]


class SecretVault:
    """The secrets of every app, by app id: a deleted app's secrets go with it."""

    def __init__(self) -> None:
        self._apps: dict[str, _AppSecrets] = {}
        # Keyed, so that a digest of a short value cannot be reversed by guessing.
        self._key = secrets.token_bytes(32)

    def __repr__(self) -> str:
        return f"SecretVault(apps={len(self._apps)})"

    def _of(self, app: App) -> _AppSecrets:
        return self._apps.setdefault(app.id, _AppSecrets())

    def digest(self, value: str) -> str:
        return hashlib.blake2b(value.encode(), key=self._key, digest_size=8).hexdigest()

    def listing(self, app: App, version: int | None = None) -> list[dict[str, Any]]:
        state = self._of(app)
        chosen = state.current
        if version is not None:
            found = [v for v in state.versions if v.number == version]
            if not found:
                raise ApiError(404, f"secrets version {version} not found for app {app.name}")
            chosen = found[0]
        return [chosen.secrets[n].to_json(n) for n in sorted(chosen.secrets)]

    def get(self, app: App, name: str) -> _Secret | None:
        return self._of(app).current.secrets.get(name)

    def version(self, app: App) -> int:
        return self._of(app).current.number

    def update(self, app: App, changes: dict[str, str | None], now: float) -> int:
        """Set (a string) or remove (None) each named secret; a change makes a new version.

        Setting a secret to the value it has, or removing one that is absent, changes
        nothing.
        """
        state = self._of(app)
        current = dict(state.current.secrets)
        changed = False
        for name, value in changes.items():
            old = current.get(name)
            if value is None:
                changed |= current.pop(name, None) is not None
                continue
            wrapped = _Value(value)
            if old is not None and old.value == wrapped:
                continue
            created = old.created_at if old is not None else now
            current[name] = _Secret(wrapped, self.digest(value), created, now)
            changed = True
        if len(current) > _MAX_SECRETS:
            raise ApiError(422, f"an app may have at most {_MAX_SECRETS} secrets")
        if changed:
            state.versions.append(_Version(state.current.number + 1, now, current))
        return state.current.number

    def values_at(
        self, app: App, when: float, *, lag: int = 0, floor: int | None = None
    ) -> dict[str, str]:
        """The values as of `when`: `lag` versions older, but never older than `floor`."""
        state = self._of(app)
        number = state.as_of(when).number - lag
        if floor is not None:
            number = max(number, floor)
        chosen = next((v for v in state.versions if v.number >= number), state.current)
        return {name: s.value.reveal() for name, s in chosen.secrets.items()}

    def to_json(self, apps: list[App]) -> dict[str, Any]:
        """Per app name: the current version and each secret's name and digest."""
        out: dict[str, Any] = {}
        for app in apps:
            state = self._apps.get(app.id)
            if state is None or state.current.number == 0:
                continue
            out[app.name] = {
                "version": state.current.number,
                "secrets": [
                    {"name": n, "digest": s.digest}
                    for n, s in sorted(state.current.secrets.items())
                ],
            }
        return out


class VaultHost(SimContext, Protocol):
    @property
    def secrets(self) -> SecretVault: ...


def machine_runtime_env(sim: VaultHost, app_name: str, machine_id: str) -> dict[str, str]:
    """The environment the machine's process sees: `config.env` with the app's secrets
    as of its last boot laid over it (as of now for a machine that never booted)."""
    app = sim.world.apps.get(app_name)
    if app is None:
        raise KeyError(f"no app {app_name}")
    sim.world.advance(app)
    machine = app.machines.get(machine_id)
    if machine is None:
        raise KeyError(f"no machine {machine_id} in app {app_name}")
    boots = [e.timestamp for e in machine.events if e.status == "starting"]
    booted_at = max(boots) if boots else time.time()
    env = machine.config.get("env") or {}
    secrets = sim.secrets.values_at(
        app, booted_at, lag=machine.secrets_lag, floor=machine.min_secrets_version
    )
    return {**{str(k): str(v) for k, v in env.items()}, **secrets}


def _name(request: Request) -> str:
    name = str(request.path_params["secret_name"])
    if not _NAME_RE.fullmatch(name):
        raise ApiError(400, f"invalid secret name {name[:64]!r}")
    return name


def _version_param(raw: str | None) -> int | None:
    """A secrets version from the query: `version` (fly-go) or `min_version` (the spec)."""
    if not raw:
        return None
    if not raw.isdigit():
        raise ApiError(400, f"invalid version {raw[:32]!r}")
    return int(raw)


def _value(name: str, value: Any) -> str:
    # Messages name the secret, never its value.
    if not isinstance(value, str):
        raise ApiError(400, f"the value of secret {name} must be a string")
    if "\x00" in value:
        raise ApiError(400, f"the value of secret {name} contains a NUL byte")
    if len(value.encode()) > _MAX_VALUE_BYTES:
        raise ApiError(422, f"the value of secret {name} exceeds {_MAX_VALUE_BYTES} bytes")
    return value


class _SecretsApi:
    def __init__(self, sim: VaultHost) -> None:
        self.sim = sim

    @property
    def vault(self) -> SecretVault:
        return self.sim.secrets

    def _app(self, request: Request) -> App:
        return path_app(self.sim.world, request)

    async def list(self, request: Request) -> Response:
        app = self._app(request)
        query = request.query_params
        if flag(query.get("show_secrets")):
            raise ApiError(403, "secret values can only be read from a machine of the app")
        version = _version_param(query.get("version"))
        minimum = _version_param(query.get("min_version"))
        if minimum is not None and minimum > self.vault.version(app):
            raise ApiError(404, f"secrets version {minimum} not found for app {app.name}")
        return JSONResponse({"secrets": self.vault.listing(app, version)})

    async def update(self, request: Request) -> Response:
        app = self._app(request)
        body = await json_body(request)
        values = body.get("values")
        if not isinstance(values, dict) or not values:
            raise ApiError(400, "values must be a non-empty object of secret names to values")
        changes: dict[str, str | None] = {}
        for name, value in values.items():
            if not _NAME_RE.fullmatch(name):
                raise ApiError(400, f"invalid secret name {name[:64]!r}")
            changes[name] = None if value is None else _value(name, value)
        version = self.vault.update(app, changes, time.time())
        return JSONResponse({"secrets": self.vault.listing(app), "version": version})

    async def show(self, request: Request) -> Response:
        app = self._app(request)
        name = _name(request)
        if flag(request.query_params.get("show_secrets")):
            raise ApiError(403, "secret values can only be read from a machine of the app")
        minimum = _version_param(request.query_params.get("min_version"))
        if minimum is not None and minimum > self.vault.version(app):
            raise ApiError(404, f"secrets version {minimum} not found for app {app.name}")
        found = self.vault.get(app, name)
        if found is None:
            raise ApiError(404, f"secret {name} not found for app {app.name}")
        return JSONResponse(found.to_json(name))

    async def set_one(self, request: Request) -> Response:
        app = self._app(request)
        name = _name(request)
        body = await json_body(request)
        version = self.vault.update(app, {name: _value(name, body.get("value"))}, time.time())
        found = self.vault.get(app, name)
        assert found is not None
        return JSONResponse({**found.to_json(name), "version": version}, status_code=201)

    async def delete(self, request: Request) -> Response:
        app = self._app(request)
        name = _name(request)
        if self.vault.get(app, name) is None:
            raise ApiError(404, f"secret {name} not found for app {app.name}")
        return JSONResponse({"version": self.vault.update(app, {name: None}, time.time())})


def secret_routes(sim: VaultHost) -> list[Route]:
    api = _SecretsApi(sim)
    base = "/v1/apps/{app_name}/secrets"
    table: list[tuple[str, Handler, list[str]]] = [
        (base, api.list, ["GET"]),
        (base, api.update, ["POST"]),
        (f"{base}/{{secret_name}}", api.show, ["GET"]),
        (f"{base}/{{secret_name}}", api.set_one, ["POST"]),
        (f"{base}/{{secret_name}}", api.delete, ["DELETE"]),
    ]
    return [Route(path, handler, methods=methods) for path, handler, methods in table]
