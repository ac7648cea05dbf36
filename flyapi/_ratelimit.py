"""A token bucket shared by every client of one worker, so concurrent deploys stay within
one API budget instead of each assuming it has the whole of it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable


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
    """

    def __init__(
        self,
        rate: float,
        burst: int = 1,
        *,
        clock: Callable[[], float] = time.monotonic,
        key: Callable[[], str | None] | None = None,
        forget_after: float = 30.0,
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
        """Wait until a request may be sent, and take its token. `on_wait` is called every
        `tick` seconds of the wait: under a saturated budget a request may wait minutes
        for its turn, and its activity must go on heartbeating meanwhile."""
        rank = (0 if urgent else 1, self._age(), next(self._seq))
        self._refill()
        if not self._waiters and self._tokens >= 1:
            self._tokens -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, future))
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        try:
            if on_wait is None:
                await future
            else:
                while not (await asyncio.wait((future,), timeout=tick))[0]:
                    on_wait()
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._tokens += 1  # granted as it was cancelled: give the token back
            future.cancel()
            raise

    def _age(self) -> float:
        """When the work of the calling request began (now, for work without a key)."""
        now = self._clock()
        key = self._key() if self._key is not None else None
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

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(now - self._updated, 0.0)
        self._updated = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
