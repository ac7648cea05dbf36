"""The production lease timings against flyctl's, and the heartbeat chosen with them."""

from __future__ import annotations

import re
from datetime import timedelta

from conftest import reference_file

from activities._machines import MachineSession
from core.models import DeployTimings
from flyapi import FlyClient
from workflows import policies


def _session(timings: DeployTimings) -> MachineSession:
    return MachineSession(FlyClient("http://127.0.0.1:9/v1", "unused"), "app", timings)


def test_leases_are_held_as_flyctl_holds_them() -> None:
    """FLY-DEPLOY-NOTES.md, from flyctl's `internal/command/deploy`: a 13 s lease, refreshed
    every (ttl - 1 s) / 3 = 4 s."""
    notes = reference_file("FLY-DEPLOY-NOTES.md").read_text()
    found = re.search(r"flyctl asks for (\d+) s and refreshes every (\d+) s", notes)
    assert found, "the notes no longer say how flyctl holds its leases"
    ttl, every = (float(g) for g in found.groups())
    session = _session(DeployTimings())
    assert session.ttl == ttl
    assert session.refresh_interval == every


def test_a_dead_worker_is_noticed_before_its_leases_lapse() -> None:
    defaults = DeployTimings()
    for timings in (
        defaults,
        DeployTimings(lease_ttl=timedelta(seconds=5)),  # shorter than the heartbeat timeout
    ):
        for policy in (policies.rollout(timings, 3), policies.restore(timings, 3)):
            assert policy.heartbeat is not None
            assert policy.heartbeat <= timings.lease_ttl
            # Waiting for a lease held elsewhere fits in one attempt.
            assert policy.start_to_close > timings.lease_wait_timeout
    assert policies.machines_heartbeat(defaults) == defaults.heartbeat_timeout


def test_refreshes_leave_room_for_a_failed_one() -> None:
    """Two refreshes in a row may fail before a lease lapses under a live rollout, at any
    ttl (tests run with ttls of a second or three)."""
    for seconds in (1, 2, 3, 8, 13, 60):
        session = _session(DeployTimings(lease_ttl=timedelta(seconds=seconds)))
        assert 0 < 2 * session.refresh_interval < session.ttl
