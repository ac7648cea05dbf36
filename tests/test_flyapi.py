"""The Fly Machines API client against the emulator, with every request it sends checked
against the published OpenAPI spec."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import MACHINES_SPEC

from flyapi import (
    FlyAPIError,
    FlyBadRequest,
    FlyClient,
    FlyClientError,
    FlyError,
    FlyForbidden,
    FlyNotFound,
    FlyRetryableError,
    FlyTransportError,
    FlyUnauthorized,
    FlyUnprocessable,
    RateLimiter,
    RequestRetry,
)
from flyapi._errors import parse_retry_after
from flyapi._models import Machine
from flysim.spec import SpecViolation, validate_exchange

CONFIG: dict[str, Any] = {
    "image": "registry.fly.io/hello:v1",
    "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
    "services": [
        {
            "protocol": "tcp",
            "internal_port": 3000,
            "ports": [{"port": 443, "handlers": ["tls", "http"]}],
            "autostop": True,
            "autostart": True,
            "checks": [{"type": "http", "method": "GET", "path": "/api/health",
                        "interval": "15s", "timeout": "5s", "grace_period": "1s"}],
        }
    ],
    "metadata": {"fly_platform_version": "v2", "fly_process_group": "app"},
}  # fmt: skip


# ------------------------------------------------------------------------ spec validation


class RecordingTransport(httpx.AsyncBaseTransport):
    """A real HTTP transport that keeps a copy of every request sent through it."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.fixture(scope="module")
def spec_path() -> Path:
    return MACHINES_SPEC


def assert_match_spec(spec_path: Path, requests: list[httpx.Request]) -> int:
    """Every request the spec describes conforms to it; returns how many were checked.

    Paths newer than the spec (IP assignments) are not described and not counted.
    """
    checked = 0
    for request in requests:
        if validate_exchange(spec_path, request) is not None:
            checked += 1
    return checked


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def recorder() -> RecordingTransport:
    return RecordingTransport()


@pytest.fixture
async def fly(
    flysim: Any, fly_token: str, recorder: RecordingTransport, spec_path: Path
) -> AsyncIterator[FlyClient]:
    async with FlyClient(flysim.base_url, fly_token, transport=recorder) as client:
        yield client
    assert_match_spec(spec_path, recorder.requests)


# ------------------------------------------------------------------------------- apps


async def test_get_app_is_none_when_missing(fly: FlyClient, app_name: str) -> None:
    assert await fly.get_app(app_name) is None


async def test_create_then_get_app(
    fly: FlyClient, app_name: str, recorder: RecordingTransport
) -> None:
    created = await fly.create_app(app_name, "personal")
    assert created.name == app_name

    app = await fly.get_app(app_name)
    assert app is not None
    assert (app.name, app.org_slug) == (app_name, "personal")
    create = next(r for r in recorder.requests if r.method == "POST")
    # The documented field, not fly-go's `name`.
    body = json.loads(create.content)
    assert body["name"] == app_name and body["org_slug"] == "personal" and "app_name" not in body


async def test_delete_app(fly: FlyClient, app: str) -> None:
    await fly.delete_app(app)
    assert await fly.get_app(app) is None
    with pytest.raises(FlyNotFound):
        await fly.delete_app(app)


async def test_taken_name_is_unprocessable_and_final(fly: FlyClient, app: str) -> None:
    with pytest.raises(FlyUnprocessable) as caught:
        await fly.create_app(app, "personal")
    exc = caught.value
    assert exc.status_code == 422
    assert not exc.retryable
    assert isinstance(exc, FlyClientError)
    assert "already been taken" in str(exc)
    assert exc.request_id and exc.request_id in str(exc)


async def test_app_of_another_org_is_forbidden(flysim: Any, fly: FlyClient, app_name: str) -> None:
    other_token = f"FlyV1 fm2_other{uuid.uuid4().hex}"
    flysim.config.tokens[other_token] = "other-org"
    async with FlyClient(flysim.base_url, other_token) as other:
        await other.create_app(app_name, "other-org")
    with pytest.raises(FlyForbidden) as caught:
        await fly.get_app(app_name)  # never "does not exist"
    assert not caught.value.retryable


async def test_wrong_token_is_unauthorized_and_never_shown(flysim: Any, app_name: str) -> None:
    secret = f"FlyV1 fm2_wrong{uuid.uuid4().hex}"

    async def token() -> str:
        return secret

    for source in (secret, token):
        async with FlyClient(flysim.base_url, source) as client:
            with pytest.raises(FlyUnauthorized) as caught:
                await client.get_app(app_name)
            exc = caught.value
            assert exc.status_code == 401 and not exc.retryable
            for text in (str(exc), repr(exc), repr(client), str(exc.args)):
                assert secret not in text
                assert "wrong" not in text


