"""Step 4: the app's machines run the new image and pass their checks.

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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._errors import (
    BLUE_GREEN_NEEDS_CHECKS,
    BLUE_GREEN_WITH_VOLUMES,
    FLY_TOML_ERROR,
    MACHINE_UNHEALTHY,
    UNSUPPORTED_STRATEGY,
    to_application_error,
)
from flyapi import (
    FlyClient,
    FlyError,
    FlyForbidden,
    FlyNotFound,
    FlyRetryableError,
    FlyTransportError,
    FlyUnauthorized,
    Machine,
)
from turbodeploy.core.flytoml import machine_config, overlay_managed
from turbodeploy.core.models import CheckWindow, DeployTimings, MachineOutcome, Model, Strategy
from turbodeploy.core.settings import Settings

PROCESS_GROUP = "app"
DEPLOYMENT_KEY = "turbodeploy_deployment_id"
SLOT_KEY = "turbodeploy_slot"
CREATED_IN_KEY = "turbodeploy_created_in"
CANARY_KEY = "turbodeploy_canary_of"
GREEN_KEY = "turbodeploy_green_of"
RESTORED_BY_KEY = "turbodeploy_restored_by"
RESTORES_KEY = "turbodeploy_restores"
LEASE_DESCRIPTION = "turbodeploy rollout"

# Markers that describe one deployment's handling of one machine; a machine derived from
# another, or updated by a later deployment, must not inherit them.
_TRANSIENT_KEYS = (CANARY_KEY, GREEN_KEY, RESTORED_BY_KEY, RESTORES_KEY)
_PER_MACHINE_KEYS = (SLOT_KEY, CREATED_IN_KEY, *_TRANSIENT_KEYS)

# A stopped (scaled-to-zero) machine is updated without being woken: the proxy starts it
# on the next request, and the public health check makes that request.
ASLEEP_STATES = frozenset({"stopped", "suspended"})
_DEAD_STATES = frozenset({"failed", "destroyed", "destroying"})
_MIN_HEARTBEAT_SECONDS = 0.05
_MAX_HEARTBEAT_SECONDS = 10.0
_STOP_WAIT_MAX_SECONDS = 60.0

_T = TypeVar("_T")


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


class RolloutResult(Model):
    machines: list[MachineOutcome]
    image_digest: str | None = None

    @property
    def machine_ids(self) -> list[str]:
        return [m.machine_id for m in self.machines]


class RolloutProgress(BaseModel):
    """Heartbeat details: where the rollout is, readable in the Web UI."""

    done: list[str] = Field(default_factory=list)
    current: str | None = None
    step: str = "listing machines"


# ---------------------------------------------------------------------------------------
# Machinery shared by rollout and restore: leases, heartbeats, waits, creates, destroys.
# ---------------------------------------------------------------------------------------


class MachineSession:
    """One activity attempt's work on one app's machines: the leases it holds, its
    heartbeats and its progress."""

    def __init__(
        self,
        fly: FlyClient,
        app: str,
        timings: DeployTimings,
        checks_hint: CheckWindow | None = None,
    ) -> None:
        self.fly = fly
        self.app = app
        self.timings = timings
        # When checks are expected to pass after a start: the last release's, then what
        # this session's own machines showed.
        self.checks_hint = checks_hint
        self.ttl = max(1, math.ceil(timings.lease_ttl.total_seconds()))
        self.leases: dict[str, str] = {}
        self.progress = RolloutProgress()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[MachineSession]:
        """Heartbeat and keep the leases alive inside; release every lease on the way out."""
        background = [
            asyncio.create_task(self._heartbeat_forever()),
            asyncio.create_task(self._refresh_leases_forever()),
        ]
        try:
            yield self
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            # Shielded: a cancelled activity must still hand its machines back.
            await asyncio.shield(self.release_all())

    # ------------------------------------------------------------------------- listing

    async def list_group(self) -> list[Machine] | None:
        """The live v2 machines of the `app` process group, oldest first; None without app."""
        try:
            machines = await self.read(
                f"List machines of Fly app {self.app}",
                lambda: self.fly.list_machines(self.app),
                missing_ok=True,
            )
        except FlyNotFound:
            return None
        return sorted(
            (m for m in machines if in_group(m)), key=lambda m: (m.created_at or "", m.id)
        )

    async def find(self, matches: Callable[[Machine], bool]) -> list[Machine]:
        return await self._lookup(matches) or []

    async def _lookup(self, matches: Callable[[Machine], bool]) -> list[Machine] | None:
        """The group's machines that `matches`; None when they could not be listed."""
        try:
            listed = await self.fly.list_machines(self.app)
        except FlyError:
            return None
        return [m for m in listed if matches(m) and in_group(m)]

    # -------------------------------------------------------------------------- leases

    async def lease_all(self, machines: Iterable[Machine]) -> None:
        """Lease every machine, or none: on any failure the leases taken are given back
        and a retryable error says which machine could not be leased."""
        targets = [m for m in machines if m.id not in self.leases]
        if not targets:
            return
        self.set_progress(", ".join(m.id for m in targets), "leasing machines")
        results = await asyncio.gather(
            *(self._lease(m.id) for m in targets), return_exceptions=True
        )
        for machine, result in zip(targets, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if not isinstance(result, FlyError):
                continue
            await self.release_all()
            error = to_application_error(
                result, action=f"Lease machine {machine.id} of Fly app {self.app}"
            )
            if isinstance(result, FlyUnauthorized | FlyForbidden):
                raise error from None
            # Nothing has been touched yet; whatever held the lease or removed the
            # machine, a later attempt starts from a fresh listing.
            raise ApplicationError(
                error.message, type=error.type, next_retry_delay=error.next_retry_delay
            ) from None
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _lease(self, machine_id: str) -> None:
        lease = await self.fly.acquire_lease(
            self.app, machine_id, self.ttl, description=LEASE_DESCRIPTION
        )
        self.leases[machine_id] = lease.nonce
        activity.logger.info("Leased machine %s of Fly app %s", machine_id, self.app)

    async def _refresh_leases_forever(self) -> None:
        interval = self.ttl / 3
        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(self._refresh(m, n) for m, n in list(self.leases.items())))

    async def _refresh(self, machine_id: str, nonce: str) -> None:
        try:
            lease = await self.fly.acquire_lease(self.app, machine_id, self.ttl, nonce=nonce)
        except FlyError as exc:
            activity.logger.warning(
                "Could not refresh the lease on machine %s of Fly app %s: %s",
                machine_id,
                self.app,
                exc,
            )
            return
        if machine_id in self.leases:
            self.leases[machine_id] = lease.nonce

    async def release_all(self) -> None:
        leases, self.leases = self.leases, {}
        await asyncio.gather(*(self._release(m, n) for m, n in leases.items()))

    async def release(self, machine_id: str) -> None:
        """Hand back one machine the rollout is done with (as flyctl does), so the leases
        still to refresh are only those of machines still being worked on."""
        nonce = self.leases.pop(machine_id, None)
        if nonce is not None:
            await asyncio.shield(self._release(machine_id, nonce))

    async def _release(self, machine_id: str, nonce: str) -> None:
        try:
            await self.fly.release_lease(self.app, machine_id, nonce)
        except FlyError as exc:
            # It expires on its own after the ttl; the next deploy only waits longer.
            activity.logger.warning(
                "Could not release the lease on machine %s of Fly app %s: %s",
                machine_id,
                self.app,
                exc,
            )
        else:
            activity.logger.info("Released machine %s of Fly app %s", machine_id, self.app)

    # ----------------------------------------------------------------------- mutations

    async def create(
        self,
        config: dict[str, Any],
        region: str,
        *,
        label: str,
        matches: Callable[[Machine], bool],
        skip_launch: bool = False,
        skip_service_registration: bool = False,
    ) -> Machine:
        """Create a leased machine; after a lost or late answer, adopt the machine the
        create made anyway (found by `matches` on its metadata)."""
        self.set_progress(label, "creating machine")
        action = f"Create {label} in Fly app {self.app}"
        attempt = 1
        while True:
            try:
                machine = await self.fly.create_machine(
                    self.app,
                    config,
                    region,
                    lease_ttl=self.ttl,
                    skip_launch=skip_launch,
                    skip_service_registration=skip_service_registration,
                )
                break
            except (FlyRetryableError, FlyTransportError) as exc:
                found = await self._lookup(matches)
                if found:
                    activity.logger.info(
                        "Machine %s of Fly app %s was created despite: %s",
                        found[0].id,
                        self.app,
                        exc,
                    )
                    return found[0]
                # Created again only when a listing shows the first try made nothing (a
                # failed listing proves nothing), as the Fly client retries its other calls.
                delay = self.fly.retry_delay(exc, attempt) if found is not None else None
                if delay is None:
                    raise to_application_error(exc, action=action) from None
                why = f"{action}: {exc}; none was made, again in {delay:.1f}s"
                activity.logger.info("%s", why)
                await self.fly.pause(delay, why)
                attempt += 1
            except FlyError as exc:
                raise to_application_error(exc, action=action) from None
        if machine.nonce:
            self.leases[machine.id] = machine.nonce
        activity.logger.info(
            "Created %s as machine %s in Fly app %s, region %s",
            label,
            machine.id,
            self.app,
            machine.region,
        )
        return machine

    async def update(
        self, machine: Machine, config: Mapping[str, Any], *, skip_launch: bool
    ) -> Machine:
        self.set_progress(machine.id, "updating machine")
        updated = await self.call(
            f"Update machine {machine.id} of Fly app {self.app}",
            self.fly.update_machine(
                self.app,
                machine.id,
                config,
                machine.region,
                nonce=self.leases.get(machine.id),
                skip_launch=skip_launch,
            ),
        )
        if skip_launch and updated.state not in ASLEEP_STATES:
            # Some servers answer with the pre-update state; what counts is that we did
            # not ask for a start.
            updated = updated.model_copy(update={"state": machine.state})
        return updated

    async def destroy(self, machine_id: str) -> None:
        """Destroy the machine even while it runs; one already gone is not an error."""
        self.set_progress(machine_id, "destroying machine")
        try:
            await self.fly.delete_machine(
                self.app, machine_id, force=True, nonce=self.leases.get(machine_id)
            )
        except FlyNotFound:
            pass
        except FlyError as exc:
            raise to_application_error(
                exc, action=f"Destroy machine {machine_id} of Fly app {self.app}"
            ) from None
        # A destroyed machine's lease goes with it.
        self.leases.pop(machine_id, None)
        activity.logger.info("Destroyed machine %s of Fly app %s", machine_id, self.app)

    async def destroy_quietly(self, machine_ids: Iterable[str]) -> list[str]:
        """Destroy what can be destroyed while another failure is on its way up."""
        ids = list(dict.fromkeys(machine_ids))
        results = await asyncio.gather(*(self.destroy(m) for m in ids), return_exceptions=True)
        destroyed = []
        for machine_id, result in zip(ids, results, strict=True):
            if isinstance(result, Exception):
                activity.logger.warning(
                    "Could not destroy machine %s of Fly app %s: %s", machine_id, self.app, result
                )
            else:
                destroyed.append(machine_id)
        return destroyed

    # --------------------------------------------------------------------------- waits

    async def wait_healthy(self, machine: Machine, config: Mapping[str, Any]) -> CheckWindow | None:
        """Wait for this version of the machine to start, then for all its checks to pass.

        Returns when the checks passed after the start (None without checks).
        """
        timeout = self.timings.machine_wait_timeout
        deadline = time.monotonic() + timeout.total_seconds()
        where = f"machine {machine.id} of Fly app {self.app}"
        self.set_progress(machine.id, "waiting for machine to start")
        while not await self.read(
            f"Wait for {where} to start",
            lambda: self.fly.wait_machine(
                self.app,
                machine.id,
                "started",
                instance_id=machine.instance_id,
                timeout=max(deadline - time.monotonic(), 0),
            ),
        ):
            current = await self.read(
                f"Read {where}", lambda: self.fly.get_machine(self.app, machine.id)
            )
            if current.state in _DEAD_STATES or time.monotonic() >= deadline:
                raise _unhealthy(
                    f"Machine {machine.id} of Fly app {self.app} did not start within "
                    f"{_human(timeout)} (state {current.state})",
                    current,
                )
        if not has_checks(config):
            return None
        self.set_progress(machine.id, "waiting for health checks")
        started = time.monotonic()
        pace = CheckPace(
            self.checks_hint,
            interval=self.timings.machine_poll_interval.total_seconds(),
            near=self.timings.machine_poll_near_interval.total_seconds(),
        )
        failing_until = 0.0
        while True:
            now = time.monotonic()
            await asyncio.sleep(min(pace.delay(now - started), max(deadline - now, 0)))
            sent = time.monotonic() - started
            current = await self.read(
                f"Read {where}", lambda: self.fly.get_machine(self.app, machine.id)
            )
            if current.checks and all(c.passing for c in current.checks):
                window = CheckWindow(failing_until=failing_until, passing_at=pace.observed(sent))
                activity.logger.info(
                    "Machine %s of Fly app %s passes its %d check(s), %.1fs after its start",
                    machine.id,
                    self.app,
                    len(current.checks),
                    window.passing_at,
                )
                self.checks_hint = window
                return window
            failing_until = sent
            if time.monotonic() >= deadline:
                failing = [c for c in current.checks if not c.passing]
                summary = "; ".join(
                    f"{c.name or 'check'} is {c.status or 'unknown'}"
                    + (f": {c.output.strip()}" if c.output and c.output.strip() else "")
                    for c in failing
                )
                raise _unhealthy(
                    f"Machine {machine.id} of Fly app {self.app} did not pass its health "
                    f"checks within {_human(timeout)}: {summary or 'no check has reported yet'}",
                    current,
                )

    # ---------------------------------------------------------------------------- misc

    def set_progress(self, current: str, step: str) -> None:
        self.progress.current = current
        self.progress.step = step
        activity.heartbeat(self.progress.model_dump())

    def mark_done(self, machine_id: str) -> None:
        self.progress.done.append(machine_id)
        self.progress.current = None
        self.progress.step = f"{len(self.progress.done)} machine(s) ready"
        activity.heartbeat(self.progress.model_dump())

    async def _heartbeat_forever(self) -> None:
        # Server-side waits last up to a minute; keep the heartbeat alive across them.
        timeout = activity.info().heartbeat_timeout
        interval = timeout.total_seconds() / 3 if timeout else _MAX_HEARTBEAT_SECONDS
        interval = min(max(interval, _MIN_HEARTBEAT_SECONDS), _MAX_HEARTBEAT_SECONDS)
        while True:
            await asyncio.sleep(interval)
            activity.heartbeat(self.progress.model_dump())

    @staticmethod
    async def call(action: str, awaitable: Awaitable[_T]) -> _T:
        try:
            return await awaitable
        except FlyError as exc:
            raise to_application_error(exc, action=action) from None

    @staticmethod
    async def read(
        action: str, request: Callable[[], Awaitable[_T]], *, missing_ok: bool = False
    ) -> _T:
        """A request without side effects. A passing 429 or 5xx is retried by the client
        itself (`flyapi.RequestRetry`, as the worker configures it), not here."""
        try:
            return await request()
        except FlyError as exc:
            if missing_ok and isinstance(exc, FlyNotFound):
                raise
            raise to_application_error(exc, action=action) from None


