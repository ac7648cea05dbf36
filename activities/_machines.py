"""Machines under lease, shared by the rollout and the restore: leases held and refreshed
while an attempt runs and always released, heartbeats with progress, waits for a state or
for checks, creates and destroys that a retry can repeat, and the metadata markers that let
a later attempt adopt what an earlier one did.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import importlib.metadata
import itertools
import math
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._errors import (
    MACHINE_FAILED,
    MACHINE_UNHEALTHY,
    to_application_error,
)
from activities._heartbeat import heartbeat_details_from
from core.models import CheckWindow, DeployTimings
from flyapi import (
    FlyAPIError,
    FlyBadRequest,
    FlyClient,
    FlyError,
    FlyForbidden,
    FlyNotFound,
    FlyRetryableError,
    FlyTransportError,
    FlyUnauthorized,
    Machine,
)

PROCESS_GROUP = "app"
DEPLOYMENT_KEY = "turbodeploy_deployment_id"
SLOT_KEY = "turbodeploy_slot"
CREATED_IN_KEY = "turbodeploy_created_in"
CANARY_KEY = "turbodeploy_canary_of"
GREEN_KEY = "turbodeploy_green_of"
RESTORED_BY_KEY = "turbodeploy_restored_by"
RESTORES_KEY = "turbodeploy_restores"
LEASE_DESCRIPTION = "turbodeploy rollout"
# flyctl's release metadata: `fly status` shows a machine's release version from it.
RELEASE_VERSION_KEY = "fly_release_version"
DEPLOYER_VERSION_KEY = "fly_flyctl_version"
# A stopped (scaled-to-zero) machine is updated without being woken: the proxy starts it
# on the next request, and the public health check makes that request.
ASLEEP_STATES = frozenset({"stopped", "suspended"})
_MIN_HEARTBEAT_SECONDS = 0.05
_MAX_HEARTBEAT_SECONDS = 10.0
# A lease held elsewhere is read again at most this often, and at least this often (a
# holder that releases early is noticed within a flyctl refresh interval).
_MIN_LEASE_POLL_SECONDS = 0.05
_MAX_LEASE_POLL_SECONDS = 4.0
_T = TypeVar("_T")


class RolloutProgress(BaseModel):
    """Heartbeat details: where the rollout is, readable in the Web UI, and the leases it
    holds (machine id -> nonce), which the next attempt takes over after a crash."""

    done: list[str] = Field(default_factory=list)
    current: str | None = None
    step: str = "listing machines"
    leases: dict[str, str] = Field(default_factory=dict)


class MachineChanged(Exception):
    """A guarded update was refused: the machine changed since it was read."""

    def __init__(self, current: Machine) -> None:
        super().__init__(f"machine {current.id} is now at version {current.version}")
        self.current = current


def lease_refresh_interval(ttl: int) -> float:
    """Seconds between lease refreshes: flyctl's (ttl - 1 s) / 3, 4 s of its 13 s, so two
    refreshes may fail before a lease lapses under a live rollout."""
    return (ttl - 1) / 3 if ttl > 2 else ttl / 3


def lease_room(rate: float, ttl: timedelta) -> int:
    """How many machines one worker may hold leased at once under a budget of `rate`
    requests/s: their refreshes (one per machine per refresh interval) take at most half
    of it, and the rest goes to the deploys' own requests."""
    every = lease_refresh_interval(max(1, math.ceil(ttl.total_seconds())))
    return max(1, int(rate * every / 2))


