"""The `machines` step of a stop or a start: every machine of the app stopped (and taken
out of the proxy, so a request does not wake it), or started again and put back.

Both are safe to repeat: a machine already stopped (or started) is left as it is, and
each machine is waited for until it has reached the state asked for. A stopped app keeps
its release, IPs, volumes and secrets; it costs storage only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager, suppress
from typing import Literal

from pydantic import Field
from temporalio import activity

from activities._errors import APP_NOT_FOUND, MACHINE_NOT_SETTLED, to_application_error
from activities.secrets import CredentialStore
from core.models import DeployTimings, Model
from flyapi import FlyClient, FlyError, FlyNotFound, FlyUnauthorized, Machine

# States that cost nothing but storage.
RESTING_STATES = frozenset({"stopped", "suspended"})


class AppMachinesInput(Model):
    app_name: str
    timings: DeployTimings = Field(default_factory=DeployTimings)


class AppMachinesResult(Model):
    changed: list[str] = Field(default_factory=list)  # machines this step stopped or started
    unchanged: list[str] = Field(default_factory=list)  # already in the state asked for
    image: str | None = None  # the image of the machines, when they share one

    @property
    def machine_ids(self) -> list[str]:
        return [*self.changed, *self.unchanged]


class LifecycleActivities:
    def __init__(self, fly: FlyClient, credentials: CredentialStore) -> None:
        self._fly = fly
        self._credentials = credentials

    @activity.defn(name="stop_fly_machines")
    async def stop_machines(self, input: AppMachinesInput) -> AppMachinesResult:
        app = input.app_name
        with self._classified(f"Stop the machines of Fly app {app}"):
            machines = await self._machines(app, "stop")
            changed, unchanged = [], []
            for machine in machines:
                # Out of the proxy first: a request must not wake a machine being stopped.
                await self._quietly(self._fly.cordon_machine(app, machine.id))
                if machine.state in RESTING_STATES:
                    unchanged.append(machine.id)
                    continue
                activity.heartbeat(f"stopping machine {machine.id} ({machine.state})")
                await self._quietly(self._fly.stop_machine(app, machine.id))
                changed.append(machine.id)
            for machine_id in changed:
                await self._settle(app, machine_id, "stopped", input.timings)
        activity.logger.info("stopped %d machine(s) of %s", len(changed), app)
        return AppMachinesResult(changed=changed, unchanged=unchanged, image=_image(machines))

    @activity.defn(name="start_fly_machines")
    async def start_machines(self, input: AppMachinesInput) -> AppMachinesResult:
        app = input.app_name
        with self._classified(f"Start the machines of Fly app {app}"):
            machines = await self._machines(app, "start")
            changed, unchanged = [], []
            for machine in machines:
                if machine.state == "started":
                    unchanged.append(machine.id)
                    continue
                activity.heartbeat(f"starting machine {machine.id} ({machine.state})")
                await self._fly.start_machine(app, machine.id)
                changed.append(machine.id)
            for machine_id in changed:
                await self._settle(app, machine_id, "started", input.timings)
            # Back in the proxy once they run.
            for machine in machines:
                await self._quietly(self._fly.uncordon_machine(app, machine.id))
        activity.logger.info("started %d machine(s) of %s", len(changed), app)
        return AppMachinesResult(changed=changed, unchanged=unchanged, image=_image(machines))

    async def _machines(self, app: str, verb: str) -> list[Machine]:
        try:
            listed = await self._fly.list_machines(app)
        except FlyNotFound:
            raise APP_NOT_FOUND(
                f"Fly app {app} does not exist: nothing to {verb} (never deployed, or destroyed)"
            ) from None
        machines = [m for m in listed if not m.gone]
        if not machines:
            raise APP_NOT_FOUND(f"Fly app {app} has no machines: nothing to {verb}")
        return machines

    async def _settle(
        self, app: str, machine_id: str, state: Literal["started", "stopped"], t: DeployTimings
    ) -> None:
        deadline = time.monotonic() + t.machine_wait_timeout.total_seconds()
        while True:
            left = deadline - time.monotonic()
            activity.heartbeat(f"waiting for machine {machine_id} to be {state}")
            if await self._fly.wait_machine(app, machine_id, state, timeout=min(left, 60)):
                return
            current = await self._fly.get_machine(app, machine_id)
            if state == "stopped" and current.state in RESTING_STATES:
                return
            if time.monotonic() >= deadline:
                raise MACHINE_NOT_SETTLED(
                    f"machine {machine_id} of {app} is still {current.state}, not {state}, "
                    f"after {t.machine_wait_timeout}"
                )
            await asyncio.sleep(t.machine_poll_interval.total_seconds())

    @staticmethod
    async def _quietly(call: Awaitable[None]) -> None:
        """A call whose target may already be gone (404): nothing left to do."""
        with suppress(FlyNotFound):
            await call

    @contextmanager
    def _classified(self, action: str) -> Iterator[None]:
        try:
            yield
        except FlyUnauthorized as exc:
            self._credentials.invalidate()
            raise to_application_error(exc, action=action) from None
        except FlyError as exc:
            raise to_application_error(exc, action=action) from None


def _image(machines: list[Machine]) -> str | None:
    images = {m.image for m in machines}
    return images.pop() if len(images) == 1 else None