async def test_ip_assignments(fly: FlyClient, app: str) -> None:
    assert await fly.list_ip_assignments(app) == []
    v6 = await fly.assign_ip(app, "v6")
    v4 = await fly.assign_ip(app, "shared_v4")
    assert ":" in v6.ip and v4.shared
    listed = {ip.ip for ip in await fly.list_ip_assignments(app)}
    assert listed == {v6.ip, v4.ip}


# ----------------------------------------------------------------------------- faults


async def test_server_errors_are_retryable(fly: FlyClient, faults: Any, app_name: str) -> None:
    faults.error_rate = 1.0
    with pytest.raises(FlyRetryableError) as caught:
        await fly.get_app(app_name)
    exc = caught.value
    assert exc.status_code >= 500 and exc.retryable
    assert "injected server error" in exc.message


async def test_rate_limit_carries_retry_after(fly: FlyClient, faults: Any, app_name: str) -> None:
    faults.rate_limit_rate = 1.0
    faults.retry_after = 7
    with pytest.raises(FlyRetryableError) as caught:
        await fly.create_app(app_name, "personal")
    assert caught.value.status_code == 429
    assert caught.value.retry_after == 7.0


async def test_a_long_retry_wait_reports_itself_every_tick(
    flysim: Any, fly_token: str, faults: Any, app_name: str
) -> None:
    faults.rate_limit_rate, faults.retry_after = 1.0, 2
    told: list[str] = []
    async with FlyClient(
        flysim.base_url,
        fly_token,
        retry=RequestRetry(attempts=2),
        on_wait=told.append,
    ) as client:
        with pytest.raises(FlyRetryableError) as caught:
            await client.get_app(app_name)
    assert caught.value.status_code == 429
    # A 2 s Retry-After, longer than a tick, is told at its start and again during it.
    assert len(told) >= 2
    assert all(f"GET /apps/{app_name}: " in why and "retrying in 2.0s" in why for why in told)


def test_retry_after_accepts_seconds_and_dates() -> None:
    now = time.time()
    later = datetime.fromtimestamp(now, UTC) + timedelta(seconds=30)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(format_datetime(later, usegmt=True), now=now) == pytest.approx(
        30, abs=1
    )
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


async def test_dropped_connection_is_a_transport_error(
    flysim: Any, fly: FlyClient, faults: Any, app_name: str
) -> None:
    faults.drop_rate = 1.0
    before = flysim.stats.faults_injected["drop"]
    with pytest.raises(FlyTransportError) as caught:
        await fly.get_app(app_name)
    assert caught.value.retryable
    # A GET is sent once more after a drop, and no more than that.
    assert flysim.stats.faults_injected["drop"] - before == 2

    before = flysim.stats.faults_injected["drop"]
    with pytest.raises(FlyTransportError):
        await fly.create_app(app_name, "personal")
    # Never for a POST: it may have had its effect.
    assert flysim.stats.faults_injected["drop"] - before == 1


async def test_connection_refused_is_a_transport_error(fly_token: str) -> None:
    async with FlyClient("http://127.0.0.1:9/v1", fly_token, timeout=2) as client:
        with pytest.raises(FlyTransportError) as caught:
            await client.get_app("turbobackend-x")
    assert isinstance(caught.value, FlyError) and caught.value.retryable
    assert fly_token not in str(caught.value)
    assert caught.value.__cause__ is None  # the httpx error holds the request headers


# --------------------------------------------------------------------- machines, leases


