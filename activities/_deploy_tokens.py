"""App-scoped deploy tokens for the flyctl children: the org token never leaves the Fly client.

flyctl (a build, the `flyctl` strategy, `scale count`) runs as a child process, and what a
child holds it can leak: a core dump, a debug log, a compromised build step. So a child
never gets the worker's Fly token, which may manage every app of the organisation. It
gets a deploy token of the one app it works on (`fly tokens create deploy`), minted
through the Machines API (`POST /v1/apps/{app}/deploy_token`) by the worker's Fly
client, which alone sends the org token.

A token is asked for `fly_deploy_token_seconds` (or longer, when the child may run
longer) and kept in this worker's memory, per app, as long as it outlives the child about
to start (its activity's start-to-close timeout) by `fly_deploy_token_margin_seconds`;
after that the next child gets a new one, minted before the old one expires. Tokens are
never part of an activity's input or result, a log line, the database or a child's argv:
the child sees its token as FLY_API_TOKEN in its environment only, and the output it
prints is redacted of it (`activities.build`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Final

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._errors import to_application_error
from activities._ssm import Secret
from activities.secrets import CredentialStore
from core.settings import Settings
from flyapi import DeployToken, FlyClient, FlyError, FlyForbidden, FlyUnauthorized

log = logging.getLogger(__name__)

# A child whose activity has no timeout (a test environment, a misconfigured policy).
_DEFAULT_RUN_SECONDS: Final = 3600.0


def child_run_seconds() -> float:
    """The longest the current activity's child may run: its start-to-close timeout (the
    attempt is cancelled, and the child killed, after it), else its schedule-to-close."""
    info = activity.info()
    for limit in (info.start_to_close_timeout, info.schedule_to_close_timeout):
        if limit is not None and limit > timedelta(0):
            return limit.total_seconds()
    return _DEFAULT_RUN_SECONDS


class _Held:
    """A minted token, its value hidden from reprs."""

    __slots__ = ("expires_at", "secret")

    def __init__(self, minted: DeployToken, expires_at: float) -> None:
        self.secret = Secret(minted.token)
        self.expires_at = expires_at


class AppTokens:
    """The deploy tokens of one worker process, by app, shared by its activities.

    `fly`: the worker's Fly client (its rate limit, metrics and traces); without one, each
    mint opens a short-lived client of its own with the credentials' token. `clock`: Unix
    seconds, for tests that move time on.
    """

    def __init__(
        self,
        credentials: CredentialStore,
        settings: Settings,
        *,
        fly: FlyClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._credentials = credentials
        self._settings = settings
        self._fly = fly
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self._minting: dict[str, asyncio.Task[_Held]] = {}
        self.minted = 0  # tokens minted by this worker, for metrics and tests

    def __repr__(self) -> str:
        return f"AppTokens(apps={sorted(self._held)})"

    async def token_for(self, app: str, *, valid_for: float) -> str:
        """A deploy token of `app` valid for at least `valid_for` seconds more (plus the
        margin): the cached one while it is, else a new one. Concurrent callers for one
        app share one mint."""
        needed = max(0.0, valid_for) + self._settings.fly_deploy_token_margin_seconds
        held = self._held.get(app)
        if held is not None and held.expires_at - self._clock() >= needed:
            return held.secret.reveal()
        for _ in range(2):
            task = self._minting.get(app)
            if task is None:
                task = asyncio.create_task(self._mint(app, needed))
                self._minting[app] = task
                task.add_done_callback(functools.partial(self._minted, app))
            # One caller's cancellation must not cancel the mint the others wait for.
            held = await asyncio.shield(task)
            if held.expires_at - self._clock() >= needed:
                break
            # A mint already under way was for a shorter run than this caller's: once more.
        assert held is not None
        return held.secret.reveal()

    def invalidate(self, app: str | None = None) -> None:
        """Forget the token of `app` (of every app when None), e.g. after flyctl was
        refused: the next child gets a new one."""
        if app is None:
            self._held.clear()
        else:
            self._held.pop(app, None)

    def _minted(self, app: str, task: asyncio.Task[_Held]) -> None:
        if self._minting.get(app) is task:
            del self._minting[app]
        if task.cancelled() or task.exception() is not None:
            return
        self._held[app] = task.result()

    async def _mint(self, app: str, needed: float) -> _Held:
        expiry = math.ceil(max(self._settings.fly_deploy_token_seconds, 2 * needed))
        # Counted from before the request, on this cache's clock: the token lives longer.
        sent_at = self._clock()
        try:
            if self._fly is not None:
                minted = await self._fly.create_deploy_token(app, expiry=expiry)
            else:
                async with FlyClient(
                    self._settings.fly_api_base_url,
                    self._credentials.fly_token,
                    timeout=self._settings.fly_api_timeout_seconds,
                ) as fly:
                    minted = await fly.create_deploy_token(app, expiry=expiry)
        except FlyError as exc:
            raise self._failure(app, exc) from None
        self.minted += 1
        log.info("minted a deploy token for Fly app %s, valid for %ds", app, expiry)
        return _Held(minted, sent_at + expiry)

    def _failure(self, app: str, exc: FlyError) -> ApplicationError:
        if isinstance(exc, FlyUnauthorized):
            # Perhaps rotated: the next attempt reads the token from SSM again.
            self._credentials.invalidate()
        error = to_application_error(exc, action=f"Create a deploy token for Fly app {app}")
        if isinstance(exc, FlyUnauthorized | FlyForbidden):
            parameter = self._credentials.token_parameter
            return ApplicationError(
                f"{error.message}; the Fly token in SSM parameter {parameter} "
                "(TURBODEPLOY_FLY_TOKEN_PARAMETER) must be allowed to create deploy tokens "
                "for the organisation's apps: an org token (`fly tokens create org`) or a "
                "user's token, not a deploy token",
                *error.details,
                type=error.type,
                non_retryable=error.non_retryable,
            )
        return error
