"""Heartbeats from code shared by activities and other callers."""

from __future__ import annotations

from temporalio import activity


def heartbeat_if_in_activity(why: str) -> None:
    """Heartbeat the running activity with `why`; outside an activity, do nothing.

    Given to the Fly client as its `on_wait` hook: a request waiting out a Retry-After keeps
    its activity alive, and the wait's reason is what the server shows as the activity's
    last heartbeat.
    """
    if activity.in_activity():
        activity.heartbeat(why)
