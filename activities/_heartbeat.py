"""Heartbeats from code shared by activities and other callers."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, Final, Self

from temporalio import activity

_DEFAULT_EVERY: Final = timedelta(seconds=5)  # when the activity has no heartbeat timeout

# What the running activity heartbeats, given the reason of a wait: set by an activity
# whose heartbeat details carry state a retry needs (the rollout's lease nonces), so a
# wait inside the Fly client does not replace them with its reason alone.
_DETAILS: contextvars.ContextVar[Callable[[str], Any] | None] = contextvars.ContextVar(
    "heartbeat_details", default=None
)


def heartbeat_if_in_activity(why: str) -> None:
    """Heartbeat the running activity with `why`; outside an activity, do nothing.

    Given to the Fly client as its `on_wait` hook: a request waiting out a Retry-After keeps
    its activity alive, and the wait's reason is what the server shows as the activity's
    last heartbeat (inside `heartbeat_details_from`, beside the activity's own details).
    """
    if activity.in_activity():
        details = _DETAILS.get()
        activity.heartbeat(why if details is None else details(why))


@contextlib.contextmanager
def heartbeat_details_from(details: Callable[[str], Any]) -> Iterator[None]:
    """Inside, a wait's heartbeat is `details(why)` instead of `why` (in this task and
    the tasks it starts)."""
    token = _DETAILS.set(details)
    try:
        yield
    finally:
        _DETAILS.reset(token)


class PeriodicHeartbeat:
    """Heartbeats `details()` every third of the activity's heartbeat timeout while the
    block runs, and at once on `beat()`.

    For an activity whose single waits (a clone, a health request that the Fly proxy holds
    while it wakes a machine) may last longer than its heartbeat timeout: the worker is
    alive, so the server must not time the attempt out because one call is slow.
    """

    def __init__(self, details: Callable[[], Any]) -> None:
        self._details = details
        self._task: asyncio.Task[None] | None = None
        timeout = activity.info().heartbeat_timeout
        every = timeout / 3 if timeout else _DEFAULT_EVERY
        self._every = max(every.total_seconds(), 0.05)

    def beat(self) -> None:
        activity.heartbeat(self._details())

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            self.beat()
