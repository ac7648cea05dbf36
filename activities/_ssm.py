"""AWS SSM Parameter Store access shared by the activities that read secrets: one client
configuration (short timeouts, one botocore retry: the activity's retry policy does the
waiting), response bodies kept out of botocore's logs, values that never show themselves,
and a cache that loads a value once for every caller waiting on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Generic, TypeVar

import boto3
from botocore.config import Config

from core.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient


_CONNECT_TIMEOUT_SECONDS = 3.0
_READ_TIMEOUT_SECONDS = 5.0
_BOTOCORE_ATTEMPTS = 2
T = TypeVar("T")


def build_ssm_client(settings: Settings) -> SSMClient:
    """An SSM client for the configured region and endpoint, with short timeouts."""
    hide_response_bodies()
    config = Config(
        connect_timeout=_CONNECT_TIMEOUT_SECONDS,
        read_timeout=_READ_TIMEOUT_SECONDS,
        retries={"mode": "standard", "total_max_attempts": _BOTOCORE_ATTEMPTS},
    )
    # A session of its own: the default session is not safe to share between threads.
    return boto3.session.Session().client(
        "ssm",
        region_name=settings.aws_region,
        endpoint_url=settings.aws_endpoint_url,
        config=config,
    )


class _ResponseBodyFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Response body")


def hide_response_bodies() -> None:
    """botocore logs whole response bodies at DEBUG, decrypted parameter values included."""
    parsers = logging.getLogger("botocore.parsers")
    if not any(isinstance(f, _ResponseBodyFilter) for f in parsers.filters):
        parsers.addFilter(_ResponseBodyFilter())


class Secret:
    """A string that does not show itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a secret cannot be pickled")


class Cached(Generic[T]):
    """One value, kept for `ttl` seconds, loaded by a single in-flight call.

    Callers arriving during a load share its outcome, a failure included: with SSM down, a
    burst of activities makes one slow request, not one after the other.
    """

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._value: T | None = None
        self._expires_at = 0.0
        self._loading: asyncio.Task[T] | None = None

    async def get(self, load: Callable[[], Awaitable[T]]) -> T:
        if self._value is not None and time.monotonic() < self._expires_at:
            return self._value
        if self._loading is None:
            self._loading = asyncio.create_task(self._load(load))
            # Retrieve the outcome even if every caller was cancelled meanwhile.
            self._loading.add_done_callback(lambda t: t.cancelled() or t.exception())
        # One caller's cancellation must not cancel the load the others wait for.
        return await asyncio.shield(self._loading)

    def clear(self) -> None:
        # A load already in flight may predate the change: later callers start their own.
        self._loading = None
        self._value = None

    async def _load(self, load: Callable[[], Awaitable[T]]) -> T:
        task = asyncio.current_task()
        try:
            value = await load()
        finally:
            stale = self._loading is not task
            if not stale:
                self._loading = None
        if not stale:
            self._value = value
            self._expires_at = time.monotonic() + self._ttl
        return value

    def __repr__(self) -> str:
        return f"Cached(value={self._value!r})"
