"""The app of a project as Fly sees it now, and its logs: read from Fly directly, without
the workflow (`turbodeploy app` and `turbodeploy logs` use these).

The Fly token is resolved as the worker resolves it (`activities.secrets.CredentialStore`:
SSM), sent only in the `Authorization` header, and never printed, logged or returned.

    async with fly_client(settings) as fly:
        status = await app_status(fly, "turbobackend-p1", settings.app_url("turbobackend-p1"))
        async for entry in read_logs(fly, "turbobackend-p1", follow=False):
            print(entry.timestamp, entry.message)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from pydantic import BaseModel, Field

from activities.secrets import CredentialStore
from core.settings import Settings
from flyapi import FlyClient, FlyNotFound, LogEntry, Machine

# flyctl's polling backoff (logs/polling.go): 64 ms doubling up to 4 s while nothing comes.
POLL_MIN = 0.064
POLL_MAX = 4.096


class CheckView(BaseModel):
    name: str | None = None
    status: str | None = None
    output: str | None = None


class MachineView(BaseModel):
    id: str
    name: str | None = None
    region: str | None = None
    state: str | None = None
    image: str | None = None
    version: str | None = None  # the release version flyctl shows (fly_release_version)
    deployment_id: str | None = None  # ours, from the machine's metadata
    checks: list[CheckView] = Field(default_factory=list)
    last_event: str | None = None  # "start → started"
    last_event_at: datetime | None = None
    updated_at: str | None = None


class AppView(BaseModel):
    """What `fly status` shows, plus the health endpoint's answer."""

    app_name: str
    exists: bool
    status: str | None = None
    organization: str | None = None
    url: str
    machines: list[MachineView] = Field(default_factory=list)
    ips: list[dict[str, Any]] = Field(default_factory=list)
    volumes: list[dict[str, Any]] = Field(default_factory=list)
    health_status: int | None = None  # the HTTP status of GET {url}/api/health; None: none
    health_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.health_status == 200


@contextlib.asynccontextmanager
async def fly_client(settings: Settings) -> AsyncIterator[FlyClient]:
    """A Fly client whose token is read from SSM per request, as the worker's is."""
    credentials = CredentialStore(settings)
    async with FlyClient(
        settings.fly_api_base_url,
        credentials.fly_token,
        timeout=settings.fly_api_timeout_seconds,
    ) as fly:
        yield fly


async def app_status(
    fly: FlyClient, app_name: str, url: str, *, health_timeout: float = 5.0
) -> AppView:
    app = await fly.get_app(app_name)
    if app is None:
        return AppView(app_name=app_name, exists=False, url=url)
    machines = [m for m in await fly.list_machines(app_name) if not m.gone]
    views = await asyncio.gather(*(_machine_view(fly, app_name, m) for m in machines))
    ips = await fly.list_ip_assignments(app_name)
    volumes = await fly.list_volumes(app_name)
    view = AppView(
        app_name=app_name,
        exists=True,
        status=app.status,
        organization=app.org_slug,
        url=url,
        machines=list(views),
        ips=[ip.model_dump(mode="json", exclude_none=True) for ip in ips],
        volumes=[v.model_dump(mode="json", exclude_none=True) for v in volumes],
    )
    code, error = await _health(url, health_timeout)
    return view.model_copy(update={"health_status": code, "health_error": error})


async def _machine_view(fly: FlyClient, app: str, machine: Machine) -> MachineView:
    meta = machine.metadata
    last_event = last_at = None
    with contextlib.suppress(FlyNotFound):
        events = await fly.list_machine_events(app, machine.id, limit=1)
        if events:
            latest = max(events, key=lambda e: e.timestamp or 0)
            last_event = f"{latest.type} → {latest.status}"
            if latest.timestamp:
                last_at = datetime.fromtimestamp(latest.timestamp / 1000, UTC)
    return MachineView(
        id=machine.id,
        name=machine.name,
        region=machine.region,
        state=machine.state,
        image=machine.image,
        version=meta.get("fly_release_version") or machine.instance_id,
        deployment_id=meta.get("turbodeploy_deployment_id") or meta.get("fly_release_id"),
        checks=[CheckView(name=c.name, status=c.status, output=c.output) for c in machine.checks],
        last_event=last_event,
        last_event_at=last_at,
        updated_at=machine.updated_at,
    )


async def _health(url: str, timeout: float) -> tuple[int | None, str | None]:  # noqa: ASYNC109
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as http:
            response = await http.get(f"{url.rstrip('/')}/api/health")
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:300]
    return response.status_code, None


def parse_since(value: str) -> timedelta:
    """`10m`, `2h`, `30s`, `1d` (or a number of seconds)."""
    text = value.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        unit = units.get(text[-1:], 0)
        seconds = float(text[:-1]) * unit if unit else float(text)
    except ValueError:
        raise ValueError(f"--since {value!r}: use a duration such as 30s, 10m, 2h or 1d") from None
    if seconds <= 0:
        raise ValueError("--since must be a positive duration")
    return timedelta(seconds=seconds)


def _entry_time(entry: LogEntry) -> datetime | None:
    try:
        return datetime.fromisoformat(entry.timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None


async def read_logs(
    fly: FlyClient,
    app_name: str,
    *,
    machine: str | None = None,
    region: str | None = None,
    since: timedelta | None = None,
    follow: bool = False,
    poll_min: float = POLL_MIN,
    poll_max: float = POLL_MAX,
) -> AsyncIterator[LogEntry]:
    """The app's log entries, oldest first: every page there is now, then (with `follow`)
    new ones as they come, polling with flyctl's backoff, until the caller stops iterating
    (Ctrl-C cancels the wait cleanly)."""
    cutoff = datetime.now(UTC) - since if since is not None else None
    token = ""
    wait = poll_min
    while True:
        page = await fly.get_app_logs(app_name, next_token=token, instance=machine, region=region)
        for entry in page.entries:
            when = _entry_time(entry)
            if cutoff is not None and when is not None and when < cutoff:
                continue
            yield entry
        token = page.next_token or token
        if page.entries:
            wait = poll_min
            continue  # there may be more pages right away
        if not follow:
            return
        await asyncio.sleep(wait)
        wait = min(wait * 2, poll_max)
