"""The Machines API client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from types import TracebackType
from typing import Any, Literal, Self, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from flyapi._errors import (
    FlyAPIError,
    FlyNotFound,
    FlyRetryableError,
    FlyTransportError,
    error_from_response,
)
from flyapi._models import (
    App,
    AppSecret,
    DeployToken,
    IPAssignment,
    Lease,
    LogEntry,
    LogPage,
    Machine,
    MachineEvent,
    Volume,
)
from flyapi._ratelimit import RateLimiter
from flyapi._retry import RequestRetry

logger = logging.getLogger("flyapi")

TokenSource = Callable[[], Awaitable[str]] | str
# Told (method, status code) of every response, e.g. to count them in a metric.
ResponseHook = Callable[[str, int], None]
# Called while a request waits to be sent again, with a line saying why; again at least
# every WAIT_TICK seconds of a long wait.
WaitHook = Callable[[str], None]
WAIT_TICK = 1.0
IPType = Literal["v4", "v6", "shared_v4", "private_v6"]
# `settled`: any state the machine stays in until told otherwise (started, stopped,
# suspended, failed, destroyed).
WaitState = Literal["started", "stopped", "destroyed", "suspended", "failed", "settled"]

DEFAULT_USER_AGENT = "turbodeploy-flyapi/0.1"
# The Machines API's public base, and the web API that serves an app's logs beside it.
MACHINES_API_BASE_URL = "https://api.machines.dev/v1"
WEB_API_BASE_URL = "https://api.fly.io"
LEASE_NONCE_HEADER = "fly-machine-lease-nonce"
# The server caps a wait at 60 s and rejects anything below a second.
_WAIT_MIN_SECONDS = 1
_WAIT_MAX_SECONDS = 60
# A pooled keep-alive connection the server has closed fails the next request without it
# ever reaching the server; for a GET one immediate second attempt is always safe.
_GET_ATTEMPTS_ON_DROP = 2
_DROPPED = (httpx.RemoteProtocolError, httpx.ReadError)

_M = TypeVar("_M", bound=BaseModel)


def _seg(value: str) -> str:
    return quote(value, safe="")


class FlyClient:
    """An async client of the Fly Machines API, one connection pool per instance.

    `token` is either the token itself or an async callable returning it; the callable is
    awaited before every request, so a rotated token is picked up without a new client.
    The token only ever travels in the `Authorization` header: it is not part of any
    exception, repr or log line.

    By default the client does not retry (callers own their retry policy), with one
    exception: a GET whose connection was dropped before any response is sent once more,
    immediately. With `retry`, every idempotent request that meets a retryable error
    (408, 429, 5xx, network) is sent again with backoff, honouring `Retry-After`; a 409
    (lease held, version mismatch) and machine creates are always left to the caller.
    """

    def __init__(
        self,
        base_url: str,
        token: TokenSource,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        rate_limiter: RateLimiter | None = None,
        user_agent: str = DEFAULT_USER_AGENT,
        on_response: ResponseHook | None = None,
        on_wait: WaitHook | None = None,
        retry: RequestRetry | None = None,
        max_connections: int = 20,
        max_waiting: int = 100,
        web_base_url: str | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        # Logs are served by the web API (api.fly.io), not the Machines API.
        self._web_base_url = (web_base_url or web_base_url_for(self._base_url)).rstrip("/")
        self._retry = retry
        self._on_response = on_response
        self._on_wait = on_wait
        self._token = token
        self._timeout = timeout
        self._limiter = rate_limiter

        def client(connections: int) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=self._base_url,
                transport=transport,
                timeout=timeout,
                headers={"User-Agent": user_agent, "Accept": "application/json"},
                follow_redirects=False,
                # Every connection is kept alive: closing the surplus churns TLS handshakes.
                limits=httpx.Limits(
                    max_connections=connections, max_keepalive_connections=connections
                ),
            )

        # Two pools. Server-side waits hold a connection for up to a minute each, so they
        # get as many as deploys may wait at once; every other call is short and shares a
        # small pool, because httpx scans its whole pool on every request and response
        # (with 200 connections that scan was the worker's largest cost: BENCHMARKS.md).
        self._http = client(max_connections)
        self._waits = self._http if transport is not None else client(max_waiting)

    def __repr__(self) -> str:
        return f"FlyClient(base_url={self._base_url!r})"

    def retry_delay(self, exc: FlyRetryableError | FlyTransportError, attempt: int) -> float | None:
        """Seconds before sending again a request that failed with `exc` on its `attempt`,
        or None to give up: this client's retry rule for idempotent requests. A caller that
        makes a request idempotent itself (a create looked up by its marker) follows it too.
        A 409 (lease held, version mismatch) is never retried here."""
        if self._retry is None:
            return None
        if isinstance(exc, FlyRetryableError):
            if exc.status_code == 409:
                return None
            return self._retry.delay(attempt, exc.retry_after)
        return self._retry.delay(attempt, None)

    async def pause(self, seconds: float, why: str) -> None:
        """Sleep before sending a request again, telling the `on_wait` hook why as it goes.

        The worker's hook heartbeats the running activity: a Retry-After of 30 s must not
        look like a hung activity to a 10 s heartbeat timeout, and the heartbeat is what
        `turbodeploy status` shows a person watching the deploy wait.
        """
        end = asyncio.get_running_loop().time() + seconds
        while True:
            self._waiting(why)
            left = end - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.sleep(min(left, WAIT_TICK))

    def _waiting(self, why: str) -> None:
        if self._on_wait is not None:
            try:
                self._on_wait(why)
            except Exception:
                logger.exception("on_wait hook failed")

    def _waiting_for_budget(self) -> None:
        self._waiting("waiting for the Fly API request budget")

    def _waiting_for_lease_room(self) -> None:
        self._waiting("waiting for room in the Fly API request budget to lease a machine")

    @property
    def base_url(self) -> str:
        return self._base_url

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()
        if self._waits is not self._http:
            await self._waits.aclose()

    # ------------------------------------------------------------------------------ apps

    async def get_app(self, app: str) -> App | None:
        """The app, or None when it does not exist. Any other failure raises."""
        try:
            response = await self._request("GET", f"/apps/{_seg(app)}")
        except FlyNotFound:
            return None
        return self._model(App, response)

    async def create_app(self, name: str, org_slug: str, *, network: str | None = None) -> App:
        # `name`, as the current API and fly-go send it (the 2023 spec called it `app_name`).
        body: dict[str, Any] = {"name": name, "org_slug": org_slug}
        if network:
            body["network"] = network
        response = await self._request("POST", "/apps", json=body)
        # The 2023 spec documents an empty 201, the current one {id, created_at}; servers
        # also return the whole app.
        data = self._json_or_none(response)
        if isinstance(data, dict) and data.get("name"):
            return self._validate(App, data, response)
        return App(name=name, organization={"slug": org_slug})  # type: ignore[arg-type]

    async def delete_app(self, app: str) -> None:
        await self._request("DELETE", f"/apps/{_seg(app)}")

    async def release_ip_assignment(self, app: str, ip: str) -> bool:
        """Release the address; False when the app no longer had it."""
        try:
            await self._request("DELETE", f"/apps/{_seg(app)}/ip_assignments/{_seg(ip)}")
        except FlyNotFound:
            return False
        return True

    async def list_ip_assignments(self, app: str) -> list[IPAssignment]:
        response = await self._request("GET", f"/apps/{_seg(app)}/ip_assignments")
        data = self._json(response)
        ips = data.get("ips") if isinstance(data, dict) else data
        return [self._validate(IPAssignment, ip, response) for ip in ips or []]

    async def assign_ip(
        self,
        app: str,
        type: IPType,
        *,
        region: str | None = None,
        org_slug: str | None = None,
        network: str | None = None,
        service_name: str | None = None,
    ) -> IPAssignment:
        body: dict[str, Any] = {"type": type}
        for key, value in (
            ("region", region),
            ("org_slug", org_slug),
            ("network", network),
            ("service_name", service_name),
        ):
            if value is not None:
                body[key] = value
        response = await self._request("POST", f"/apps/{_seg(app)}/ip_assignments", json=body)
        return self._model(IPAssignment, response)

    # --------------------------------------------------------------------------- volumes

    async def create_volume(
        self,
        app: str,
        name: str,
        region: str,
        size_gb: int,
        *,
        encrypted: bool | None = None,
        snapshot_retention: int | None = None,
        auto_backup_enabled: bool | None = None,
        require_unique_zone: bool | None = None,
        fstype: str | None = None,
        compute: Mapping[str, Any] | None = None,
    ) -> Volume:
        """Create a volume named `name` (not unique: an app may hold several of one name).

        Not idempotent: after a 408, a 5xx or a transport error the volume may exist;
        list the app's volumes before creating again.
        """
        body: dict[str, Any] = {"name": name, "region": region, "size_gb": int(size_gb)}
        for key, value in (
            ("encrypted", encrypted),
            ("snapshot_retention", snapshot_retention),
            ("auto_backup_enabled", auto_backup_enabled),
            ("require_unique_zone", require_unique_zone),
            ("fstype", fstype),
            ("compute", dict(compute) if compute is not None else None),
        ):
            if value is not None:
                body[key] = value
        response = await self._request(
            "POST", f"/apps/{_seg(app)}/volumes", json=body, idempotent=False
        )
        return self._model(Volume, response)

    async def list_volumes(self, app: str, *, include_destroyed: bool = False) -> list[Volume]:
        """The app's volumes; those being destroyed only with `include_destroyed` (as
        fly-go's GetVolumes and GetAllVolumes)."""
        response = await self._request("GET", f"/apps/{_seg(app)}/volumes")
        data = self._json(response)
        if not isinstance(data, list):
            raise self._unexpected(response, "expected a list of volumes")
        volumes = [self._validate(Volume, v, response) for v in data]
        return volumes if include_destroyed else [v for v in volumes if not v.gone]

    async def get_volume(self, app: str, volume_id: str) -> Volume:
        response = await self._request("GET", self._volume_path(app, volume_id))
        return self._model(Volume, response)

    async def delete_volume(self, app: str, volume_id: str) -> Volume | None:
        """Destroy a volume. Raises `FlyNotFound` when it does not exist (already gone:
        whether that is fine is the caller's choice). The API refuses a volume attached
        to a machine that is not destroyed."""
        response = await self._request("DELETE", self._volume_path(app, volume_id))
        data = self._json_or_none(response)
        return self._validate(Volume, data, response) if isinstance(data, dict) else None

    async def extend_volume(self, app: str, volume_id: str, size_gb: int) -> tuple[Volume, bool]:
        """Grow a volume to `size_gb`; returns it and whether its machine needs a restart."""
        response = await self._request(
            "PUT", self._volume_path(app, volume_id, "extend"), json={"size_gb": int(size_gb)}
        )
        data = self._json(response)
        if not isinstance(data, dict) or not isinstance(data.get("volume"), dict):
            raise self._unexpected(response, "expected {volume, needs_restart}")
        volume = self._validate(Volume, data["volume"], response)
        return volume, bool(data.get("needs_restart"))

    @staticmethod
    def _volume_path(app: str, volume_id: str, *rest: str) -> str:
        path = f"/apps/{_seg(app)}/volumes/{_seg(volume_id)}"
        for part in rest:
            path += f"/{_seg(part)}"
        return path

    # -------------------------------------------------------------------------- machines

    async def list_machines(
        self, app: str, *, include_deleted: bool = False, region: str | None = None
    ) -> list[Machine]:
        params: dict[str, str] = {}
        if include_deleted:
            params["include_deleted"] = "true"
        if region:
            params["region"] = region
        response = await self._request("GET", f"/apps/{_seg(app)}/machines", params=params)
        data = self._json(response)
        if not isinstance(data, list):
            raise self._unexpected(response, "expected a list of machines")
        return [self._validate(Machine, m, response) for m in data]

    async def get_machine(self, app: str, machine_id: str) -> Machine:
        response = await self._request("GET", self._machine_path(app, machine_id))
        return self._model(Machine, response)

    async def create_machine(
        self,
        app: str,
        config: Mapping[str, Any],
        region: str,
        *,
        lease_ttl: int | None = None,
        skip_launch: bool = False,
        name: str | None = None,
        skip_service_registration: bool = False,
        min_secrets_version: int | None = None,
    ) -> Machine:
        """Create (and, unless `skip_launch`, start) a machine.

        Not idempotent: after a 408, a 5xx or a transport error the machine may exist.
        With `lease_ttl` the machine comes back leased and `Machine.nonce` holds the nonce.
        With `skip_service_registration` the proxy routes nothing to it until it is
        uncordoned. With `min_secrets_version` (what `set_secrets` returned) it boots with
        the app's secrets of that version or later, never older ones.
        """
        body: dict[str, Any] = {"config": dict(config), "region": region}
        if min_secrets_version is not None:
            body["min_secrets_version"] = int(min_secrets_version)
        if lease_ttl is not None:
            body["lease_ttl"] = int(lease_ttl)
        if skip_launch:
            body["skip_launch"] = True
        if skip_service_registration:
            body["skip_service_registration"] = True
        if name:
            body["name"] = name
        response = await self._request(
            "POST", f"/apps/{_seg(app)}/machines", json=body, idempotent=False
        )
        return self._model(Machine, response)

    async def update_machine(
        self,
        app: str,
        machine_id: str,
        config: Mapping[str, Any],
        region: str | None,
        *,
        nonce: str | None,
        skip_launch: bool = False,
        min_secrets_version: int | None = None,
        current_version: str | None = None,
    ) -> Machine:
        """Replace the machine's config whole; the result carries the new `version`.

        With `min_secrets_version` the machine boots with the app's secrets of that
        version or later. With `current_version` the update is refused (409) when the
        machine is no longer at that version: nothing changed since it was read."""
        body: dict[str, Any] = {"config": dict(config)}
        if current_version:
            body["current_version"] = current_version
        if min_secrets_version is not None:
            body["min_secrets_version"] = int(min_secrets_version)
        if region:
            body["region"] = region
        if skip_launch:
            body["skip_launch"] = True
        response = await self._request(
            "POST", self._machine_path(app, machine_id), json=body, nonce=nonce
        )
        return self._model(Machine, response)

    async def start_machine(self, app: str, machine_id: str, *, nonce: str | None = None) -> None:
        await self._request("POST", self._machine_path(app, machine_id, "start"), nonce=nonce)

    async def stop_machine(
        self,
        app: str,
        machine_id: str,
        *,
        signal: str | None = None,
        stop_timeout: str | None = None,
        nonce: str | None = None,
    ) -> None:
        """Stop the machine: `signal` (default SIGINT), then SIGKILL after `stop_timeout`
        (a Go duration such as "30s")."""
        body = {k: v for k, v in (("signal", signal), ("timeout", stop_timeout)) if v is not None}
        await self._request(
            "POST", self._machine_path(app, machine_id, "stop"), json=body or None, nonce=nonce
        )

    async def delete_machine(
        self, app: str, machine_id: str, *, force: bool = False, nonce: str | None = None
    ) -> None:
        params = {"force": "true"} if force else None
        await self._request(
            "DELETE", self._machine_path(app, machine_id), params=params, nonce=nonce
        )

    async def wait_machine(
        self,
        app: str,
        machine_id: str,
        state: WaitState | Collection[WaitState] = "started",
        *,
        version: str | None = None,
        instance_id: str | None = None,
        timeout: float = 60,  # noqa: ASYNC109 - the server-side wait, sent to the API
    ) -> str | None:
        """Block server-side until the machine (at `version`) is in `state`, or in one of
        several states: the state it reached, or None on timeout.

        `timeout` is clamped to the 1..60 s the server allows; loop for longer waits.
        `instance_id` is the deprecated name of `version`; both go out as `version`. A
        machine that failed or a version that was replaced answers 400 (`FlyBadRequest`)
        unless `failed` or `settled` was asked for.
        """
        seconds = min(max(math.ceil(timeout), _WAIT_MIN_SECONDS), _WAIT_MAX_SECONDS)
        states = [state] if isinstance(state, str) else list(dict.fromkeys(state))
        # Repeated, as fly-go sends several states.
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("state", s) for s in states or ["started"]
        ]
        params.append(("timeout", str(seconds)))
        if version or instance_id:
            params.append(("version", str(version or instance_id)))
        try:
            response = await self._request(
                "GET",
                self._machine_path(app, machine_id, "wait"),
                params=httpx.QueryParams(params),
                read_timeout=self._timeout + seconds,
            )
        except FlyAPIError as exc:
            if exc.status_code == 408:
                return None
            raise
        data = self._json_or_none(response)
        reached = data.get("state") if isinstance(data, dict) else None
        # Older servers answer {"ok": true} alone: then it is the one state asked for.
        return reached if isinstance(reached, str) and reached else (states or ["started"])[0]

    async def list_machine_events(
        self, app: str, machine_id: str, *, limit: int | None = None
    ) -> list[MachineEvent]:
        """The machine's events, newest first (the API returns 20 unless `limit`, at most
        50)."""
        params = {"limit": str(limit)} if limit is not None else None
        response = await self._request(
            "GET", self._machine_path(app, machine_id, "events"), params=params
        )
        data = self._json(response)
        if not isinstance(data, list):
            raise self._unexpected(response, "expected a list of events")
        return [self._validate(MachineEvent, e, response) for e in data]

    async def cordon_machine(self, app: str, machine_id: str, *, nonce: str | None = None) -> None:
        await self._request("POST", self._machine_path(app, machine_id, "cordon"), nonce=nonce)

    async def uncordon_machine(
        self, app: str, machine_id: str, *, nonce: str | None = None
    ) -> None:
        await self._request("POST", self._machine_path(app, machine_id, "uncordon"), nonce=nonce)

    async def set_metadata(
        self, app: str, machine_id: str, key: str, value: str, *, nonce: str | None = None
    ) -> None:
        await self._request(
            "POST",
            self._machine_path(app, machine_id, "metadata", key),
            json={"value": value},
            nonce=nonce,
        )

    # ---------------------------------------------------------------------------- leases

    async def acquire_lease(
        self,
        app: str,
        machine_id: str,
        ttl: int,
        *,
        nonce: str | None = None,
        description: str | None = None,
    ) -> Lease:
        """Take the machine's lease for `ttl` seconds, or extend ours when `nonce` is given.

        A lease held by someone else is a 409 (`FlyRetryableError`).
        """
        body: dict[str, Any] = {"ttl": int(ttl)}
        if description:
            body["description"] = description
        limiter, machine = self._limiter, (app, machine_id)
        new = nonce is None
        if limiter is not None and new:
            # Room for its refreshes in the budget first (RateLimiter, "Leases").
            await limiter.lease(
                machine,
                ttl,
                on_wait=self._waiting_for_lease_room if self._on_wait is not None else None,
                tick=WAIT_TICK,
            )
        try:
            response = await self._request(
                "POST", self._machine_path(app, machine_id, "lease"), json=body, nonce=nonce
            )
            lease = self._lease(response)
            if not lease.nonce:
                raise self._unexpected(response, "expected a lease with a nonce")
        except BaseException:
            if limiter is not None and new:
                limiter.released(machine)  # not taken
            raise
        if limiter is not None and not new:
            limiter.renewed(machine, ttl)
        return lease

    async def get_lease(self, app: str, machine_id: str) -> Lease | None:
        """The machine's current lease (who holds it, until when); None when it has none."""
        try:
            response = await self._request("GET", self._machine_path(app, machine_id, "lease"))
        except FlyNotFound:
            return None
        return self._lease(response)

    def _lease(self, response: httpx.Response) -> Lease:
        data = self._json(response)
        # The spec documents a bare Lease; the live API wraps it as {"status", "data"}.
        if isinstance(data, dict) and isinstance(data.get("data"), dict):
            data = data["data"]
        return self._validate(Lease, data, response)

    async def release_lease(self, app: str, machine_id: str, nonce: str) -> None:
        """Release our lease; a lease (or machine) that is already gone is not an error."""
        with contextlib.suppress(FlyNotFound):
            await self._request("DELETE", self._machine_path(app, machine_id, "lease"), nonce=nonce)
        if self._limiter is not None:
            self._limiter.released((app, machine_id))

    # --------------------------------------------------------------------------- secrets

    async def list_secrets(self, app: str) -> list[AppSecret]:
        """The app's secrets by name and digest: the API does not return their values."""
        response = await self._request("GET", f"/apps/{_seg(app)}/secrets")
        data = self._json(response)
        listed = data.get("secrets") if isinstance(data, dict) else data
        if not isinstance(listed, list):
            raise self._unexpected(response, "expected a list of secrets")
        return [self._validate(AppSecret, s, response) for s in listed]

    async def set_secrets(self, app: str, values: Mapping[str, str]) -> int:
        """Set the secrets in one request; returns the app's secrets version after it.

        Machines see them from their next boot on. The values travel in the request body
        only: no log line or exception carries one, even when the API echoes it back.
        """
        if not values:
            raise ValueError("no secrets to set")
        response = await self._request(
            "POST",
            f"/apps/{_seg(app)}/secrets",
            json={"values": dict(values)},
            redact=list(values.values()),
        )
        return _secrets_version(self._json_or_none(response))

    async def unset_secret(self, app: str, name: str) -> int | None:
        """Remove the secret; returns the new secrets version, or None when it was absent."""
        try:
            response = await self._request("DELETE", f"/apps/{_seg(app)}/secrets/{_seg(name)}")
        except FlyNotFound:
            return None
        return _secrets_version(self._json_or_none(response))

    # ---------------------------------------------------------------------- deploy tokens

    async def create_deploy_token(self, app: str, *, expiry: float) -> DeployToken:
        """Mint a deploy token for `app` that expires after `expiry` seconds (`fly tokens
        create deploy`): it manages that app and its resources only. The client's own
        token (an organisation token) must be allowed to create tokens.

        `expires_at` is counted from before the request was sent, so the token lives at
        least that long. Each call mints a new token; the value travels in the response
        body only and appears in no log line or exception.
        """
        seconds = math.ceil(expiry)
        if seconds < 1:
            raise ValueError("a deploy token must be valid for at least a second")
        sent_at = time.time()
        # A Go duration, as flyctl sends `--expiry` (time.Duration.String(); "7200s" parses).
        response = await self._request(
            "POST", f"/apps/{_seg(app)}/deploy_token", json={"expiry": f"{seconds}s"}
        )
        data = self._json(response)
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise self._unexpected(response, "expected {token}")
        return DeployToken(app=app, expires_at=sent_at + seconds, token=token.strip())

    # ------------------------------------------------------------------------------ logs

    async def get_app_logs(
        self,
        app: str,
        *,
        next_token: str = "",
        instance: str | None = None,
        region: str | None = None,
    ) -> LogPage:
        """One page of the app's logs, as flyctl polls them (`GET /api/v1/apps/{app}/logs`
        on the web API): pass the page's `next_token` back for the entries after it.
        `instance` is a machine id."""
        params = {"next_token": next_token}
        if instance:
            params["instance"] = instance
        if region:
            params["region"] = region
        response = await self._request(
            "GET",
            f"{self._web_base_url}/api/v1/apps/{_seg(app)}/logs",
            params=params,
            authorization=web_authorization,
        )
        data = self._json(response)
        if not isinstance(data, dict):
            raise self._unexpected(response, "expected a JSON object of logs")
        items = data.get("data") or []
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        if not isinstance(items, list):
            raise self._unexpected(response, "expected a list of log entries in data")
        entries = []
        for item in items:
            if not isinstance(item, dict):
                raise self._unexpected(response, "a log entry is not an object")
            attributes = item.get("attributes") or {}
            entries.append(self._validate(LogEntry, {"id": item.get("id"), **attributes}, response))
        token = meta.get("next_token") if isinstance(meta, dict) else None
        return LogPage(entries=entries, next_token=str(token or next_token))

    # --------------------------------------------------------------------------- private

    @staticmethod
    def _machine_path(app: str, machine_id: str, *rest: str) -> str:
        path = f"/apps/{_seg(app)}/machines/{_seg(machine_id)}"
        for part in rest:
            path += f"/{_seg(part)}"
        return path

    async def _token_value(self) -> str:
        if isinstance(self._token, str):
            return self._token
        return await self._token()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        nonce: str | None = None,
        read_timeout: float | None = None,
        redact: Collection[str] = (),
        idempotent: bool = True,
        authorization: Callable[[str], str] | None = None,
    ) -> httpx.Response:
        attempt = 1
        while True:
            try:
                return await self._request_once(
                    method,
                    path,
                    params=params,
                    json=json,
                    nonce=nonce,
                    read_timeout=read_timeout,
                    redact=redact,
                    authorization=authorization,
                )
            except (FlyRetryableError, FlyTransportError) as exc:
                delay = self.retry_delay(exc, attempt) if idempotent else None
                if delay is None:
                    raise
                why = f"{method} {path}: {exc}; retrying in {delay:.1f}s (attempt {attempt + 1})"
                logger.info("%s", why)
                await self.pause(delay, why)
                attempt += 1

    async def _request_once(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None,
        json: Any,
        nonce: str | None,
        read_timeout: float | None,
        redact: Collection[str],
        authorization: Callable[[str], str] | None = None,
    ) -> httpx.Response:
        token = await self._token_value()
        headers = {"Authorization": (authorization or _bearer)(token)}
        if nonce:
            headers[LEASE_NONCE_HEADER] = nonce
        attempts = _GET_ATTEMPTS_ON_DROP if method == "GET" else 1
        for attempt in range(1, attempts + 1):
            if self._limiter is not None:
                # A lease refresh or release goes first: a busy budget must not let a
                # lease lapse, nor keep a machine leased longer than its work.
                await self._limiter.acquire(
                    urgent=bool(nonce) and path.endswith("/lease"),
                    on_wait=self._waiting_for_budget if self._on_wait is not None else None,
                    tick=WAIT_TICK,
                )
            try:
                # Only server-side waits read longer than the client's timeout.
                http = self._waits if read_timeout is not None else self._http
                response = await http.request(
                    method,
                    path,
                    params=params,
                    json=json,
                    headers=headers,
                    timeout=(
                        read_timeout if read_timeout is not None else httpx.USE_CLIENT_DEFAULT
                    ),
                )
            except httpx.TransportError as exc:
                if isinstance(exc, _DROPPED) and attempt < attempts:
                    logger.debug("%s %s: connection dropped, sending once more", method, path)
                    continue
                # Not chained: the httpx exception holds the request, headers included.
                raise FlyTransportError(
                    f"{method} {path}: {type(exc).__name__}: {exc or 'no response'}",
                    method=method,
                    path=path,
                ) from None
            break
        if self._on_response is not None:
            try:
                self._on_response(method, response.status_code)
            except Exception:
                # Counting a response must never fail the request it counts.
                logger.exception("on_response hook failed")
        if response.is_success:
            logger.debug("%s %s -> %d", method, path, response.status_code)
            return response
        error = error_from_response(response, method=method, path=path, secret=token)
        if redact:
            error = _redacted(error, redact)
        logger.debug("%s %s -> %s", method, path, error)
        raise error

    @staticmethod
    def _unexpected(response: httpx.Response, why: str) -> FlyAPIError:
        request = response.request
        return FlyAPIError(
            response.status_code,
            f"unexpected response from {request.method} {request.url.path}: {why}",
            response.headers.get("fly-request-id"),
            method=request.method,
            path=request.url.path,
        )

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise self._unexpected(response, "body is not JSON") from None

    @staticmethod
    def _json_or_none(response: httpx.Response) -> Any:
        try:
            return response.json() if response.content else None
        except ValueError:
            return None

    def _validate(self, model: type[_M], data: Any, response: httpx.Response) -> _M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise self._unexpected(
                response, f"not a {model.__name__}: {exc.error_count()} invalid field(s)"
            ) from None

    def _model(self, model: type[_M], response: httpx.Response) -> _M:
        return self._validate(model, self._json(response), response)


