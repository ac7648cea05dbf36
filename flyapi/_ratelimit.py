"""A token bucket shared by every client of one worker, so concurrent deploys stay within
one API budget instead of each assuming it has the whole of it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable

_LeaseWaiter = tuple[tuple[float, int], str | None, tuple[str, str], float, "asyncio.Future[None]"]


class RateLimiter:
    """At most `burst` requests at once, refilled at `rate` requests per second.

    Over any window of `t` seconds at most `burst + rate * t` requests pass.

    Who waits goes in this order (the fairness rule): first the urgent requests (lease
    refreshes and releases: a lease must not lapse because the budget is busy), then by
    the age of the work each request belongs to, oldest first (`key`: a deploy's id; work
    idle for `forget_after` seconds counts as new again), first come, first served among
    equals. So under a saturated budget a deploy is never overtaken by one that began after
    it: it finishes as soon as the budget spent on the deploys before it allows, and it
    holds its leases for as short a time as possible. Without `key`, first come, first
    served. Bound to the event loop that first uses it.

    Leases (`max_leases`): each machine leased costs a refresh every few seconds, and
    refreshes go first. Were every waiting deploy let take its leases, their refreshes
    alone would spend the budget and no deploy would go on (500 redeploys at 10 requests/s
    did just that). So at most `max_leases` machines are leased at once through this
    limiter: a new lease of work that holds none waits until fewer are (`lease`), oldest
    work first; work that already holds one takes the rest of its machines at once, so no
    two deploys can each hold part of what they need and wait for the other.
    """

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        key: Callable[[], str | None] | None = None,
        forget_after: float = 30.0,
        max_leases: int | None = None,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self._rate = float(rate)
        self._burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._key = key
        self._forget_after = forget_after
        # key -> (when its work began, when it last asked)
        self._work: dict[str, tuple[float, float]] = {}
        self._seq = itertools.count()
        self._waiters: list[tuple[tuple[int, float, int], asyncio.Future[None]]] = []
        self._dispatcher: asyncio.Task[None] | None = None
        if max_leases is not None and max_leases < 1:
            raise ValueError("max_leases must be at least 1")
        self._max_leases = max_leases
        # (app, machine) -> (the work holding it, when its lease lapses unless refreshed)
        self._leases: dict[tuple[str, str], tuple[str | None, float]] = {}
        self._lease_waiters: list[_LeaseWaiter] = []
        self._lease_timer: asyncio.TimerHandle | None = None

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self._rate:g}, burst={self._burst})"

    async def acquire(
        self,
        *,
        urgent: bool = False,
        on_wait: Callable[[], None] | None = None,
        tick: float = 1.0,
    ) -> None:
        """Wait until a request may be sent, and take its token. `on_wait` is called as a
        wait begins and every `tick` seconds of it: under a saturated budget a request may
        wait minutes for its turn, and its activity must go on heartbeating meanwhile."""
        key = self._key() if self._key is not None else None
        rank = (0 if urgent else 1, self._age(key), next(self._seq))
        self._refill()
        if not self._waiters and self._tokens >= 1:
            self._tokens -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, future))
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        try:
            await _wait_turn(future, on_wait, tick)
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._tokens += 1  # granted as it was cancelled: give the token back
            future.cancel()
            raise
        self._seen(key)

    def _seen(self, key: str | None) -> None:
        """The work was waiting, not idle: a wait longer than `forget_after` must not make
        it new again (and send it to the back of the queue it has just left)."""
        if key is not None and key in self._work:
            self._work[key] = (self._work[key][0], self._clock())

    def _age(self, key: str | None) -> float:
        """When the work of the calling request began (now, for work without a key)."""
        now = self._clock()
        if key is None:
            return now
        began, last = self._work.get(key, (now, now))
        if now - last > self._forget_after:
            began = now
        self._work[key] = (began, now)
        if len(self._work) > 4096:
            stale = [k for k, (_, seen) in self._work.items() if now - seen > self._forget_after]
            for k in stale:
                del self._work[k]
        return began

    async def _dispatch(self) -> None:
        while self._waiters:
            self._refill()
            if self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self._rate)
                continue
            _, future = heapq.heappop(self._waiters)
            if future.done():  # its caller gave up
                continue
            self._tokens -= 1
            future.set_result(None)

    # --------------------------------------------------------------------------- leases

    @property
    def max_leases(self) -> int | None:
        return self._max_leases

    def leased(self) -> int:
        """Machines leased through this limiter now (lapsed leases not counted)."""
        self._expire()
        return len(self._leases)

    async def lease(
        self,
        machine: tuple[str, str],
        ttl: float,
        *,
        on_wait: Callable[[], None] | None = None,
        tick: float = 1.0,
    ) -> None:
        """Wait until `machine` (app, machine id) may be leased for `ttl` seconds, and count
        it as leased until `renewed` stops or it is `released`."""
        if self._max_leases is None:
            return
        key = self._key() if self._key is not None else None
        if self._admitted(key, machine):
            self._leases[machine] = (key, self._clock() + ttl)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rank = (self._age(key), next(self._seq))
        heapq.heappush(self._lease_waiters, (rank, key, machine, ttl, future))
        self._arm_lease_timer()
        try:
            await _wait_turn(future, on_wait, tick)
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.released(machine)  # admitted as it was cancelled: give the room back
            future.cancel()
            raise
        self._seen(key)

    def renewed(self, machine: tuple[str, str], ttl: float) -> None:
        """The lease of `machine` was refreshed (or taken over) for `ttl` seconds."""
        if self._max_leases is None:
            return
        key = self._key() if self._key is not None else None
        self._leases[machine] = (key, self._clock() + ttl)

    def released(self, machine: tuple[str, str]) -> None:
        """The lease of `machine` is gone (released, or never taken)."""
        if self._leases.pop(machine, None) is not None:
            self._admit()

    def _holds(self, key: str | None) -> bool:
        return key is not None and any(holder == key for holder, _ in self._leases.values())

    def _admitted(self, key: str | None, machine: tuple[str, str]) -> bool:
        if machine in self._leases:
            return True
        self._expire()
        if self._holds(key):
            return True
        return not self._lease_waiters and len(self._leases) < (self._max_leases or 0)

    def _expire(self) -> None:
        now = self._clock()
        for machine in [m for m, (_, until) in self._leases.items() if until <= now]:
            del self._leases[machine]

    def _admit(self) -> None:
        """Let waiting work in, oldest first, while there is room."""
        self._expire()
        while self._lease_waiters:
            _, key, machine, ttl, future = self._lease_waiters[0]
            if future.done():  # its caller gave up
                heapq.heappop(self._lease_waiters)
                continue
            if not self._holds(key) and len(self._leases) >= (self._max_leases or 0):
                break
            heapq.heappop(self._lease_waiters)
            # Counted at once, so that the next waiter sees the room this one took.
            self._leases[machine] = (key, self._clock() + ttl)
            future.set_result(None)
        self._arm_lease_timer()

    def _arm_lease_timer(self) -> None:
        """Wake the waiters when the first lease would lapse (its holder may have died)."""
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        if self._lease_waiters and self._leases:
            first = min(until for _, until in self._leases.values())
            delay = max(first - self._clock(), 0.0) + 0.01
            self._lease_timer = asyncio.get_running_loop().call_later(delay, self._admit)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(now - self._updated, 0.0)
        self._updated = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)


async def _wait_turn(
    future: asyncio.Future[None], on_wait: Callable[[], None] | None, tick: float
) -> None:
    """Wait for `future`, calling `on_wait` as the wait begins and every `tick` seconds
    meanwhile. At the beginning too: a run of waits each shorter than a tick (a deploy's
    requests behind older work's) would otherwise add up to a long silence, longer than
    the activity's heartbeat timeout, without one call."""
    if on_wait is None:
        await future
        return
    if not future.done():
        on_wait()
    while not (await asyncio.wait((future,), timeout=tick))[0]:
        on_wait()
