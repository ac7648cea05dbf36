"""A release as it runs (snapshot, in `rollout` and `health`), and putting one back
(restore, in `rollback`, and in `rollout` for a rollback request).

The snapshot is taken before a rollout touches anything and again once a release runs, so
that a failed or cancelled deploy can be undone automatically and an older release put
back by hand. Restoring makes the app's `app` process group match the snapshot exactly:

- a snapshot machine that still exists gets its snapshot config back, if it differs;
- a snapshot machine that no longer exists is created again from its config, in its
  region, marked with the restoring deployment so that a retry finds it;
- every other machine of the group is destroyed. After a failed first deploy the
  snapshot is empty, and nothing is left running that costs money.

Safe to repeat: a second run finds the group as the first left it and changes nothing.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field
from temporalio import activity

from activities._errors import APP_NOT_FOUND
from activities._machines import (
    ASLEEP_STATES,
    CANARY_KEY,
    RESTORED_BY_KEY,
    RESTORES_KEY,
    MachineSession,
    all_or_first_error,
)
from core.models import DeployTimings, MachineSnapshot, Model, ReleaseSnapshot
from flyapi import FlyClient, Machine


class SnapshotInput(Model):
    app_name: str


class RestoreInput(Model):
    """Make the app's `app` process group match `snapshot`: changed machines get their
    snapshot config back, missing ones are recreated (marked with `deployment_id`, so a
    retry finds them), and every other machine of the group is destroyed. Idempotent."""

    app_name: str
    deployment_id: str
    snapshot: ReleaseSnapshot
    reason: str = ""
    timings: DeployTimings = Field(default_factory=DeployTimings)
    # As in RolloutInput: the secrets version the machines must boot with, or newer.
    min_secrets_version: int | None = None


class RestoreResult(Model):
    restored: list[str] = Field(default_factory=list)  # machine ids put back
    destroyed: list[str] = Field(default_factory=list)  # machine ids removed
    unchanged: list[str] = Field(default_factory=list)


class ReleaseActivities:
    def __init__(self, fly: FlyClient) -> None:
        self._fly = fly

    @activity.defn(name="snapshot_release")
    async def snapshot(self, input: SnapshotInput) -> ReleaseSnapshot:
        """The machines of the app's `app` group, with their full configs; none without app.

        Canaries are left out: they are never part of a release, so a restore removes any
        an interrupted deploy left behind.
        """
        session = MachineSession(self._fly, input.app_name, DeployTimings())
        machines = await session.list_group()
        if machines is None:
            activity.logger.info("Fly app %s does not exist: empty snapshot", input.app_name)
            return ReleaseSnapshot(app_name=input.app_name, app_missing=True)
        return ReleaseSnapshot(
            app_name=input.app_name,
            machines=[
                MachineSnapshot(
                    machine_id=m.id,
                    region=m.region or "",
                    state=m.state or "unknown",
                    instance_id=m.instance_id,
                    config=m.config,
                    version=m.version,
                )
                for m in machines
                if not m.metadata.get(CANARY_KEY)
            ],
            canaries=[m.id for m in machines if m.metadata.get(CANARY_KEY)],
        )

    @activity.defn(name="restore_release")
    async def restore(self, input: RestoreInput) -> RestoreResult:
        return await _Restore(self._fly, input).run()


@dataclass
class _Put:
    """What to do about one snapshot machine."""

    wanted: MachineSnapshot
    config: dict[str, Any]  # the config the machine must end up with
    kind: Literal["update", "start", "create", "keep"]
    machine: Machine | None = None


class _Restore:
    def __init__(self, fly: FlyClient, input: RestoreInput) -> None:
        self._input = input
        self._app = input.app_name
        self._deployment = input.deployment_id
        self._s = MachineSession(
            fly, input.app_name, input.timings, min_secrets_version=input.min_secrets_version
        )

    async def run(self) -> RestoreResult:
        snapshot = self._input.snapshot
        wanted = {m.machine_id: m for m in snapshot.machines}
        async with self._s.running():
            listed = await self._s.list_group()
            if listed is None:
                if wanted:
                    raise APP_NOT_FOUND(
                        f"Fly app {self._app} no longer exists: its release cannot be restored"
                    )
                return RestoreResult()
            await self._s.lease_all(listed)
            if listed:
                listed = await self._s.list_group() or []
            puts, extras = self._plan(wanted, listed)
            activity.logger.info(
                "Restore of Fly app %s to %s (%s): %s; destroy %s",
                self._app,
                snapshot.image or "its snapshot",
                self._input.reason or "by request",
                ", ".join(
                    f"{p.kind} {p.machine.id if p.machine else p.wanted.machine_id}" for p in puts
                )
                or "no machine",
                ", ".join(m.id for m in extras) or "nothing",
            )
            # The old release first, then the machines it does not have: the app never
            # serves with fewer working machines than it has to.
            results = await asyncio.gather(*(self._put(p) for p in puts), return_exceptions=True)
            destroyed = await all_or_first_error(self._destroy(m) for m in extras)
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if not isinstance(failure, Exception):
                raise failure
        if failures:
            raise failures[0]
        restored = [r for r in results if isinstance(r, tuple) and r[1]]
        return RestoreResult(
            restored=[machine_id for machine_id, _ in restored],
            destroyed=destroyed,
            unchanged=[r[0] for r in results if isinstance(r, tuple) and not r[1]],
        )

    def _plan(
        self, wanted: Mapping[str, MachineSnapshot], listed: list[Machine]
    ) -> tuple[list[_Put], list[Machine]]:
        present = {m.id: m for m in listed if m.id in wanted}
        stand_ins: dict[str, Machine] = {}
        for m in listed:
            original = m.metadata.get(RESTORES_KEY)
            if (
                original is not None
                and m.metadata.get(RESTORED_BY_KEY) == self._deployment
                and original in wanted
                and original not in present
                and original not in stand_ins
            ):
                stand_ins[original] = m
        taken = set(present) | {m.id for m in stand_ins.values()}
        extras = [m for m in listed if m.id not in taken]
        puts = []
        for machine_id, snap in wanted.items():
            machine = present.get(machine_id)
            config = copy.deepcopy(snap.config)
            if machine is None:
                # Created again: marked so that a retry takes it for the snapshot machine.
                meta = dict(config.get("metadata") or {})
                meta[RESTORED_BY_KEY] = self._deployment
                meta[RESTORES_KEY] = machine_id
                config["metadata"] = meta
                machine = stand_ins.get(machine_id)
            if machine is None:
                puts.append(_Put(snap, config, "create"))
            elif machine.config != config:
                puts.append(_Put(snap, config, "update", machine))
            elif snap.state not in ASLEEP_STATES and machine.state in ASLEEP_STATES:
                puts.append(_Put(snap, config, "start", machine))
            else:
                puts.append(_Put(snap, config, "keep", machine))
        return puts, extras

    async def _put(self, put: _Put) -> tuple[str, bool]:
        """Returns (machine id, whether anything changed)."""
        snap = put.wanted
        asleep = snap.state in ASLEEP_STATES
        fly, where = self._s.fly, f"machine {snap.machine_id} of Fly app {self._app}"
        if put.kind == "create":
            machine = await self._s.create(
                put.config,
                snap.region,
                label=f"machine restoring {snap.machine_id}",
                matches=lambda m: (
                    m.metadata.get(RESTORED_BY_KEY) == self._deployment
                    and m.metadata.get(RESTORES_KEY) == snap.machine_id
                ),
                skip_launch=asleep,
            )
        else:
            assert put.machine is not None
            machine = put.machine
            # Taken out of the proxy by an interrupted blue-green deploy, perhaps; the API
            # does not say, and a restored machine must serve.
            await self._s.call(
                f"Route traffic to {where}",
                fly.uncordon_machine(self._app, machine.id, nonce=self._s.leases.get(machine.id)),
            )
            if put.kind == "update":
                machine = await self._s.update(machine, put.config, skip_launch=asleep)
            elif put.kind == "start":
                self._s.set_progress(machine.id, "starting machine")
                await self._s.call(
                    f"Start {where}",
                    fly.start_machine(self._app, machine.id, nonce=self._s.leases.get(machine.id)),
                )
        changed = put.kind != "keep"
        if changed and not asleep:
            await self._s.wait_healthy(machine, put.config)
        if changed:
            activity.logger.info(
                "Machine %s of Fly app %s %s (image %s)",
                machine.id,
                self._app,
                {"create": "created again", "update": "restored", "start": "started"}[put.kind],
                put.config.get("image"),
            )
        self._s.mark_done(machine.id)
        return machine.id, changed

    async def _destroy(self, machine: Machine) -> str:
        await self._s.destroy(machine.id)
        return machine.id