async def test_machine_update_needs_the_lease_nonce(fly: FlyClient, app: str) -> None:
    created = await fly.create_machine(app, CONFIG, "iad", lease_ttl=30)
    assert created.nonce, "a create with lease_ttl returns the lease nonce"
    assert created.metadata["fly_platform_version"] == "v2"
    assert await fly.wait_machine(
        app, created.id, "started", instance_id=created.instance_id, timeout=5
    )

    new_config = {**CONFIG, "image": "registry.fly.io/hello:v2"}
    with pytest.raises(FlyRetryableError) as caught:
        await fly.update_machine(app, created.id, new_config, "iad", nonce=None)
    assert caught.value.status_code == 409  # held by the create's lease

    refreshed = await fly.acquire_lease(app, created.id, 30, nonce=created.nonce)
    assert refreshed.nonce == created.nonce
    updated = await fly.update_machine(app, created.id, new_config, "iad", nonce=created.nonce)
    assert updated.instance_id != created.instance_id
    assert updated.image == "registry.fly.io/hello:v2"
    assert await fly.wait_machine(
        app, created.id, "started", instance_id=updated.instance_id, timeout=5
    )
    machine = await fly.get_machine(app, created.id)
    assert machine.state == "started"
    assert machine.checks and all(c.passing for c in machine.checks)

    await fly.release_lease(app, created.id, created.nonce)
    await fly.release_lease(app, created.id, created.nonce)  # already gone: not an error
    lease = await fly.acquire_lease(app, created.id, 5)  # free again
    assert lease.nonce and lease.nonce != created.nonce
    await fly.release_lease(app, created.id, lease.nonce)


async def test_lease_held_by_another_is_retryable(fly: FlyClient, app: str) -> None:
    machine = await fly.create_machine(app, CONFIG, "iad")
    lease = await fly.acquire_lease(app, machine.id, 30)
    with pytest.raises(FlyRetryableError) as caught:
        await fly.acquire_lease(app, machine.id, 30)
    assert caught.value.status_code == 409
    assert "lease currently held" in caught.value.message  # read from `message`
    seen = await fly.get_lease(app, machine.id)  # what a waiter reads: who, until when
    assert seen is not None and seen.owner and seen.expires_at == lease.expires_at
    refreshed = await fly.acquire_lease(app, machine.id, 30, nonce=lease.nonce)
    assert refreshed.nonce == lease.nonce
    await fly.release_lease(app, machine.id, lease.nonce)
    assert await fly.get_lease(app, machine.id) is None


async def test_wait_returns_false_on_timeout(fly: FlyClient, app: str) -> None:
    machine = await fly.create_machine(app, CONFIG, "iad", skip_launch=True)
    assert not await fly.wait_machine(app, machine.id, "started", timeout=0.2)  # clamped to 1 s
    await fly.start_machine(app, machine.id)
    assert await fly.wait_machine(app, machine.id, "started", timeout=5)


async def test_machine_lifecycle(fly: FlyClient, app: str) -> None:
    machine = await fly.create_machine(app, CONFIG, "iad", name="web-1")
    assert machine.name == "web-1" and machine.region == "iad"
    await fly.wait_machine(app, machine.id, "started", timeout=5)
    await fly.set_metadata(app, machine.id, "owner", "tests")
    await fly.cordon_machine(app, machine.id)
    await fly.uncordon_machine(app, machine.id)
    await fly.stop_machine(app, machine.id)
    assert await fly.wait_machine(app, machine.id, "stopped", timeout=5)
    assert (await fly.get_machine(app, machine.id)).metadata["owner"] == "tests"
    assert [m.id for m in await fly.list_machines(app)] == [machine.id]

    await fly.delete_machine(app, machine.id, force=True)
    await fly.wait_machine(app, machine.id, "destroyed", timeout=5)
    assert await fly.list_machines(app) == []
    assert [m.id for m in await fly.list_machines(app, include_deleted=True)] == [machine.id]
    with pytest.raises(FlyNotFound):
        await fly.get_machine(app, "no-such-machine")


