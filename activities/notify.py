"""After the steps: tell the request's callback URL how the deploy ended.

The `DeploymentNotice` is POSTed as JSON with two headers:

    X-Turbodeploy-Delivery: <deployment_id>
        The same on every attempt: a receiver that saw it already answers 2xx and does
        nothing, since a delivery may arrive more than once (an attempt whose answer was
        lost is sent again).
    X-Turbodeploy-Signature: t=<unix seconds>,v1=<hex>
        v1 = HMAC-SHA256(key, f"{t}.".encode() + body), over the exact body bytes. The key
        is the SSM parameter `callback_secret_parameter`, shared with the receiver. A
        receiver checks it with `verify_signature`, which also rejects a `t` more than five
        minutes away from its clock, so a captured request cannot be replayed later.

A 2xx answer is a delivery. 408, 429, 5xx and network failures raise a retryable error (the
workflow's retry policy spaces the attempts; a `Retry-After` answer sets the next delay);
any other status raises the non-retryable `CallbackRejected`. The key appears in no result,
error or log line, and the callback URL is shown without its query or credentials.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from temporalio import activity

from activities._errors import (
    CALLBACK_KEY_MISSING,
    CALLBACK_REJECTED,
    CALLBACK_UNAVAILABLE,
    SECRETS_UNAVAILABLE,
)
from activities._ssm import Cached, Secret, build_ssm_client
from core.models import DeploymentNotice, Model
from core.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

SIGNATURE_HEADER = "X-Turbodeploy-Signature"
DELIVERY_HEADER = "X-Turbodeploy-Delivery"
DEFAULT_KEY_PARAMETER = "/turbobackend/callbacks/hmac_key"

_TIMEOUT_SECONDS = 10.0
_RETRYABLE_STATUS = frozenset({408, 425, 429})
_MAX_RETRY_AFTER = timedelta(minutes=10)
_EXCERPT_CHARS = 200


class NotifyInput(Model):
    callback_url: str
    notice: DeploymentNotice


class NotifyResult(Model):
    delivered: bool
    attempts: int
    status_code: int | None = None


def sign(key: bytes, body: bytes, timestamp: int) -> str:
    """The `X-Turbodeploy-Signature` header value for `body` sent at `timestamp`."""
    return f"t={timestamp},v1={_digest(key, timestamp, body)}"


def verify_signature(
    key: bytes, header: str, body: bytes, *, tolerance_s: int = 300, now: float | None = None
) -> bool:
    """Whether `header` signs `body` with `key`, at a time within `tolerance_s` of `now`.

    Several `v1=` values are accepted (any one matching suffices), so a sender may sign
    with an old and a new key while the key is rotated.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _digest(key, timestamp, body)
    # Every candidate is compared, so the time taken tells nothing about which one matched.
    matches = [hmac.compare_digest(expected, c) for c in candidates]
    return any(matches)


def _digest(key: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(key, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


class CallbackKeys:
    """The callback signing key from SSM parameter `parameter` (default: the setting
    `callback_secret_parameter`), cached like the Fly token."""

    def __init__(
        self,
        settings: Settings,
        *,
        parameter: str | None = None,
        ssm_client: SSMClient | None = None,
    ) -> None:
        configured: str = getattr(settings, "callback_secret_parameter", DEFAULT_KEY_PARAMETER)
        self._parameter = parameter or configured
        self._region = settings.aws_region
        self._ssm = ssm_client if ssm_client is not None else build_ssm_client(settings)
        self._cached: Cached[Secret] = Cached(settings.token_cache_seconds)

    async def key(self) -> bytes:
        secret = await self._cached.get(self._load)
        return secret.reveal().encode()

    def invalidate(self) -> None:
        self._cached.clear()

    def __repr__(self) -> str:
        return f"CallbackKeys(parameter={self._parameter!r})"

    async def _load(self) -> Secret:
        name = self._parameter
        try:
            response = await asyncio.to_thread(
                self._ssm.get_parameter, Name=name, WithDecryption=True
            )
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code == "ParameterNotFound":
                raise CALLBACK_KEY_MISSING(
                    f"the callback signing key parameter {name} does not exist in SSM "
                    f"(region {self._region})"
                ) from None
            raise SECRETS_UNAVAILABLE(f"SSM GetParameter {name} failed: {code}") from None
        except BotoCoreError as err:
            raise SECRETS_UNAVAILABLE(
                f"SSM is unreachable reading {name}: {type(err).__name__}"
            ) from None
        value = response["Parameter"].get("Value", "").strip()
        if not value:
            raise CALLBACK_KEY_MISSING(f"the callback signing key parameter {name} is empty")
        return Secret(value)


class NotifyActivities:
    """`notify_deployment`: one signed POST per attempt to the request's callback URL.

    The signing key is read from SSM (`callback_secret_parameter`) and cached for
    `token_cache_seconds`, so a rotated key is used within that time. Pass `http` to share
    a connection pool; otherwise one is created and closed by `aclose()`.
    """

    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient | None = None,
        *,
        keys: CallbackKeys | None = None,
    ) -> None:
        self._keys = keys if keys is not None else CallbackKeys(settings)
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(timeout=_TIMEOUT_SECONDS, follow_redirects=False)

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    @activity.defn(name="notify_deployment")
    async def notify_deployment(self, payload: NotifyInput) -> NotifyResult:
        notice = payload.notice
        url = payload.callback_url
        shown = _display_url(url)
        attempt = activity.info().attempt
        body = notice.model_dump_json().encode()
        key = await self._keys.key()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "turbodeploy-callback/1",
            DELIVERY_HEADER: notice.deployment_id,
            SIGNATURE_HEADER: sign(key, body, int(time.time())),
        }
        del key
        try:
            response = await self._http.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            # Not chained: the httpx exception holds the request and its headers.
            raise CALLBACK_UNAVAILABLE(
                f"callback {shown} unreachable: {type(exc).__name__}: {exc}"
            ) from None
        status = response.status_code
        if response.is_success:
            activity.logger.info(
                "deployment %s (%s) delivered to %s: %d",
                notice.deployment_id,
                notice.status,
                shown,
                status,
            )
            return NotifyResult(delivered=True, attempts=attempt, status_code=status)
        excerpt = response.text[:_EXCERPT_CHARS].strip()
        message = f"callback {shown} answered {status}" + (f": {excerpt}" if excerpt else "")
        if status in _RETRYABLE_STATUS or status >= 500:
            raise CALLBACK_UNAVAILABLE(
                message, next_retry_delay=_retry_after(response.headers.get("Retry-After"))
            )
        raise CALLBACK_REJECTED(message)


def _display_url(url: str) -> str:
    """The URL without credentials, query or fragment, which may hold a receiver's token."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def _retry_after(value: str | None) -> timedelta | None:
    """`Retry-After` as seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        delay = timedelta(seconds=int(value))
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        delay = timedelta(seconds=max(when.timestamp() - time.time(), 0.0))
    return min(delay, _MAX_RETRY_AFTER) if delay > timedelta(0) else None