async def all_or_first_error(awaitables: Iterable[Awaitable[_T]]) -> list[_T]:
    """Run concurrently; on the first failure cancel the rest and raise that failure."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
    return [task.result() for task in tasks]


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
    def __init__(self, fly: FlyClient, settings: Settings) -> None:
        self._fly = fly
        self._settings = settings

    @activity.defn(name="roll_out_release")
    async def roll_out(self, input: RolloutInput) -> RolloutResult:
        return await _Rollout(self._fly, input).run()


class _Rollout:
    """One attempt of one rollout."""

    def __init__(self, fly: FlyClient, input: RolloutInput) -> None:
        self._input = input
        self._app = input.app_name
        self._deployment = input.deployment_id
        self._s = MachineSession(fly, input.app_name, input.timings, input.checks_hint)
        self._digests: dict[str, str | None] = {}

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
            listed = await self._s.list_group() or []
            canaries = [m for m in listed if m.metadata.get(CANARY_KEY)]
            regular = [m for m in listed if not m.metadata.get(CANARY_KEY)]
            if strategy is Strategy.BLUEGREEN:
                _refuse_volumes(self._app, regular)
            await self._s.lease_all(listed)
            if listed:
                # Read again under the leases: a change made between the listing and the
                # leases must survive the update.
                fresh = {m.id: m for m in await self._s.list_group() or []}
                canaries = [fresh[m.id] for m in canaries if m.id in fresh]
                regular = [fresh[m.id] for m in regular if m.id in fresh]
            steps = [] if strategy is Strategy.BLUEGREEN else self._plan(regular)
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
        return RolloutResult(machines=outcomes, image_digest=_digest(outcomes, self._digests))

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
                step.config,
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
            asleep = previous.state in ASLEEP_STATES
            machine = await self._s.update(
                previous, _carried(previous.config, step.config), skip_launch=asleep
            )
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
        if wait and machine.state not in ASLEEP_STATES:
            checks = await self._s.wait_healthy(machine, machine.config or step.config)
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


class CheckPace:
    """When to read a machine's checks, from when they passed in the last release.

    Without a hint: at once, then every `interval`. With one: first when the checks passed
    last time, then every `near` for a while (the app may boot a little slower this time:
    a quarter of the expected time, at least two near reads, at most one interval), then
    every `interval`. Reads keep to that grid of times after the start, so the time each
    read takes does not add up. A fixed interval rather than a backoff: backing off
    overshoots checks that pass a few seconds after the start (measured: BENCHMARKS.md).
    """

    def __init__(self, hint: CheckWindow | None, *, interval: float, near: float) -> None:
        self._hint = hint
        self._times = self._grid(hint, interval, min(near, interval))
        self._last = -1.0
        self._reads = 0

    @staticmethod
    def _grid(hint: CheckWindow | None, interval: float, near: float) -> Iterator[float]:
        if hint is None:
            yield from (k * interval for k in itertools.count())
            return
        expected = hint.passing_at
        near_until = expected + min(interval, max(2 * near, expected / 4))
        yield from itertools.takewhile(
            lambda t: t < near_until, (expected + k * near for k in itertools.count())
        )
        yield from (near_until + k * interval for k in itertools.count())

    def delay(self, elapsed: float) -> float:
        """Seconds to wait before the next read, `elapsed` seconds after the start.

        A read that took longer than the grid step is followed by the next one at once.
        """
        self._reads += 1
        at = next(t for t in self._times if t > self._last)
        self._last = max(at, elapsed)
        return max(at - elapsed, 0.0)

    def observed(self, sent: float) -> float:
        """When the checks passed, given the send time of the read that saw them pass."""
        if self._hint is not None and self._reads == 1:
            # The first read, made when expected, passed: the checks passed by then. Its
            # send time is a little later; kept, it would creep up deploy after deploy.
            return min(sent, self._hint.passing_at)
        return sent


def in_group(m: Machine) -> bool:
    meta = m.metadata
    return (
        meta.get("fly_platform_version") == "v2"
        and meta.get("fly_process_group") == PROCESS_GROUP
        and not m.gone
    )


def has_checks(config: Mapping[str, Any]) -> bool:
    if config.get("checks"):
        return True
    return any(isinstance(s, dict) and s.get("checks") for s in config.get("services") or [])


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


def _image_digest(machine: Machine) -> str | None:
    ref = (machine.model_extra or {}).get("image_ref")
    digest = ref.get("digest") if isinstance(ref, dict) else None
    return digest if isinstance(digest, str) and digest else None


def _version(machine: Machine) -> str | None:
    version = (machine.model_extra or {}).get("version")
    return version if isinstance(version, str) and version else None


def _digest(outcomes: list[MachineOutcome], digests: Mapping[str, str | None]) -> str | None:
    for outcome in outcomes:
        digest = digests.get(outcome.machine_id)
        if digest:
            return digest
    return None


def _human(value: timedelta) -> str:
    seconds = value.total_seconds()
    return f"{seconds:g}s" if seconds < 120 else f"{seconds / 60:g} min"


def _unhealthy(message: str, machine: Machine) -> ApplicationError:
    return MACHINE_UNHEALTHY(
        message,
        {
            "machine_id": machine.id,
            "state": machine.state,
            "checks": [c.model_dump(mode="json") for c in machine.checks],
        },
    )
