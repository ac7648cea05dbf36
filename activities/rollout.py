"""Step 4: the app's machines run the new image and pass their checks.

First deploy: create `machine_count` machines. Re-deploy: lease every machine of the app's
`app` process group, then update them one at a time, waiting for each to start and pass its
checks before touching the next, so a bad release stops after one machine.

Safe to repeat after a crash or a lost answer: every machine carries the deployment id and a
slot number in its metadata, so a retry adopts what an earlier attempt created or updated
instead of creating duplicates. Leases are always released, also on failure and cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._errors import to_application_error
from flyapi import (
    FlyClient,
    FlyError,
    FlyForbidden,
    FlyRetryableError,
    FlyTransportError,
    FlyUnauthorized,
    Machine,
)
from turbodeploy.flytoml import machine_config, overlay_managed
from turbodeploy.models import MachineOutcome, RolloutInput, RolloutResult
from turbodeploy.settings import Settings

PROCESS_GROUP = "app"
DEPLOYMENT_KEY = "turbodeploy_deployment_id"
SLOT_KEY = "turbodeploy_slot"
CREATED_IN_KEY = "turbodeploy_created_in"
LEASE_DESCRIPTION = "turbodeploy rollout"

# A stopped (scaled-to-zero) machine is updated without being woken: the proxy starts it
# on the next request, and the public health check makes that request.
_ASLEEP_STATES = frozenset({"stopped", "suspended"})
_DEAD_STATES = frozenset({"failed", "destroyed", "destroying"})
_MIN_HEARTBEAT_SECONDS = 0.05
_MAX_HEARTBEAT_SECONDS = 10.0

_T = TypeVar("_T")


class RolloutProgress(BaseModel):
    """Heartbeat details: where the rollout is, readable in the Web UI."""

    done: list[str] = Field(default_factory=list)
    current: str | None = None
    step: str = "listing machines"


@dataclass
class _Step:
    slot: int
    kind: Literal["create", "update", "keep"]
    config: dict[str, Any]
    machine: Machine | None = None


class RolloutActivities:
    def __init__(self, fly: FlyClient, settings: Settings) -> None:
        self._fly = fly
        self._settings = settings

    @activity.defn(name="roll_out_release")
    async def roll_out(self, input: RolloutInput) -> RolloutResult:
        return await _Rollout(self._fly, input).run()


class _Rollout:
    """One attempt of one rollout: the plan, the leases held and the progress so far."""

    def __init__(self, fly: FlyClient, input: RolloutInput) -> None:
        self._fly = fly
        self._input = input
        self._app = input.app_name
        self._ttl = max(1, math.ceil(input.timings.lease_ttl.total_seconds()))
        self._leases: dict[str, str] = {}
        self._progress = RolloutProgress()

    async def run(self) -> RolloutResult:
        background = [
            asyncio.create_task(self._heartbeat_forever()),
            asyncio.create_task(self._refresh_leases_forever()),
        ]
        try:
            steps = await self._plan()
            await self._lease_all([s.machine for s in steps if s.kind == "update" and s.machine])
            outcomes = [await self._apply(step) for step in steps]
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            # Shielded: a cancelled rollout must still hand its machines back.
            await asyncio.shield(self._release_all())
        return RolloutResult(machines=outcomes)

    # ------------------------------------------------------------------------------ plan

    async def _plan(self) -> list[_Step]:
        machines = await self._call(
            f"List machines of Fly app {self._app}", self._fly.list_machines(self._app)
        )
        ours = sorted(
            (m for m in machines if _in_group(m)), key=lambda m: (m.created_at or "", m.id)
        )
        deployment = self._input.deployment_id
        steps: list[_Step] = []
        earlier: dict[int, Machine] = {}
        others: list[Machine] = []
        for m in ours:
            slot = _slot(m)
            if (
                m.metadata.get(DEPLOYMENT_KEY) == deployment
                and slot is not None
                and slot not in earlier
            ):
                earlier[slot] = m
            else:
                others.append(m)
        # Machines an earlier attempt of this deployment already handled keep their slot.
        for slot, m in sorted(earlier.items()):
            kind: Literal["update", "keep"] = "keep" if m.image == self._input.image else "update"
            steps.append(_Step(slot, kind, self._config(slot, created=False), m))
        # Machines of earlier deployments keep their slot too, unless it is missing or
        # doubled (machines created by hand or by flyctl).
        taken = set(earlier)
        unslotted: list[Machine] = []
        for m in others:
            slot = _slot(m)
            if slot is None or slot in taken:
                unslotted.append(m)
                continue
            taken.add(slot)
            steps.append(_Step(slot, "update", self._config(slot, created=False), m))
        free = (s for s in itertools.count() if s not in taken)
        for m in unslotted:
            slot = next(free)
            steps.append(_Step(slot, "update", self._config(slot, created=False), m))
        used = {s.slot for s in steps}
        for slot in range(self._input.machine_count):
            if slot not in used and len(used) < self._input.machine_count:
                used.add(slot)
                steps.append(_Step(slot, "create", self._config(slot, created=True)))
        # Updates first: one machine, checked healthy, then the next.
        order = {"keep": 0, "update": 1, "create": 2}
        steps.sort(key=lambda s: (order[s.kind], s.slot))
        activity.logger.info(
            "Rollout of %s to Fly app %s: %s",
            deployment,
            self._app,
            ", ".join(f"{s.kind} {s.machine.id if s.machine else f'slot {s.slot}'}" for s in steps)
            or "nothing to do",
        )
        return steps

    def _config(self, slot: int, *, created: bool) -> dict[str, Any]:
        deployment = self._input.deployment_id
        metadata = {
            "fly_platform_version": "v2",
            "fly_process_group": PROCESS_GROUP,
            "fly_release_id": deployment,
            DEPLOYMENT_KEY: deployment,
            SLOT_KEY: str(slot),
        }
        if created:
            metadata[CREATED_IN_KEY] = deployment
        try:
            return machine_config(
                self._input.fly_toml,
                image=self._input.image,
                metadata=metadata,
                process_group=PROCESS_GROUP,
            )
        except ValueError as exc:
            raise ApplicationError(
                f"fly.toml of {self._app} cannot be turned into a machine config: {exc}",
                type="FlyTomlError",
                non_retryable=True,
            ) from None

    # ------------------------------------------------------------------------------ apply

    async def _apply(self, step: _Step) -> MachineOutcome:
        if step.kind == "create":
            machine, action = await self._create(step), "created"
        elif step.kind == "update":
            assert step.machine is not None
            machine, action = await self._update(step.machine, step.config), "updated"
        else:
            assert step.machine is not None
            machine = step.machine
            created_here = machine.metadata.get(CREATED_IN_KEY) == self._input.deployment_id
            action = "created" if created_here else "updated"
            activity.logger.info(
                "Machine %s of Fly app %s already runs %s",
                machine.id,
                self._app,
                self._input.deployment_id,
            )
        if machine.state not in _ASLEEP_STATES:
            await self._wait_healthy(machine, machine.config or step.config)
        self._progress.done.append(machine.id)
        self._progress.current = None
        self._progress.step = f"{len(self._progress.done)} machine(s) ready"
        activity.heartbeat(self._progress.model_dump())
        return MachineOutcome(
            machine_id=machine.id,
            action=action,
            instance_id=machine.instance_id,
            region=machine.region,
        )

    async def _create(self, step: _Step) -> Machine:
        self._set_progress(f"slot {step.slot}", "creating machine")
        action = f"Create machine (slot {step.slot}) in Fly app {self._app}"
        try:
            machine = await self._fly.create_machine(
                self._app, step.config, self._input.region, lease_ttl=self._ttl
            )
        except (FlyRetryableError, FlyTransportError) as exc:
            # The create may have happened even though the answer was lost or late.
            found = await self._find_slot(step.slot)
            if found is None:
                raise to_application_error(exc, action=action) from None
            activity.logger.info(
                "Machine %s of Fly app %s was created despite: %s", found.id, self._app, exc
            )
            return found
        except FlyError as exc:
            raise to_application_error(exc, action=action) from None
        if machine.nonce:
            self._leases[machine.id] = machine.nonce
        activity.logger.info(
            "Created machine %s (slot %d) in Fly app %s, region %s",
            machine.id,
            step.slot,
            self._app,
            machine.region,
        )
        return machine

    async def _find_slot(self, slot: int) -> Machine | None:
        with contextlib.suppress(FlyError):
            for m in await self._fly.list_machines(self._app):
                if (
                    _in_group(m)
                    and m.metadata.get(DEPLOYMENT_KEY) == self._input.deployment_id
                    and _slot(m) == slot
                ):
                    return m
        return None

    async def _update(self, machine: Machine, new_config: dict[str, Any]) -> Machine:
        self._set_progress(machine.id, "updating machine")
        where = f"machine {machine.id} of Fly app {self._app}"
        # Read again under the lease: the listed config may predate someone else's change.
        current = await self._call(f"Read {where}", self._fly.get_machine(self._app, machine.id))
        asleep = current.state in _ASLEEP_STATES
        updated = await self._call(
            f"Update {where}",
            self._fly.update_machine(
                self._app,
                machine.id,
                overlay_managed(current.config, new_config),
                current.region,
                nonce=self._leases.get(machine.id),
                skip_launch=asleep,
            ),
        )
        activity.logger.info(
            "Updated machine %s of Fly app %s to %s (instance %s%s)",
            machine.id,
            self._app,
            self._input.image,
            updated.instance_id,
            ", left stopped" if asleep else "",
        )
        if asleep and updated.state not in _ASLEEP_STATES:
            # Some servers answer with the pre-update state; what counts is that we did
            # not ask for a start.
            updated = updated.model_copy(update={"state": current.state})
        return updated

    # ------------------------------------------------------------------------------ waits

    async def _wait_healthy(self, machine: Machine, config: Mapping[str, Any]) -> None:
        timings = self._input.timings
        timeout = timings.machine_wait_timeout
        deadline = time.monotonic() + timeout.total_seconds()
        where = f"machine {machine.id} of Fly app {self._app}"
        self._set_progress(machine.id, "waiting for machine to start")
        while not await self._call(
            f"Wait for {where} to start",
            self._fly.wait_machine(
                self._app,
                machine.id,
                "started",
                instance_id=machine.instance_id,
                timeout=max(deadline - time.monotonic(), 0),
            ),
        ):
            current = await self._call(
                f"Read {where}", self._fly.get_machine(self._app, machine.id)
            )
            if current.state in _DEAD_STATES or time.monotonic() >= deadline:
                raise _unhealthy(
                    f"Machine {machine.id} of Fly app {self._app} did not start within "
                    f"{_human(timeout)} (state {current.state})",
                    current,
                )
        if not _has_checks(config):
            return
        self._set_progress(machine.id, "waiting for health checks")
        while True:
            current = await self._call(
                f"Read {where}", self._fly.get_machine(self._app, machine.id)
            )
            if current.checks and all(c.passing for c in current.checks):
                activity.logger.info(
                    "Machine %s of Fly app %s passes its %d check(s)",
                    machine.id,
                    self._app,
                    len(current.checks),
                )
                return
            if time.monotonic() >= deadline:
                failing = [c for c in current.checks if not c.passing]
                summary = "; ".join(
                    f"{c.name or 'check'} is {c.status or 'unknown'}"
                    + (f": {c.output.strip()}" if c.output and c.output.strip() else "")
                    for c in failing
                )
                raise _unhealthy(
                    f"Machine {machine.id} of Fly app {self._app} did not pass its health "
                    f"checks within {_human(timeout)}: {summary or 'no check has reported yet'}",
                    current,
                )
            await asyncio.sleep(timings.machine_poll_interval.total_seconds())

    # ------------------------------------------------------------------------------ leases

    async def _lease_all(self, machines: list[Machine]) -> None:
        for m in machines:
            self._set_progress(m.id, "leasing machine")
            try:
                lease = await self._fly.acquire_lease(
                    self._app, m.id, self._ttl, description=LEASE_DESCRIPTION
                )
            except FlyError as exc:
                await self._release_all()
                error = to_application_error(
                    exc, action=f"Lease machine {m.id} of Fly app {self._app}"
                )
                if isinstance(exc, FlyUnauthorized | FlyForbidden):
                    raise error from None
                # Nothing has been touched yet; whatever held the lease or removed the
                # machine, a later attempt starts from a fresh listing.
                raise ApplicationError(
                    error.message,
                    type=error.type,
                    next_retry_delay=error.next_retry_delay,
                ) from None
            self._leases[m.id] = lease.nonce
            activity.logger.info("Leased machine %s of Fly app %s", m.id, self._app)

    async def _refresh_leases_forever(self) -> None:
        interval = self._ttl / 3
        while True:
            await asyncio.sleep(interval)
            for machine_id, nonce in list(self._leases.items()):
                try:
                    lease = await self._fly.acquire_lease(
                        self._app, machine_id, self._ttl, nonce=nonce
                    )
                except FlyError as exc:
                    activity.logger.warning(
                        "Could not refresh the lease on machine %s of Fly app %s: %s",
                        machine_id,
                        self._app,
                        exc,
                    )
                    continue
                if machine_id in self._leases:
                    self._leases[machine_id] = lease.nonce

    async def _release_all(self) -> None:
        leases, self._leases = self._leases, {}
        for machine_id, nonce in leases.items():
            try:
                await self._fly.release_lease(self._app, machine_id, nonce)
            except FlyError as exc:
                # It expires on its own after the ttl; the next deploy only waits longer.
                activity.logger.warning(
                    "Could not release the lease on machine %s of Fly app %s: %s",
                    machine_id,
                    self._app,
                    exc,
                )
            else:
                activity.logger.info("Released machine %s of Fly app %s", machine_id, self._app)

    # ------------------------------------------------------------------------------ misc

    def _set_progress(self, current: str, step: str) -> None:
        self._progress.current = current
        self._progress.step = step
        activity.heartbeat(self._progress.model_dump())

    async def _heartbeat_forever(self) -> None:
        # Server-side waits last up to a minute; keep the heartbeat alive across them.
        timeout = activity.info().heartbeat_timeout
        interval = timeout.total_seconds() / 3 if timeout else _MAX_HEARTBEAT_SECONDS
        interval = min(max(interval, _MIN_HEARTBEAT_SECONDS), _MAX_HEARTBEAT_SECONDS)
        while True:
            await asyncio.sleep(interval)
            activity.heartbeat(self._progress.model_dump())

    @staticmethod
    async def _call(action: str, awaitable: Awaitable[_T]) -> _T:
        try:
            return await awaitable
        except FlyError as exc:
            raise to_application_error(exc, action=action) from None


def _in_group(m: Machine) -> bool:
    meta = m.metadata
    return (
        meta.get("fly_platform_version") == "v2"
        and meta.get("fly_process_group") == PROCESS_GROUP
        and not m.gone
    )


def _slot(m: Machine) -> int | None:
    value = m.metadata.get(SLOT_KEY, "")
    return int(value) if value.isdigit() else None


def _has_checks(config: Mapping[str, Any]) -> bool:
    if config.get("checks"):
        return True
    return any(isinstance(s, dict) and s.get("checks") for s in config.get("services") or [])


def _human(value: timedelta) -> str:
    seconds = value.total_seconds()
    return f"{seconds:g}s" if seconds < 120 else f"{seconds / 60:g} min"


def _unhealthy(message: str, machine: Machine) -> ApplicationError:
    return ApplicationError(
        message,
        {
            "machine_id": machine.id,
            "state": machine.state,
            "checks": [c.model_dump(mode="json") for c in machine.checks],
        },
        type="MachineUnhealthy",
        non_retryable=True,
    )
