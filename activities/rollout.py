"""The `rollout` step: the app's machines run the new image and pass their checks.

Strategies (`RolloutInput.strategy`):

- rolling (default): one machine first, started and passing its checks, then the rest
  `max_unavailable` at a time; the first failure stops the rollout.
- immediate: every machine updated at once, without waiting for it to start.
- canary: one extra machine with the new config, verified healthy and removed again, then
  rolling. A first deploy has nothing to compare against and creates the machines directly.
- bluegreen: new (green) machines beside the old (blue) ones, invisible to the proxy until
  they all pass their checks; then traffic moves and the blue machines are removed. A
  failure before traffic moves removes the greens, so the old release keeps serving.

Every machine the rollout touches is leased first, the leases are refreshed while it runs
and always released, also on failure and cancellation. Safe to repeat after a crash or a
lost answer: every machine carries the deployment id (and a slot, canary or green marker)
in its metadata, so a retry adopts what an earlier attempt created or updated instead of
creating duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field
from temporalio import activity

from activities._errors import (
    BLUE_GREEN_NEEDS_CHECKS,
    BLUE_GREEN_WITH_VOLUMES,
    FLY_TOML_ERROR,
    MOUNTS_NEED_NEW_MACHINES,
    UNSUPPORTED_STRATEGY,
)
from activities._machines import (
    ASLEEP_STATES,
    CANARY_KEY,
    CREATED_IN_KEY,
    DEPLOYER_VERSION_KEY,
    DEPLOYMENT_KEY,
    GREEN_KEY,
    PROCESS_GROUP,
    RELEASE_VERSION_KEY,
    RESTORED_BY_KEY,
    RESTORES_KEY,
    SLOT_KEY,
    MachineChanged,
    MachineSession,
    all_or_first_error,
    deployer_version,
    has_checks,
    release_version,
)
from activities._volumes import VolumeAttacher
from core.flytoml import machine_config, overlay_managed
from core.models import (
    CheckWindow,
    DeployTimings,
    MachineOutcome,
    MachineSnapshot,
    Model,
    ReleaseSnapshot,
    Strategy,
)
from flyapi import (
    FlyClient,
    FlyError,
    Machine,
)

# Markers that describe one deployment's handling of one machine; a machine derived from
# another, or updated by a later deployment, must not inherit them.
_TRANSIENT_KEYS = (CANARY_KEY, GREEN_KEY, RESTORED_BY_KEY, RESTORES_KEY)
_PER_MACHINE_KEYS = (SLOT_KEY, CREATED_IN_KEY, *_TRANSIENT_KEYS)

_STOP_WAIT_MAX_SECONDS = 60.0


class RolloutInput(Model):
    deployment_id: str
    app_name: str
    image: str
    region: str
    fly_toml: str
    machine_count: int = 1
    strategy: Strategy = Strategy.ROLLING
    max_unavailable: float = 0.33
    timings: DeployTimings = Field(default_factory=DeployTimings)
    # When the machines of the app's last release passed their checks: the first read of
    # a new machine's checks waits until then.
    checks_hint: CheckWindow | None = None
    # The app's secrets version the secrets step left (None: this deploy set none): every
    # machine created or updated boots with those secrets or newer.
    min_secrets_version: int | None = None
    # The machines as the snapshot before the rollout read them: a rolling or immediate
    # rollout leases those instead of listing them again (each update is guarded by the
    # version read, so a machine changed since is read again, not overwritten).
    snapshot: ReleaseSnapshot | None = None


class RolloutResult(Model):
    machines: list[MachineOutcome]
    image_digest: str | None = None
    # The machines as released, from the rollout's own answers (rolling and immediate):
    # the snapshot the next deploy or a rollback restores, without listing them again.
    released: ReleaseSnapshot | None = None

    @property
    def machine_ids(self) -> list[str]:
        return [m.machine_id for m in self.machines]


# ---------------------------------------------------------------------------------------
# The rollout
# ---------------------------------------------------------------------------------------


@dataclass
class _Step:
    slot: int
    kind: Literal["create", "update", "keep"]
    config: dict[str, Any]
    machine: Machine | None = None


class RolloutActivities:
    def __init__(self, fly: FlyClient) -> None:
        self._fly = fly

    @activity.defn(name="roll_out_release")
    async def roll_out(self, input: RolloutInput) -> RolloutResult:
        return await _Rollout(self._fly, input).run()


class _Rollout:
    """One attempt of one rollout."""

    def __init__(self, fly: FlyClient, input: RolloutInput) -> None:
        self._input = input
        self._app = input.app_name
        self._deployment = input.deployment_id
        self._s = MachineSession(
            fly,
            input.app_name,
            input.timings,
            input.checks_hint,
            min_secrets_version=input.min_secrets_version,
        )
        self._release_version = 1
        self._volumes = VolumeAttacher(self._s, input.fly_toml, PROCESS_GROUP)
        self._digests: dict[str, str | None] = {}
        # Rolling and immediate rollouts update every machine with the version they read
        # (`current_version`): the API refuses an update of a machine changed since.
        self._guarded = input.strategy in (Strategy.ROLLING, Strategy.IMMEDIATE)
        self._released: dict[str, MachineSnapshot] = {}

    async def run(self) -> RolloutResult:
        strategy, dep = self._input.strategy, self._deployment
        if strategy is Strategy.FLYCTL:
            raise UNSUPPORTED_STRATEGY(
                "The flyctl strategy is run by flyctl_deploy, not by roll_out_release"
            )
        # Before anything is touched: a config the platform cannot run fails here.
        probe = self._config({})
        if strategy is Strategy.BLUEGREEN and not has_checks(probe):
            raise BLUE_GREEN_NEEDS_CHECKS(
                f"Blue-green deploy of {self._app} needs at least one health check in "
                "fly.toml ([[http_service.checks]] or [checks]): without one nothing tells "
                "when the new machines may take the traffic"
            )
        async with self._s.running():
            listed = self._from_snapshot()
            if listed is None:
                listed = await self._s.list_group() or []
            self._release_version = release_version(listed, dep)
            canaries = [m for m in listed if m.metadata.get(CANARY_KEY)]
            regular = [m for m in listed if not m.metadata.get(CANARY_KEY)]
            if strategy is Strategy.BLUEGREEN:
                _refuse_volumes(self._app, regular)
            await self._s.lease_all(listed)
            if listed and not self._guarded:
                # Read again under the leases: a change made between the listing and the
                # leases must survive the update. (Guarded updates need no second read:
                # a machine changed since is refused, read and updated again.)
                fresh = {m.id: m for m in await self._s.list_group() or []}
                canaries = [fresh[m.id] for m in canaries if m.id in fresh]
                regular = [fresh[m.id] for m in regular if m.id in fresh]
            steps = [] if strategy is Strategy.BLUEGREEN else self._plan(regular)
            _refuse_new_mounts(self._app, steps)
            # An earlier attempt that got as far as updating a machine saw its canary pass.
            resumed = any(s.kind == "keep" for s in steps)
            use_canary = strategy is Strategy.CANARY and bool(regular) and not resumed
            kept = next(
                (c for c in canaries if use_canary and c.metadata.get(CANARY_KEY) == dep), None
            )
            strays = [c for c in canaries if c is not kept]
            if strays:
                # Canaries of interrupted deploys: never part of a release.
                await all_or_first_error(self._s.destroy(c.id) for c in strays)
            if strategy is Strategy.BLUEGREEN:
                outcomes = await self._bluegreen(regular)
            elif strategy is Strategy.IMMEDIATE:
                outcomes = await all_or_first_error(self._apply(s, wait=False) for s in steps)
            else:
                if use_canary:
                    await self._canary(kept, regular[0])
                elif strategy is Strategy.CANARY and not regular:
                    activity.logger.info(
                        "Fly app %s runs no release yet: no canary to compare against, "
                        "creating the machines of %s instead",
                        self._app,
                        dep,
                    )
                outcomes = await self._rolling(steps)
        released = None
        if self._guarded:
            released = ReleaseSnapshot(
                app_name=self._app, machines=[self._released[o.machine_id] for o in outcomes]
            )
        return RolloutResult(
            machines=outcomes, image_digest=_digest(outcomes, self._digests), released=released
        )

    def _from_snapshot(self) -> list[Machine] | None:
        """The machines of the snapshot taken just before, for a first attempt of a rolling
        or immediate rollout; None when the group must be listed (a retry, whose earlier
        attempt may have changed it, canaries to clean up, or versions not known)."""
        snapshot = self._input.snapshot
        if (
            snapshot is None
            or not self._guarded
            or snapshot.app_missing
            or snapshot.canaries
            or activity.info().attempt != 1
            or any(m.version is None for m in snapshot.machines)
        ):
            return None
        return [
            Machine.model_validate(
                {
                    "id": m.machine_id,
                    "state": m.state,
                    "region": m.region or None,
                    "instance_id": m.instance_id,
                    "version": m.version,
                    "config": m.config,
                }
            )
            for m in snapshot.machines
        ]

    # ------------------------------------------------------------------------------ plan

    def _plan(self, machines: list[Machine]) -> list[_Step]:
        steps: list[_Step] = []
        earlier: dict[int, Machine] = {}
        others: list[Machine] = []
        for m in machines:
            slot = _slot(m)
            if (
                m.metadata.get(DEPLOYMENT_KEY) == self._deployment
                and slot is not None
                and slot not in earlier
            ):
                earlier[slot] = m
            else:
                others.append(m)
        # Machines an earlier attempt of this deployment already handled keep their slot.
        for slot, m in sorted(earlier.items()):
            kind: Literal["update", "keep"] = "keep" if m.image == self._input.image else "update"
            steps.append(_Step(slot, kind, self._slot_config(slot, created=False), m))
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
            steps.append(_Step(slot, "update", self._slot_config(slot, created=False), m))
        free = (s for s in itertools.count() if s not in taken)
        for m in unslotted:
            slot = next(free)
            steps.append(_Step(slot, "update", self._slot_config(slot, created=False), m))
        used = {s.slot for s in steps}
        for slot in range(self._input.machine_count):
            if slot not in used and len(used) < self._input.machine_count:
                used.add(slot)
                steps.append(_Step(slot, "create", self._slot_config(slot, created=True)))

        # A running machine goes first: it is the one whose health says something.
        def order(s: _Step) -> tuple[int, int]:
            asleep = s.machine is not None and s.machine.state in ASLEEP_STATES
            return ({"keep": 0, "update": 1, "create": 3}[s.kind] + asleep, s.slot)

        steps.sort(key=order)
        activity.logger.info(
            "%s rollout of %s to Fly app %s: %s",
            self._input.strategy.capitalize(),
            self._deployment,
            self._app,
            ", ".join(f"{s.kind} {s.machine.id if s.machine else f'slot {s.slot}'}" for s in steps)
            or "nothing to do",
        )
        return steps

    def _config(self, extra: Mapping[str, str]) -> dict[str, Any]:
        metadata = {
            "fly_platform_version": "v2",
            "fly_process_group": PROCESS_GROUP,
            "fly_release_id": self._deployment,
            RELEASE_VERSION_KEY: str(self._release_version),
            DEPLOYER_VERSION_KEY: deployer_version(),
            DEPLOYMENT_KEY: self._deployment,
            **extra,
        }
        try:
            return machine_config(
                self._input.fly_toml,
                image=self._input.image,
                metadata=metadata,
                process_group=PROCESS_GROUP,
            )
        except ValueError as exc:
            raise FLY_TOML_ERROR(
                f"fly.toml of {self._app} cannot be turned into a machine config: {exc}"
            ) from None

    def _slot_config(self, slot: int, *, created: bool) -> dict[str, Any]:
        extra = {SLOT_KEY: str(slot)}
        if created:
            extra[CREATED_IN_KEY] = self._deployment
        return self._config(extra)

    # --------------------------------------------------------------------------- rolling

    async def _rolling(self, steps: list[_Step]) -> list[MachineOutcome]:
        outcomes: list[MachineOutcome] = []
        size = _batch_size(self._input.max_unavailable, len(steps))
        batches = [steps[:1], *(steps[i : i + size] for i in range(1, len(steps), size))]
        for batch in batches:
            outcomes += await all_or_first_error(self._apply(s, wait=True) for s in batch)
        return outcomes

    async def _apply(self, step: _Step, *, wait: bool) -> MachineOutcome:
        previous: Machine | None = None
        if step.kind == "create":
            machine = await self._s.create(
                await self._volumes.attach(step.config, self._input.region),
                self._input.region,
                label=f"machine (slot {step.slot})",
                matches=lambda m: (
                    m.metadata.get(DEPLOYMENT_KEY) == self._deployment
                    and _slot(m) == step.slot
                    and not any(m.metadata.get(k) for k in _TRANSIENT_KEYS)
                ),
            )
            action = "created"
        elif step.kind == "update":
            assert step.machine is not None
            previous = step.machine
            while True:
                asleep = previous.state in ASLEEP_STATES
                try:
                    machine = await self._s.update(
                        previous,
                        _carried(previous.config, step.config),
                        skip_launch=asleep,
                        guarded=self._guarded,
                    )
                    break
                except MachineChanged as changed:
                    activity.logger.info(
                        "Machine %s of Fly app %s changed since it was read (version %s, "
                        "now %s): updating it from what it is now",
                        previous.id,
                        self._app,
                        previous.version,
                        changed.current.version,
                    )
                    previous = changed.current
            activity.logger.info(
                "Updated machine %s of Fly app %s to %s (instance %s%s)",
                machine.id,
                self._app,
                self._input.image,
                machine.instance_id,
                ", left stopped" if asleep else "",
            )
            action = "updated"
        else:
            assert step.machine is not None
            machine = step.machine
            created_here = machine.metadata.get(CREATED_IN_KEY) == self._deployment
            action = "created" if created_here else "updated"
            activity.logger.info(
                "Machine %s of Fly app %s already runs %s", machine.id, self._app, self._deployment
            )
        checks = None
        asleep = machine.state in ASLEEP_STATES
        if wait and not asleep:
            checks = await self._s.wait_healthy(
                machine, machine.config or step.config, started_earlier=step.kind == "keep"
            )
        self._released[machine.id] = MachineSnapshot(
            machine_id=machine.id,
            region=machine.region or self._input.region,
            # Not left asleep: it was started (rolling waited for it; immediate asked for it).
            state=(machine.state or "stopped") if asleep else "started",
            instance_id=machine.instance_id,
            config=machine.config or step.config,
            version=machine.version,
        )
        await self._s.release(machine.id)
        self._s.mark_done(machine.id)
        return self._outcome(machine, action, previous, checks)

    def _outcome(
        self,
        machine: Machine,
        action: str,
        previous: Machine | None,
        checks: CheckWindow | None = None,
    ) -> MachineOutcome:
        self._digests[machine.id] = _image_digest(machine)
        return MachineOutcome(
            checks_passed=checks,
            machine_id=machine.id,
            action=action,
            instance_id=machine.instance_id,
            region=machine.region,
            previous_instance_id=previous.instance_id if previous else None,
            previous_version=_version(previous) if previous else None,
        )

    # ---------------------------------------------------------------------------- canary

    async def _canary(self, adopted: Machine | None, model: Machine) -> None:
        config = _derived(model.config, self._config({CANARY_KEY: self._deployment}))
        canary: Machine | None = adopted
        try:
            if canary is None:
                canary = await self._s.create(
                    config,
                    self._input.region,
                    label=f"canary of {self._deployment}",
                    matches=lambda m: m.metadata.get(CANARY_KEY) == self._deployment,
                )
            await self._s.wait_healthy(canary, canary.config or config)
        except BaseException:
            # Also a canary whose create was cut short by the failure may exist.
            await asyncio.shield(self._discard(CANARY_KEY, [canary.id] if canary else []))
            raise
        activity.logger.info(
            "Canary %s of %s in Fly app %s is healthy", canary.id, self._deployment, self._app
        )
        await asyncio.shield(self._s.destroy(canary.id))

    async def _discard(self, marker: str, known: list[str]) -> None:
        found = await self._s.find(lambda m: m.metadata.get(marker) == self._deployment)
        destroyed = await self._s.destroy_quietly([*known, *(m.id for m in found)])
        if destroyed:
            activity.logger.info(
                "Removed %s of %s from Fly app %s: %s",
                "the canary" if marker == CANARY_KEY else "the new machines",
                self._deployment,
                self._app,
                ", ".join(destroyed),
            )

    # ------------------------------------------------------------------------- bluegreen

    async def _bluegreen(self, machines: list[Machine]) -> list[MachineOutcome]:
        greens: dict[int, Machine] = {}
        blues: list[Machine] = []
        for m in machines:
            slot = _slot(m)
            if (
                m.metadata.get(GREEN_KEY) == self._deployment
                and slot is not None
                and slot not in greens
            ):
                greens[slot] = m
            else:
                blues.append(m)
        count = max(len(blues), len(greens)) or self._input.machine_count
        activity.logger.info(
            "Blue-green rollout of %s to Fly app %s: %d new machine(s) beside %s",
            self._deployment,
            self._app,
            count,
            ", ".join(m.id for m in blues) or "none",
        )
        created: list[Machine] = []
        try:
            created = await all_or_first_error(
                self._create_green(slot, blues[slot] if slot < len(blues) else None)
                for slot in range(count)
                if slot not in greens
            )
            for green in created:
                greens[_slot(green) or 0] = green
            ordered = sorted(greens.items())
            windows = await all_or_first_error(
                self._s.wait_healthy(g, g.config) for _, g in ordered
            )
            checks = {g.id: w for (_, g), w in zip(ordered, windows, strict=True)}
            self._s.set_progress(", ".join(g.id for g in greens.values()), "moving traffic")
            await all_or_first_error(self._uncordon(g) for g in greens.values())
        except BaseException:
            known = [g.id for g in greens.values()] + [g.id for g in created]
            await asyncio.shield(self._discard(GREEN_KEY, known))
            raise
        # From here the new release serves: a failure leaves both versions for the
        # restore to sort out.
        await all_or_first_error(self._retire(b) for b in blues)
        outcomes = []
        for _, green in sorted(greens.items()):
            self._s.mark_done(green.id)
            outcomes.append(self._outcome(green, "created", None, checks.get(green.id)))
        return outcomes

    async def _create_green(self, slot: int, blue: Machine | None) -> Machine:
        config = self._config(
            {SLOT_KEY: str(slot), CREATED_IN_KEY: self._deployment, GREEN_KEY: self._deployment}
        )
        if blue is not None:
            config = _derived(blue.config, config)
        return await self._s.create(
            config,
            (blue.region or self._input.region) if blue else self._input.region,
            label=f"new machine (slot {slot})",
            matches=lambda m: m.metadata.get(GREEN_KEY) == self._deployment and _slot(m) == slot,
            skip_service_registration=True,
        )

    async def _uncordon(self, machine: Machine) -> None:
        await self._s.call(
            f"Route traffic to machine {machine.id} of Fly app {self._app}",
            self._s.fly.uncordon_machine(
                self._app, machine.id, nonce=self._s.leases.get(machine.id)
            ),
        )

    async def _retire(self, blue: Machine) -> None:
        """Take an old machine out of the proxy, let it stop, then destroy it."""
        fly, where = self._s.fly, f"machine {blue.id} of Fly app {self._app}"
        self._s.set_progress(blue.id, "retiring old machine")
        nonce = self._s.leases.get(blue.id)
        await self._s.call(
            f"Stop routing traffic to {where}",
            fly.cordon_machine(self._app, blue.id, nonce=nonce),
        )
        if blue.state not in ASLEEP_STATES:
            await self._s.call(f"Stop {where}", fly.stop_machine(self._app, blue.id, nonce=nonce))
            # In-flight requests finish during the stop; the destroy below forces the rest.
            with contextlib.suppress(FlyError):
                await fly.wait_machine(
                    self._app,
                    blue.id,
                    "stopped",
                    instance_id=blue.instance_id,
                    timeout=min(
                        self._input.timings.machine_wait_timeout.total_seconds(),
                        _STOP_WAIT_MAX_SECONDS,
                    ),
                )
        await self._s.destroy(blue.id)


# ---------------------------------------------------------------------------------------


def _slot(m: Machine) -> int | None:
    value = m.metadata.get(SLOT_KEY, "")
    return int(value) if value.isdigit() else None


def _batch_size(max_unavailable: float, count: int) -> int:
    if max_unavailable < 1:
        return max(1, math.ceil(max_unavailable * count))
    return max(1, int(max_unavailable))


def _carried(current: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The next config of an updated machine: fields fly.toml does not manage survive."""
    base = copy.deepcopy(dict(current))
    meta = dict(base.get("metadata") or {})
    for key in _TRANSIENT_KEYS:
        meta.pop(key, None)
    base["metadata"] = meta
    return overlay_managed(base, new)


