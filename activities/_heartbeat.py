"""Heartbeats from code shared by activities and other callers."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

from temporalio import activity

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
