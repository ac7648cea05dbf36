"""The `health` step against a real HTTP server on loopback whose answers are slow."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.health import HealthActivities, HealthCheckInput
from core.models import DeployTimings

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

HEARTBEAT_TIMEOUT = timedelta(milliseconds=600)


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    handling: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handling.add(task)
        try:
            with contextlib.suppress(ConnectionError):
                await reader.readuntil(b"\r\n\r\n")
                await handler(reader, writer)
        except asyncio.CancelledError:
            pass  # the test is over: a trickle the client gave up on is ended here
        finally:
            handling.discard(task)
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in list(handling):
            task.cancel()
        await asyncio.gather(*handling, return_exceptions=True)


def _env(heartbeats: list[tuple[Any, ...]]) -> ActivityEnvironment:
    environment = ActivityEnvironment()
    environment.info = dataclasses.replace(environment.info, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    environment.on_heartbeat = lambda *details: heartbeats.append((time.monotonic(), *details))
    return environment


def _timings(**overrides: timedelta) -> DeployTimings:
    values = {
        "health_deadline": timedelta(seconds=5),
        "health_poll_initial": timedelta(milliseconds=50),
        "health_poll_max": timedelta(milliseconds=100),
        "health_request_timeout": timedelta(seconds=5),
        **overrides,
    }
    return DeployTimings(**values)


async def test_a_request_held_longer_than_the_heartbeat_timeout_keeps_heartbeating() -> None:
    # The Fly proxy holds the request while it wakes a stopped machine: one request that
    # lasts longer than the heartbeat timeout must not look like a dead worker.
    hold = 2.0

    async def wake_then_answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(hold)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()

    heartbeats: list[tuple[Any, ...]] = []
    health = HealthActivities()
    try:
        async with serving(wake_then_answer) as url:
            began = time.monotonic()
            result = await _env(heartbeats).run(
                health.check_health, HealthCheckInput(url=url, timings=_timings())
            )
            answered = time.monotonic()
    finally:
        await health.aclose()

    assert result.healthy and result.attempts == 1, result
    during = [at for at, *_ in heartbeats if began < at < answered]
    # One every third of the timeout: no gap while the request waited was as long as it.
    gaps = [b - a for a, b in zip([began, *during], [*during, answered], strict=True)]
    assert len(during) >= 3, heartbeats
    assert max(gaps) < HEARTBEAT_TIMEOUT.total_seconds(), gaps
    # What the server shows as the last heartbeat is the check's progress.
    assert heartbeats[-1][1]["attempts"] == 1


async def test_an_answer_sent_a_byte_at_a_time_does_not_outlast_the_deadline() -> None:
    # Each read arrives within httpx's timeout, so only a bound on the whole request ends it.
    async def trickle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n")
        while True:
            writer.write(b".")
            await writer.drain()
            await asyncio.sleep(0.1)

    timings = _timings(
        health_deadline=timedelta(seconds=1.5), health_request_timeout=timedelta(seconds=0.5)
    )
    heartbeats: list[tuple[Any, ...]] = []
    health = HealthActivities()
    try:
        async with serving(trickle) as url:
            began = time.monotonic()
            with pytest.raises(ApplicationError) as caught:
                await asyncio.wait_for(
                    _env(heartbeats).run(
                        health.check_health, HealthCheckInput(url=url, timings=timings)
                    ),
                    timeout=30,
                )
            took = time.monotonic() - began
    finally:
        await health.aclose()

    assert caught.value.type == "HealthCheckFailed", caught.value
    assert "no whole answer within" in caught.value.message, caught.value.message
    assert caught.value.non_retryable
    # The deadline, plus at most one request's timeout (the last one started before it).
    assert took < 1.5 + 0.5 + 1.0, took
