"""The `app` step: the Fly app exists in our organisation and has public IPs.

Safe to repeat: an app that is already ours is reused, and IPs are only allocated for the
address families the app does not have yet.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from pydantic import Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._errors import APP_NAME_TAKEN, APP_NOT_VISIBLE, to_application_error
from activities.secrets import CredentialStore
from core.models import DeployTimings, Model
from core.settings import Settings
from flyapi import (
    App,
    FlyClient,
    FlyError,
    FlyForbidden,
    FlyUnauthorized,
    FlyUnprocessable,
    IPAssignment,
)


class EnsureAppInput(Model):
    app_name: str
    org_slug: str
    timings: DeployTimings = Field(default_factory=DeployTimings)


class EnsureAppResult(Model):
    app_name: str
    url: str
    created: bool
    ips: list[str] = Field(default_factory=list)


class FlyAppActivities:
    def __init__(self, fly: FlyClient, credentials: CredentialStore, settings: Settings) -> None:
        self._fly = fly
        self._credentials = credentials
        self._settings = settings

    @activity.defn(name="ensure_fly_app")
    async def ensure_app(self, input: EnsureAppInput) -> EnsureAppResult:
        name = input.app_name
        action = f"Look up Fly app {name}"
        try:
            app = await self._fly.get_app(name)
            created = False
            if app is None:
                action = f"Create Fly app {name} in organisation {input.org_slug}"
                created = await self._create(input)
                action = f"Wait for Fly app {name} to become visible"
                app = await self._wait_visible(input)
            _check_owner(app, input.org_slug)
            action = f"Allocate public IPs for Fly app {name}"
            # An app this call created has none yet: nothing to list.
            ips = await self._ensure_ips(name, known=[] if created else None)
        except FlyUnauthorized as exc:
            # The cached token is rejected: make the next attempt (or deploy) re-read it.
            self._credentials.invalidate()
            raise to_application_error(exc, action=action) from None
        except FlyForbidden:
            raise _name_taken(
                f"Fly app {name} exists in another organisation (not {input.org_slug}); "
                "app names are global across Fly.io, choose another project id"
            ) from None
        except FlyError as exc:
            raise to_application_error(exc, action=action) from None
        return EnsureAppResult(
            app_name=name, url=self._settings.app_url(name), created=created, ips=ips
        )

    async def _create(self, input: EnsureAppInput) -> bool:
        """True when this call created the app, False when it already was ours."""
        name = input.app_name
        try:
            await self._fly.create_app(name, input.org_slug)
        except FlyUnprocessable as exc:
            # Most likely "name has already been taken": by us (an earlier attempt whose
            # answer was lost) or by someone else.
            existing = await self._fly.get_app(name)
            if existing is None:
                if "taken" in exc.message.lower():
                    # Taken by an organisation our token cannot see at all.
                    raise _name_taken(
                        f"Fly app name {name} is already taken by another organisation "
                        f"({exc}); app names are global across Fly.io, choose another "
                        "project id"
                    ) from None
                raise
            _check_owner(existing, input.org_slug, detail=exc.message)
            activity.logger.info("Fly app %s already exists in %s", name, input.org_slug)
            return False
        activity.logger.info("Created Fly app %s in %s", name, input.org_slug)
        return True

    async def _wait_visible(self, input: EnsureAppInput) -> App:
        timings = input.timings
        deadline = time.monotonic() + timings.app_visible_timeout.total_seconds()
        while True:
            app = await self._fly.get_app(input.app_name)
            if app is not None:
                return app
            activity.heartbeat()
            if time.monotonic() >= deadline:
                raise APP_NOT_VISIBLE(
                    f"Fly app {input.app_name} was created but is still not visible after "
                    f"{timings.app_visible_timeout}"
                )
            await asyncio.sleep(timings.app_visible_poll.total_seconds())

    async def _ensure_ips(self, app: str, known: list[IPAssignment] | None = None) -> list[str]:
        assigned = known if known is not None else await self._fly.list_ip_assignments(app)
        # Checked per family so that an attempt that crashed between the two allocations
        # completes the pair instead of adding a third address.
        if not any(_is_v6(ip) for ip in assigned):
            assigned = await self._assign(app, "v6", assigned)
        if not any(not _is_v6(ip) for ip in assigned):
            assigned = await self._assign(app, "shared_v4", assigned)
        return [ip.ip for ip in assigned]

    async def _assign(
        self, app: str, kind: Literal["v6", "shared_v4"], assigned: list[IPAssignment]
    ) -> list[IPAssignment]:
        try:
            ip = await self._fly.assign_ip(app, kind)
        except FlyUnprocessable:
            # An earlier request whose answer was lost may have allocated it already.
            current = await self._fly.list_ip_assignments(app)
            if any(_is_v6(x) == (kind == "v6") for x in current):
                return current
            raise
        activity.logger.info("Allocated a %s address for Fly app %s", kind, app)
        return [*assigned, ip]


def _is_v6(ip: IPAssignment) -> bool:
    return ":" in ip.ip


def _check_owner(app: App, org_slug: str, *, detail: str = "") -> None:
    # An app without an organisation in the answer was found with our token: treat as ours.
    if app.org_slug is None or app.org_slug == org_slug:
        return
    reason = f" ({detail})" if detail else ""
    raise _name_taken(
        f"Fly app name {app.name} is already taken by another organisation, not "
        f"{org_slug}{reason}; app names are global across Fly.io, choose another project id"
    )


def _name_taken(message: str) -> ApplicationError:
    return APP_NAME_TAKEN(message)