def web_base_url_for(machines_base_url: str) -> str:
    """Where the web API (logs) lives beside a Machines API base URL: api.fly.io for the
    public one, the same origin for any other (the emulator serves both)."""
    base = machines_base_url.rstrip("/")
    if base == MACHINES_API_BASE_URL:
        return WEB_API_BASE_URL
    return base.removesuffix("/v1")


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def web_authorization(token: str) -> str:
    """The web API's Authorization header, as fly-go sends it: macaroon tokens (`fm1…`,
    `fm2…`, or already `FlyV1 …`) with the FlyV1 scheme, any other token as Bearer."""
    if token.startswith("FlyV1 "):
        return token
    if token.startswith(("fm1", "fm2")):
        return f"FlyV1 {token}"
    return f"Bearer {token}"


def _redacted(error: FlyAPIError, values: Collection[str]) -> FlyAPIError:
    """The same error, with every occurrence of `values` in its message replaced."""
    message = error.message
    for value in sorted((v for v in values if v), key=len, reverse=True):
        message = message.replace(value, "[redacted]")
    if message == error.message:
        return error
    return type(error)(
        error.status_code,
        message,
        error.request_id,
        error.retry_after,
        method=error.method,
        path=error.path,
    )


def _secrets_version(data: Any) -> int:
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else 0