def _derived(model: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A new machine's config modelled on a running one: its unmanaged fields, none of its
    identity."""
    base = copy.deepcopy(dict(model))
    meta = dict(base.get("metadata") or {})
    for key in _PER_MACHINE_KEYS:
        meta.pop(key, None)
    base["metadata"] = meta
    base.pop("mounts", None)
    return overlay_managed(base, new)


def _refuse_volumes(app: str, machines: list[Machine]) -> None:
    with_mounts = [m.id for m in machines if m.config.get("mounts")]
    if with_mounts:
        raise BLUE_GREEN_WITH_VOLUMES(
            f"Blue-green deploy of {app} is not possible: machine(s) {', '.join(with_mounts)} "
            "have volumes, which a new machine cannot share; use the rolling strategy"
        )


def _refuse_new_mounts(app: str, steps: list[_Step]) -> None:
    """A volume cannot be attached to a machine that exists (as flyctl says too): a fly.toml
    that gained `[mounts]` needs new machines, which only the operator may decide to make,
    since the old machines' disks go with them."""
    bare = [
        s.machine.id
        for s in steps
        if s.kind == "update"
        and s.machine is not None
        and s.config.get("mounts")
        and not s.machine.config.get("mounts")
    ]
    if bare:
        raise MOUNTS_NEED_NEW_MACHINES(
            f"fly.toml of {app} has [mounts], but machine(s) {', '.join(bare)} have no "
            "volume, and a volume cannot be attached to an existing machine; destroy them "
            f"(fly machine destroy --force ID -a {app}) and deploy again: the machines "
            "created for the missing slots get volumes"
        )


def _image_digest(machine: Machine) -> str | None:
    ref = (machine.model_extra or {}).get("image_ref")
    digest = ref.get("digest") if isinstance(ref, dict) else None
    return digest if isinstance(digest, str) and digest else None


def _version(machine: Machine) -> str | None:
    return machine.version or None


def _digest(outcomes: list[MachineOutcome], digests: Mapping[str, str | None]) -> str | None:
    for outcome in outcomes:
        digest = digests.get(outcome.machine_id)
        if digest:
            return digest
    return None