async def test_invalid_config_is_unprocessable(fly: FlyClient, app: str) -> None:
    bad = {**CONFIG, "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 300}}
    with pytest.raises(FlyUnprocessable) as caught:
        await fly.create_machine(app, bad, "iad")
    assert "memory" in caught.value.message and not caught.value.retryable


# -------------------------------------------------------------- transport, rate limit


async def test_injectable_transport_reaches_an_in_process_server(
    flysim: Any, fly_token: str, app_name: str
) -> None:
    transport = httpx.ASGITransport(app=flysim.app)
    async with FlyClient("http://flysim.internal/v1", fly_token, transport=transport) as client:
        await client.create_app(app_name, "personal")
        app = await client.get_app(app_name)
    assert app is not None and app.org_slug == "personal"


async def test_rate_limiter_never_exceeds_its_rate() -> None:
    rate, burst = 40.0, 4
    limiter = RateLimiter(rate, burst)
    stamps: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        stamps.append(time.monotonic())

    await asyncio.gather(*(one() for _ in range(60)))
    stamps.sort()
    assert len(stamps) == 60
    # Any window of w seconds holds at most burst + rate * w acquisitions.
    for window in (0.05, 0.1, 0.25, 0.5):
        allowed = burst + rate * window
        for i, start in enumerate(stamps):
            inside = sum(1 for t in stamps[i:] if t - start < window)
            assert inside <= allowed, f"{inside} acquisitions within {window}s > {allowed}"
    # The burst is usable at once: the limiter is not merely slow.
    assert sum(1 for t in stamps if t - stamps[0] < 0.5 / rate) >= burst


async def test_rate_limiter_serves_the_oldest_work_first_and_lease_refreshes_before_all() -> None:
    """Under a saturated budget the requests of the work that began first go first (a deploy
    is never overtaken by a later one), urgent ones (lease refreshes) before everything."""
    current: dict[str, str | None] = {"key": None}
    limiter = RateLimiter(rate=50, burst=1, key=lambda: current["key"])
    served: list[str] = []

    async def one(name: str, key: str, *, urgent: bool = False) -> None:
        current["key"] = key
        await limiter.acquire(urgent=urgent)
        served.append(name)

    await limiter.acquire()  # the burst is spent: everyone below waits
    tasks = []
    # Deploy "a" asks first, then "b"; later "b" and "a" ask again, and a refresh arrives.
    for name, key, urgent in [
        ("a1", "a", False), ("b1", "b", False), ("b2", "b", False), ("a2", "a", False),
        ("refresh", "b", True),
    ]:  # fmt: skip
        tasks.append(asyncio.ensure_future(one(name, key, urgent=urgent)))
        await asyncio.sleep(0)  # in this order
    await asyncio.gather(*tasks)
    assert served == ["refresh", "a1", "a2", "b1", "b2"]


async def test_a_request_waiting_for_the_budget_says_so_as_it_waits() -> None:
    """A turn that comes late calls `on_wait` every tick until it comes (the worker's hook
    heartbeats the activity), and a wait cancelled midway leaves the budget as it was."""
    limiter = RateLimiter(rate=4, burst=1)
    await limiter.acquire()  # the burst is spent: the next turn is 0.25 s away
    ticks: list[float] = []
    started = time.monotonic()
    await limiter.acquire(on_wait=lambda: ticks.append(time.monotonic() - started), tick=0.05)
    waited = time.monotonic() - started
    assert waited >= 0.2
    assert len(ticks) >= 3 and all(t < waited for t in ticks), ticks

    cancelled = asyncio.ensure_future(limiter.acquire(on_wait=lambda: None, tick=0.05))
    await asyncio.sleep(0.06)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    # The cancelled wait took no turn: the next one is served on time, not a turn later.
    started = time.monotonic()
    await asyncio.wait_for(limiter.acquire(), 1.0)
    assert time.monotonic() - started < 0.25


async def test_a_run_of_waits_each_shorter_than_a_tick_is_never_silent() -> None:
    """Work behind older work waits a little for each request, less than a tick each time.
    The hook is told as each wait begins, so the activity's heartbeats never stop for
    longer than one tick, however many such waits follow one another."""
    limiter = RateLimiter(rate=20, burst=1)
    await limiter.acquire()
    calls: list[float] = []
    started = time.monotonic()
    for _ in range(10):  # each turn 0.05 s away, a twentieth of the tick
        await limiter.acquire(on_wait=lambda: calls.append(time.monotonic()), tick=1.0)
    assert time.monotonic() - started >= 0.4
    assert len(calls) == 10, calls
    # A turn free at once is no wait: nothing to tell.
    idle = RateLimiter(rate=20, burst=5)
    told: list[None] = []
    await idle.acquire(on_wait=lambda: told.append(None))
    assert told == []


async def test_fly_requests_waiting_for_the_budget_call_the_wait_hook(
    flysim: Any, fly_token: str, app_name: str
) -> None:
    limiter = RateLimiter(rate=5, burst=1)
    reasons: list[str] = []
    async with FlyClient(
        flysim.base_url, fly_token, rate_limiter=limiter, on_wait=reasons.append
    ) as client:
        await asyncio.gather(*(client.get_app(app_name) for _ in range(8)))
    # 8 requests at 5 per second: the last waits about 1.4 s, so at least one tick.
    assert "waiting for the Fly API request budget" in reasons, reasons


async def test_work_that_waited_long_for_its_turn_is_still_old() -> None:
    """A wait longer than `forget_after` is not idleness: the work's next request keeps its
    age instead of going to the back of the queue it has just left."""
    current: dict[str, str | None] = {"key": None}
    limiter = RateLimiter(rate=10, burst=1, key=lambda: current["key"], forget_after=0.15)
    served: list[str] = []

    async def one(name: str, key: str, *, urgent: bool = False, then: str | None = None) -> None:
        current["key"] = key
        await limiter.acquire(urgent=urgent)
        served.append(name)
        if then is not None:
            current["key"] = key
            await limiter.acquire()
            served.append(then)

    await limiter.acquire()  # the burst is spent
    tasks = [asyncio.ensure_future(one("a1", "a", then="a2"))]
    await asyncio.sleep(0)
    tasks += [asyncio.ensure_future(one(f"u{i}", "u", urgent=True)) for i in range(3)]
    await asyncio.sleep(0.05)
    tasks.append(asyncio.ensure_future(one("b1", "b")))
    await asyncio.gather(*tasks)
    # "a" waited about 0.4 s for a1, more than forget_after; a2 still goes before b1.
    assert served == ["u0", "u1", "u2", "a1", "a2", "b1"]


async def test_leases_wait_for_room_in_the_budget_oldest_work_first() -> None:
    """At most `max_leases` machines are leased at once; work that holds one takes the rest
    of its machines at once (no two deploys each hold part of what they need); room is
    given back by a release, or when a lease lapses unrefreshed (its holder died)."""
    current: dict[str, str | None] = {"key": None}
    limiter = RateLimiter(rate=100, burst=10, key=lambda: current["key"], max_leases=2)

    def as_work(key: str, machine: str, ttl: float = 30.0) -> asyncio.Future[None]:
        current["key"] = key
        return asyncio.ensure_future(limiter.lease(("app-" + key, machine), ttl, tick=0.02))

    await as_work("a", "a1")
    await as_work("a", "a2")
    await as_work("a", "a3")  # "a" holds leases: the rest of its machines at once
    assert limiter.leased() == 3
    b = as_work("b", "b1")
    await asyncio.sleep(0)
    c = as_work("c", "c1")
    await asyncio.sleep(0.1)
    assert not b.done() and not c.done(), "no room: both wait"

    limiter.released(("app-a", "a1"))
    await asyncio.sleep(0.05)
    assert not b.done(), "2 are leased: still no room"
    limiter.released(("app-a", "a2"))
    await asyncio.wait_for(b, 1)
    await asyncio.sleep(0.05)
    assert not c.done(), "room for one: the oldest work's"
    limiter.released(("app-a", "a3"))
    await asyncio.wait_for(c, 1)
    assert limiter.leased() == 2

    # A lease that lapses unrefreshed gives its room back; a refreshed one keeps it.
    limiter.released(("app-b", "b1"))
    limiter.released(("app-c", "c1"))
    await as_work("d", "d1", ttl=0.3)
    await as_work("e", "e1", ttl=0.3)
    f = as_work("f", "f1")
    current["key"] = "e"
    for _ in range(4):
        await asyncio.sleep(0.1)
        limiter.renewed(("app-e", "e1"), 0.3)
    await asyncio.wait_for(f, 1)
    assert limiter.leased() == 2, "d1 lapsed, e1 refreshed, f1 leased"

    # A wait given up takes no room.
    g = as_work("g", "g1")
    await asyncio.sleep(0.05)
    g.cancel()
    with pytest.raises(asyncio.CancelledError):
        await g
    limiter.released(("app-f", "f1"))
    await asyncio.sleep(0.05)
    assert limiter.leased() == 1


async def test_clients_sharing_a_limiter_stay_within_budget(
    flysim: Any, fly_token: str, app_name: str
) -> None:
    limiter = RateLimiter(rate=10, burst=2)
    clients = [FlyClient(flysim.base_url, fly_token, rate_limiter=limiter) for _ in range(3)]
    start = time.time()
    try:
        await asyncio.gather(*(c.get_app(app_name) for c in clients for _ in range(6)))
    finally:
        for c in clients:
            await c.aclose()
    arrivals = sorted(
        t for t, _, path, _ in list(flysim.request_log) if t >= start and app_name in path
    )
    assert len(arrivals) == 18
    # The budget allows burst + rate * w sends in any w seconds. Arrivals are sends plus a
    # transit time that varies (a new connection's first request arrives later), so they
    # are counted in windows shortened by the 50 ms of jitter they may have had.
    jitter = 0.05
    for i, first in enumerate(arrivals):
        in_window = sum(1 for t in arrivals[i:] if t - first < 1.0 - jitter)
        assert in_window <= 2 + 10  # burst + rate * 1 s
    assert arrivals[-1] - arrivals[0] >= (18 - 2) / 10 - jitter  # and it did wait


# ------------------------------------------------------------------------ spec checker


def test_spec_check_rejects_what_the_spec_forbids(spec_path: Path) -> None:
    """The validation the fixtures apply is not vacuous."""
    auth = {"Authorization": "Bearer t"}
    good = httpx.Request(
        "POST", "http://x/v1/apps", json={"name": "a", "org_slug": "o"}, headers=auth
    )
    bad = httpx.Request("POST", "http://x/v1/apps", json={"name": 3}, headers=auth)
    assert assert_match_spec(spec_path, [good]) == 1
    with pytest.raises(SpecViolation):
        assert_match_spec(spec_path, [bad])


async def test_requests_were_checked_against_the_spec(
    fly: FlyClient, app: str, recorder: RecordingTransport, spec_path: Path
) -> None:
    machine = await fly.create_machine(app, CONFIG, "iad", lease_ttl=10)
    assert machine.nonce
    await fly.wait_machine(app, machine.id, "started", instance_id=machine.instance_id, timeout=5)
    await fly.release_lease(app, machine.id, machine.nonce)
    await fly.list_ip_assignments(app)
    assert assert_match_spec(spec_path, recorder.requests) >= 4
    assert any(r.url.path.endswith("/ip_assignments") for r in recorder.requests)


async def test_machines_are_created_and_updated_with_min_secrets_version(
    fly: FlyClient, app: str, recorder: RecordingTransport
) -> None:
    version = await fly.set_secrets(app, {"API_KEY": "k1"})
    machine = await fly.create_machine(app, CONFIG, "iad", min_secrets_version=version)
    await fly.update_machine(
        app, machine.id, CONFIG, "iad", nonce=None, min_secrets_version=version
    )
    sent = [json.loads(r.content) for r in recorder.requests if r.url.path.endswith(
        (f"/apps/{app}/machines", f"/machines/{machine.id}")) and r.method == "POST"]  # fmt: skip
    assert [b.get("min_secrets_version") for b in sent] == [version, version]
    # Newer than the app's secrets: the platform refuses it.
    with pytest.raises(FlyBadRequest, match="min_secrets_version"):
        await fly.create_machine(app, CONFIG, "iad", min_secrets_version=version + 1)


async def test_wait_sends_version_and_every_state(
    fly: FlyClient, app: str, recorder: RecordingTransport, flysim: Any
) -> None:
    machine = await fly.create_machine(app, CONFIG, "iad")
    assert machine.version and machine.version == machine.instance_id
    reached = await fly.wait_machine(
        app, machine.id, ("started", "failed"), version=machine.version, timeout=5
    )
    assert reached == "started"
    wait = [r for r in recorder.requests if r.url.path.endswith("/wait")][-1]
    assert wait.url.params.get_list("state") == ["started", "failed"]
    assert wait.url.params["version"] == machine.version and "instance_id" not in wait.url.params
    # The deprecated name goes out as `version` too.
    await fly.wait_machine(app, machine.id, "started", instance_id=machine.version, timeout=5)
    assert recorder.requests[-1].url.params["version"] == machine.version

    broken = {**CONFIG, "image": f"registry.fly.io/fails-{uuid.uuid4().hex[:8]}:v1"}
    flysim.config.failing_images.add(broken["image"])
    try:
        failing = await fly.create_machine(app, broken, "iad")
        assert (
            await fly.wait_machine(
                app, failing.id, ("started", "failed"), version=failing.version, timeout=5
            )
            == "failed"
        )
        with pytest.raises(FlyBadRequest, match="failed to reach desired state"):
            await fly.wait_machine(app, failing.id, "started", version=failing.version, timeout=5)
    finally:
        flysim.config.failing_images.discard(broken["image"])


def test_machine_reads_either_version_field() -> None:
    old = Machine.model_validate({"id": "m", "instance_id": "01A"})
    new = Machine.model_validate({"id": "m", "version": "01A"})
    assert old.version == old.instance_id == new.version == new.instance_id == "01A"
    assert Machine.model_validate({"id": "m", "state": "launch_failed"}).failed
    assert not Machine.model_validate({"id": "m", "state": "started"}).failed


def test_api_errors_survive_pickling() -> None:
    import pickle

    exc = FlyUnprocessable(
        422, "Name has already been taken", "req-1", None, method="POST", path="/apps"
    )
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is FlyUnprocessable and str(copy) == str(exc) and copy.path == "/apps"
    assert isinstance(copy, FlyAPIError)
