"""A token bucket shared by every client of one worker, so concurrent deploys stay within
one API budget instead of each assuming it has the whole of it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class RateLimiter:
    """At most `burst` requests at once, refilled at `rate` requests per second.

    Over any window of `t` seconds at most `burst + rate * t` requests pass. Waiters are
    served first come, first served. Bound to the event loop that first uses it.
    """

    def __init__(
        self, rate: float, burst: int = 1, *, clock: Callable[[], float] = time.monotonic
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
        self._lock = asyncio.Lock()

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self._rate:g}, burst={self._burst})"

    async def acquire(self) -> None:
        """Wait until a request may be sent, and take its token."""
        # The lock makes waiters queue in order instead of all waking on the same refill.
        async with self._lock:
            while True:
                self._refill()
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self._rate)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(now - self._updated, 0.0)
        self._updated = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
