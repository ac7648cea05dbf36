"""The steps of a destroy: what the app holds, then its machines, volumes, IP assignments,
secrets and finally the app itself, one activity each.

The order leaves as little billable as possible at any point a destroy may stop: machines
(compute) first, then the volumes they mounted (storage, deletable once no machine holds
them), then dedicated IPs, then the secrets and the app. Each step lists what is left and
removes it, treating 404 as already gone, so it is safe to repeat after a crash and a
destroy run again finishes what an interrupted one began.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import asyncpg
from pydantic import Field
from temporalio import activity

from activities._errors import (
    APP_NOT_GONE,
    DATABASE_UNAVAILABLE,
    MACHINE_NOT_SETTLED,
    VOLUME_IN_USE,
    to_application_error,
)
from activities.secrets import CredentialStore
from core.db import DeploymentStore
from core.models import DeployTimings, Model
from flyapi import FlyAPIError, FlyClient, FlyError, FlyNotFound, FlyUnauthorized


class SurveyInput(Model):
    project_id: str
    app_name: str


class AppSurvey(Model):
    """What a project has on Fly and in the records, before a destroy touches anything."""

    app_exists: bool
    recorded: bool  # the project has deployment rows
    machines: list[str] = Field(default_factory=list)
    volumes: list[str] = Field(default_factory=list)
    ips: list[str] = Field(default_factory=list)
    secrets: list[str] = Field(default_factory=list)  # names only

    def summary(self) -> str:
        return (
            f"{len(self.machines)} machine(s), {len(self.volumes)} volume(s), "
            f"{len(self.ips)} IP(s), {len(self.secrets)} secret(s)"
        )


class DestroyInput(Model):
    app_name: str
    timings: DeployTimings = Field(default_factory=DeployTimings)


class Removed(Model):
    removed: list[str] = Field(default_factory=list)  # what this attempt removed
    already_gone: bool = False  # the app itself was gone


class DestroyActivities:
    def __init__(
        self, fly: FlyClient, credentials: CredentialStore, store: DeploymentStore
    ) -> None:
        self._fly = fly
        self._credentials = credentials
        self._store = store

    @activity.defn(name="survey_fly_app")
    async def survey(self, input: SurveyInput) -> AppSurvey:
        app = input.app_name
        try:
            recorded = await self._store.latest(input.project_id) is not None
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresError) as err:
            raise DATABASE_UNAVAILABLE(
                f"the deployment database is unavailable: {type(err).__name__}: {err}"
            ) from err
        with self._classified(f"Survey Fly app {app}"):
            if await self._fly.get_app(app) is None:
                return AppSurvey(app_exists=False, recorded=recorded)
            machines = await self._fly.list_machines(app)
            volumes = await self._fly.list_volumes(app)
            ips = await self._fly.list_ip_assignments(app)
            secrets = await self._fly.list_secrets(app)
        return AppSurvey(
            app_exists=True,
            recorded=recorded,
            machines=[m.id for m in machines if not m.gone],
            volumes=[v.id for v in volumes if v.state != "destroyed"],
            ips=[ip.ip for ip in ips],
            secrets=[s.name for s in secrets],
        )

    @activity.defn(name="destroy_fly_machines")
    async def destroy_machines(self, input: DestroyInput) -> Removed:
        app = input.app_name
        with self._classified(f"Destroy the machines of Fly app {app}"):
            try:
                machines = [m for m in await self._fly.list_machines(app) if not m.gone]
            except FlyNotFound:
                return Removed(already_gone=True)
            for machine in machines:
                activity.heartbeat(f"destroying machine {machine.id} ({machine.state})")
                with suppress(FlyNotFound):
                    # Forced: a running machine is killed, not waited for.
                    await self._fly.delete_machine(app, machine.id, force=True)
            await self._until_gone(app, input.timings)
        return Removed(removed=[m.id for m in machines])

    async def _until_gone(self, app: str, t: DeployTimings) -> None:
        """Until no machine of the app is left, destroying ones included (their volumes
        cannot be deleted before)."""
        deadline = time.monotonic() + t.machine_wait_timeout.total_seconds()
        while True:
            try:
                left = [
                    m for m in await self._fly.list_machines(app, include_deleted=True)
                    if m.state != "destroyed"
                ]  # fmt: skip
            except FlyNotFound:
                return
            if not left:
                return
            activity.heartbeat(f"waiting for {len(left)} machine(s) to be destroyed")
            if time.monotonic() >= deadline:
                raise MACHINE_NOT_SETTLED(
                    f"{len(left)} machine(s) of {app} not destroyed after "
                    f"{t.machine_wait_timeout}: " + ", ".join(f"{m.id} ({m.state})" for m in left)
                )
            await asyncio.sleep(t.machine_poll_interval.total_seconds())

    @activity.defn(name="delete_fly_volumes")
    async def delete_volumes(self, input: DestroyInput) -> Removed:
        app = input.app_name
        with self._classified(f"Delete the volumes of Fly app {app}"):
            try:
                volumes = [v for v in await self._fly.list_volumes(app) if v.state != "destroyed"]
            except FlyNotFound:
                return Removed(already_gone=True)
            for volume in volumes:
                activity.heartbeat(f"deleting volume {volume.id}")
                try:
                    await self._fly.delete_volume(app, volume.id)
                except FlyNotFound:
                    continue
                except FlyAPIError as exc:
                    if exc.status_code == 412:  # still attached to a machine going away
                        raise VOLUME_IN_USE(f"volume {volume.id} of {app}: {exc}") from None
                    raise
        return Removed(removed=[v.id for v in volumes])

    @activity.defn(name="release_fly_ips")
    async def release_ips(self, input: DestroyInput) -> Removed:
        app = input.app_name
        with self._classified(f"Release the IP addresses of Fly app {app}"):
            try:
                ips = await self._fly.list_ip_assignments(app)
            except FlyNotFound:
                return Removed(already_gone=True)
            for ip in ips:
                activity.heartbeat(f"releasing {ip.ip}")
                await self._fly.release_ip_assignment(app, ip.ip)
        return Removed(removed=[ip.ip for ip in ips])

    @activity.defn(name="delete_fly_secrets")
    async def delete_secrets(self, input: DestroyInput) -> Removed:
        app = input.app_name
        with self._classified(f"Delete the secrets of Fly app {app}"):
            try:
                names = [s.name for s in await self._fly.list_secrets(app)]
            except FlyNotFound:
                return Removed(already_gone=True)
            for name in names:
                activity.heartbeat(f"deleting secret {name}")
                await self._fly.unset_secret(app, name)
        return Removed(removed=names)

    @activity.defn(name="delete_fly_app")
    async def delete_app(self, input: DestroyInput) -> Removed:
        app = input.app_name
        t = input.timings
        with self._classified(f"Delete Fly app {app}"):
            try:
                await self._fly.delete_app(app)
            except FlyNotFound:
                return Removed(already_gone=True)
            # The delete is accepted (202), then done: wait until the app is gone.
            deadline = time.monotonic() + t.app_visible_timeout.total_seconds()
            while await self._fly.get_app(app) is not None:
                activity.heartbeat(f"waiting for Fly app {app} to be deleted")
                if time.monotonic() >= deadline:
                    raise APP_NOT_GONE(
                        f"Fly app {app} still exists {t.app_visible_timeout} after its delete"
                    )
                await asyncio.sleep(t.app_visible_poll.total_seconds())
        return Removed(removed=[app])

    @contextmanager
    def _classified(self, action: str) -> Iterator[None]:
        try:
            yield
        except FlyUnauthorized as exc:
            self._credentials.invalidate()
            raise to_application_error(exc, action=action) from None
        except FlyError as exc:
            raise to_application_error(exc, action=action) from None