class MachineSession:
    """One activity attempt's work on one app's machines: the leases it holds, its
    heartbeats and its progress."""

    def __init__(
        self,
        fly: FlyClient,
        app: str,
        timings: DeployTimings,
        checks_hint: CheckWindow | None = None,
        *,
        min_secrets_version: int | None = None,
    ) -> None:
        self.fly = fly
        # Sent with every create and update: the machines boot with these secrets or newer.
        self.min_secrets_version = min_secrets_version
        self.app = app
        self.timings = timings
        # When checks are expected to pass after a start: the last release's, then what
        # this session's own machines showed.
        # A hint borrowed from other projects' machines, not this app's own.
        self._borrowed = checks_hint is None
        self.checks_hint = checks_hint if checks_hint is not None else RECENT_CHECKS.typical()
        self.ttl = max(1, math.ceil(timings.lease_ttl.total_seconds()))
        self.leases: dict[str, str] = {}
        # A refresh is not sent while a release is (or the other way round): a refresh
        # that reached the API after the release would take a new lease (the nonce of a
        # lease that is gone asks for a new one).
        self._lease_lock = asyncio.Lock()
        # Lease requests on their way: each is let finish even when its caller is cancelled.
        self._acquiring: set[asyncio.Task[None]] = set()
        self.progress = RolloutProgress()

    @property
    def refresh_interval(self) -> float:
        return lease_refresh_interval(self.ttl)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[MachineSession]:
        """Take over the leases an earlier attempt left (their nonces are in its last
        heartbeat), heartbeat and keep the leases alive inside; release every lease on the
        way out."""
        with heartbeat_details_from(self._details):
            await self._resume_leases()
            keep_alive = asyncio.create_task(self._keep_alive_forever())
            try:
                yield self
            finally:
                # Shielded: a cancelled activity must still hand its machines back.
                await asyncio.shield(self._stop(keep_alive))

    async def _stop(self, keep_alive: asyncio.Task[None]) -> None:
        # A refresh already sent is let finish: cut short, it could still reach the API
        # after the release and take the lease again, with a nonce nobody holds.
        async with self._lease_lock:
            keep_alive.cancel()
            await asyncio.gather(keep_alive, return_exceptions=True)
        # Likewise a lease request: granted after its caller gave up, it would hold the
        # machine with a nonce nobody knows until it lapsed. Its answer is waited for (no
        # longer than the lease would live) so that `release_all` hands it back too.
        if self._acquiring:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*self._acquiring, return_exceptions=True), self.ttl
                )
        await self.release_all()

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
        """Lease every machine, or none.

        A lease held elsewhere is waited for (read until it is released or lapses) for up
        to `lease_wait_timeout`, holding none of the others meanwhile; then the attempt
        fails, retryably, naming the machine. Any other failure gives back the leases
        taken and says which machine could not be leased.
        """
        wanted = list(dict.fromkeys(m.id for m in machines))
        deadline = time.monotonic() + self.timings.lease_wait_timeout.total_seconds()
        while targets := [m for m in wanted if m not in self.leases]:
            # No heartbeat yet: the first one an attempt sends reaches the server at once
            # (later ones are throttled), and it should carry the nonces taken here.
            self.progress.current, self.progress.step = ", ".join(targets), "leasing machines"
            results = await asyncio.gather(
                *(self._lease(m) for m in targets), return_exceptions=True
            )
            held: dict[str, FlyAPIError] = {}
            for machine_id, result in zip(targets, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if _lease_held(result):
                    assert isinstance(result, FlyAPIError)
                    held[machine_id] = result
                elif isinstance(result, FlyError):
                    await self.release_all()
                    raise self._lease_error(machine_id, result) from None
                elif isinstance(result, BaseException):
                    await self.release_all()
                    raise result
            if not held:
                break
            # Hold nothing while waiting: whoever holds the rest may be waiting for ours.
            await self.release_all()
            await all_or_first_error(
                self._wait_for_lease(m, error, deadline) for m, error in held.items()
            )
        self._heartbeat()

    def _lease_error(self, machine_id: str, exc: FlyError, waited: str = "") -> ApplicationError:
        error = to_application_error(
            exc, action=f"Lease machine {machine_id} of Fly app {self.app}"
        )
        if isinstance(exc, FlyUnauthorized | FlyForbidden):
            return error
        # Nothing has been touched yet; whatever held the lease or removed the machine, a
        # later attempt starts from a fresh listing.
        return ApplicationError(
            error.message + waited, type=error.type, next_retry_delay=error.next_retry_delay
        )

    async def _wait_for_lease(self, machine_id: str, conflict: FlyError, deadline: float) -> None:
        """Return once the machine's lease is free; fail at `deadline`."""
        where = f"machine {machine_id} of Fly app {self.app}"
        poll = min(
            max(self.timings.machine_poll_interval.total_seconds(), _MIN_LEASE_POLL_SECONDS),
            _MAX_LEASE_POLL_SECONDS,
        )
        while True:
            lease = await self.read(
                f"Read the lease on {where}", lambda: self.fly.get_lease(self.app, machine_id)
            )
            if lease is None:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waited = _human(self.timings.lease_wait_timeout)
                raise self._lease_error(
                    machine_id, conflict, f"; still held after waiting {waited}"
                )
            why = (
                f"lease on {where} held by {lease.owner or 'someone else'}"
                + (f" ({lease.description})" if lease.description else "")
                + (f", expires at {lease.expires_at}" if lease.expires_at else "")
            )
            activity.logger.info("Waiting: %s", why)
            self.set_progress(machine_id, f"waiting for the {why}")
            # A lapsing lease is read again as it lapses; a refreshed one at the poll pace.
            until_expiry = (lease.expires_at or 0) - time.time()
            await asyncio.sleep(min(max(until_expiry, poll), _MAX_LEASE_POLL_SECONDS, remaining))

    async def _lease_adopted(self, machine_id: str) -> None:
        """Lease a machine whose create's answer, and with it the nonce of the lease the
        create took, was lost: once that lease lapses (within one ttl), it is ours. The
        other leases are kept meanwhile: no one else waits for a machine just made."""
        wait = max(self.timings.lease_wait_timeout.total_seconds(), self.ttl + 1.0)
        deadline = time.monotonic() + wait
        while machine_id not in self.leases:
            try:
                await self._lease(machine_id)
            except FlyError as exc:
                if not _lease_held(exc):
                    raise self._lease_error(machine_id, exc) from None
                await self._wait_for_lease(machine_id, exc, deadline)

    async def _lease(self, machine_id: str) -> None:
        task = asyncio.ensure_future(self._acquire(machine_id))
        self._acquiring.add(task)
        task.add_done_callback(self._acquiring.discard)
        await asyncio.shield(task)  # cut short, it still records the nonce (see `_stop`)

    async def _acquire(self, machine_id: str) -> None:
        lease = await self.fly.acquire_lease(
            self.app, machine_id, self.ttl, description=LEASE_DESCRIPTION
        )
        self.leases[machine_id] = lease.nonce
        activity.logger.info("Leased machine %s of Fly app %s", machine_id, self.app)

    async def _resume_leases(self) -> None:
        """Refresh, with their nonces, the leases the last attempt's heartbeat names: one
        still held (or lapsed and free) is ours again without a wait; one that someone
        else took since, or whose machine is gone, is left to `lease_all`."""
        carried = _carried_leases(activity.info().heartbeat_details)
        if not carried:
            return
        results = await asyncio.gather(
            *(self._refresh(m, n, resumed=True) for m, n in carried.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if self.leases:
            activity.logger.info(
                "Took over the lease(s) of the previous attempt on machine(s) %s of Fly app %s",
                ", ".join(self.leases),
                self.app,
            )
            self._heartbeat()

    async def _keep_alive_forever(self) -> None:
        """Heartbeat (with the progress and the nonces held) and refresh the leases, each
        at its own pace, from one loop."""
        # Server-side waits last up to a minute; keep the heartbeat alive across them.
        timeout = activity.info().heartbeat_timeout
        interval = timeout.total_seconds() / 3 if timeout else _MAX_HEARTBEAT_SECONDS
        interval = min(max(interval, _MIN_HEARTBEAT_SECONDS), _MAX_HEARTBEAT_SECONDS)
        refresh_every = self.refresh_interval
        tick = min(interval, refresh_every)
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + refresh_every
        while True:
            await asyncio.sleep(tick)
            if loop.time() >= next_refresh:
                next_refresh = loop.time() + refresh_every
                async with self._lease_lock:
                    await asyncio.gather(
                        *(self._refresh(m, n) for m, n in list(self.leases.items()))
                    )
            self._heartbeat()

    async def _refresh(self, machine_id: str, nonce: str, *, resumed: bool = False) -> None:
        try:
            lease = await self.fly.acquire_lease(
                self.app, machine_id, self.ttl, nonce=nonce, description=LEASE_DESCRIPTION
            )
        except FlyError as exc:
            log = activity.logger.info if resumed else activity.logger.warning
            log(
                "Could not %s the lease on machine %s of Fly app %s: %s",
                "take over" if resumed else "refresh",
                machine_id,
                self.app,
                exc,
            )
            return
        # A lease that lapsed meanwhile comes back new, with its own nonce.
        if resumed or machine_id in self.leases:
            self.leases[machine_id] = lease.nonce
        elif lease.nonce != nonce:
            # Released (or destroyed) while this refresh was on its way, which took a new
            # lease: give it back too.
            await self._release(machine_id, lease.nonce)

    async def release_all(self) -> None:
        async with self._lease_lock:
            leases, self.leases = self.leases, {}
            await asyncio.gather(*(self._release(m, n) for m, n in leases.items()))

    async def release(self, machine_id: str) -> None:
        """Hand back one machine the rollout is done with (as flyctl does), so the leases
        still to refresh are only those of machines still being worked on."""

        async def release() -> None:
            async with self._lease_lock:
                nonce = self.leases.pop(machine_id, None)
                if nonce is not None:
                    await self._release(machine_id, nonce)

        await asyncio.shield(release())

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
                    min_secrets_version=self.min_secrets_version,
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
                    await self._lease_adopted(found[0].id)
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
        self,
        machine: Machine,
        config: Mapping[str, Any],
        *,
        skip_launch: bool,
        guarded: bool = False,
    ) -> Machine:
        """Update the machine to `config`. `guarded`: only if it is still at the version
        read (`machine.version`); when it is not, `MachineChanged` carries it as it is."""
        self.set_progress(machine.id, "updating machine")
        action = f"Update machine {machine.id} of Fly app {self.app}"
        current_version = machine.version if guarded else None
        try:
            updated = await self.fly.update_machine(
                self.app,
                machine.id,
                config,
                machine.region,
                nonce=self.leases.get(machine.id),
                skip_launch=skip_launch,
                min_secrets_version=self.min_secrets_version,
                current_version=current_version,
            )
        except FlyAPIError as exc:
            if current_version is None or exc.status_code != 409:
                raise to_application_error(exc, action=action) from None
            # A version mismatch, or a lease conflict: the machine as it is now tells which.
            current = await self._read_machine(machine, f"machine {machine.id} of {self.app}")
            if current.version != current_version and not current.gone:
                raise MachineChanged(current) from None
            raise to_application_error(exc, action=action) from None
        except FlyError as exc:
            raise to_application_error(exc, action=action) from None
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

    async def wait_healthy(
        self, machine: Machine, config: Mapping[str, Any], *, started_earlier: bool = False
    ) -> CheckWindow | None:
        """Wait for this version of the machine to start, then for all its checks to pass.

        Returns when the checks passed after the start (None without checks, or when the
        time is not known). `started_earlier`: the machine was updated by an earlier attempt,
        so its start may lie long before this wait: its checks are read at once.
        """
        timeout = self.timings.machine_wait_timeout
        deadline = time.monotonic() + timeout.total_seconds()
        where = f"machine {machine.id} of Fly app {self.app}"
        self.set_progress(machine.id, "waiting for machine to start")
        while True:
            try:
                reached = await self.fly.wait_machine(
                    self.app,
                    machine.id,
                    ("started", "failed"),
                    version=machine.version,
                    timeout=max(deadline - time.monotonic(), 0),
                )
            except FlyBadRequest as exc:
                # The answer to a machine that failed or a version that was replaced;
                # anything else is the request's fault.
                current = await self._read_machine(machine, where)
                self._fail_if_failed(machine, current, f"{exc.message}")
                raise to_application_error(exc, action=f"Wait for {where} to start") from None
            except FlyError as exc:
                raise to_application_error(exc, action=f"Wait for {where} to start") from None
            if reached == "started":
                break
            current = await self._read_machine(machine, where)
            self._fail_if_failed(machine, current, f"it is {reached or current.state}")
            if current.state == "started" and current.version == machine.version:
                break
            if time.monotonic() >= deadline:
                raise _unhealthy(
                    f"Machine {machine.id} of Fly app {self.app} did not start within "
                    f"{_human(timeout)} (state {current.state})",
                    current,
                )
        if not has_checks(config):
            return None
        self.set_progress(machine.id, "waiting for health checks")
        started = time.monotonic()
        hint = None if started_earlier else self.checks_hint
        pace = CheckPace(
            hint,
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
            # A machine that crashed after its start passes no check any more.
            self._fail_if_failed(machine, current, "it stopped running")
            if current.checks and all(c.passing for c in current.checks):
                window = CheckWindow(failing_until=failing_until, passing_at=pace.observed(sent))
                if started_earlier or (self._borrowed and hint is not None and not failing_until):
                    # Says nothing of this app's boot: a machine started long before, or a
                    # first read at another project's time that passed (the checks may have
                    # passed much sooner). Not kept, so the app's next deploy does not read
                    # this late again and again.
                    activity.logger.info(
                        "Machine %s of Fly app %s passes its %d check(s)",
                        machine.id,
                        self.app,
                        len(current.checks),
                    )
                    return None
                activity.logger.info(
                    "Machine %s of Fly app %s passes its %d check(s), %.1fs after its start",
                    machine.id,
                    self.app,
                    len(current.checks),
                    window.passing_at,
                )
                # From here on the hint is this app's own, no longer borrowed.
                self.checks_hint, self._borrowed = window, False
                RECENT_CHECKS.observe(window)
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

    async def _read_machine(self, machine: Machine, where: str) -> Machine:
        return await self.read(f"Read {where}", lambda: self.fly.get_machine(self.app, machine.id))

    def _fail_if_failed(self, waited: Machine, current: Machine, why: str) -> None:
        """End the wait at once, non-retryably, when the machine cannot come up: it failed
        (to launch, or after a crash), or the version we wait for was replaced."""
        replaced = (
            waited.version is not None
            and current.version is not None
            and current.version != waited.version
        )
        if not (current.failed or replaced):
            return
        state = "replaced" if replaced and not current.failed else current.state
        detail = (
            f"version {waited.version} was replaced by {current.version}"
            if state == "replaced"
            else f"it is {current.state}"
        )
        raise MACHINE_FAILED(
            f"Machine {waited.id} of Fly app {self.app} will not start: {detail} ({why})",
            {"machine_id": waited.id, "state": state, "version": current.version},
        )

    # ---------------------------------------------------------------------------- misc

    def set_progress(self, current: str, step: str) -> None:
        self.progress.current = current
        self.progress.step = step
        self._heartbeat()

    def mark_done(self, machine_id: str) -> None:
        self.progress.done.append(machine_id)
        self.progress.current = None
        self.progress.step = f"{len(self.progress.done)} machine(s) ready"
        self._heartbeat()

    def _details(self, waiting: str | None = None) -> dict[str, Any]:
        self.progress.leases = dict(self.leases)
        details = self.progress.model_dump()
        if waiting:
            details["waiting"] = waiting
        return details

    def _heartbeat(self) -> None:
        activity.heartbeat(self._details())

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


class RecentChecks:
    """When checks passed after a start on the machines this worker saw lately, across
    projects: where a deploy with no history of its own (a first deploy) reads first.

    Only windows that saw the checks fail, then pass, are kept (a first read that passes
    says only "by then", and would keep a late guess alive); each for `keep` seconds.
    """

    def __init__(self, size: int = 20, keep: float = 600.0) -> None:
        self._windows: collections.deque[tuple[float, CheckWindow]] = collections.deque(maxlen=size)
        self._keep = keep

    def observe(self, window: CheckWindow) -> None:
        if window.failing_until > 0:
            self._windows.append((time.monotonic(), window))

    def typical(self) -> CheckWindow | None:
        since = time.monotonic() - self._keep
        windows = sorted((w for at, w in self._windows if at >= since), key=lambda w: w.passing_at)
        return windows[(len(windows) - 1) // 2] if windows else None

    def clear(self) -> None:
        self._windows.clear()


RECENT_CHECKS = RecentChecks()


def _lease_held(result: object) -> bool:
    return isinstance(result, FlyAPIError) and result.status_code == 409


def _carried_leases(details: Sequence[Any]) -> dict[str, str]:
    """The leases (machine id -> nonce) in an earlier attempt's last heartbeat."""
    if not details or not isinstance(details[0], dict):
        return {}
    try:
        return RolloutProgress.model_validate(details[0]).leases
    except ValidationError:
        return {}


@functools.cache  # the installed version: read once, not for every machine's config
def deployer_version() -> str:
    """What goes in `fly_flyctl_version`: a semantic version, as flyctl writes its own,
    marked as ours."""
    try:
        return f"{importlib.metadata.version('turbodeploy')}+turbodeploy"
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+turbodeploy"


def release_version(machines: Iterable[Machine], deployment_id: str) -> int:
    """The release number of `deployment_id`: the one its machines already carry (a retry
    keeps it), else one more than the highest among the group's machines."""
    numbers: list[int] = []
    for m in machines:
        value = m.metadata.get(RELEASE_VERSION_KEY, "")
        if not value.isdigit():
            continue
        if m.metadata.get(DEPLOYMENT_KEY) == deployment_id:
            return int(value)
        numbers.append(int(value))
    return max(numbers, default=0) + 1


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
