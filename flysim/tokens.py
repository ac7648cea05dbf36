"""App-scoped deploy tokens: `POST /v1/apps/{app}/deploy_token`, and what they may do.

    POST /v1/apps/{app}/deploy_token   {"expiry": "<Go duration>"}   -> {"token": "FlyV1 fm2_…"}

As Fly's (`fly tokens create deploy`), a deploy token manages one app and its resources:
machines, leases, IPs, secrets, volumes, logs. The emulator refuses it everywhere else, as
the Machines API does:

- a request about another app, or about no app (listing or creating apps): 403
  `{"error": "unauthorized"}`, fly-go's "the app exists, in an org we cannot see into";
- after its expiry, or once its app was deleted (a new app of the same name is another
  app): 401 `invalid token`;
- minting tokens with it: 403, only an organisation token may.

Only an organisation token (`SimConfig.tokens`) mints one. `expiry` is a Go duration
(`"2h0m0s"`, `"7200s"`); without one a token lasts 20 years, flyctl's default.

Tokens are signed, not stored: like a macaroon, one carries its own caveats (the org, the
app's id, the expiry) under an HMAC of a key that `persist.py` keeps with the world, so an
emulator restarted on the same state file still accepts the tokens it minted. The last
tokens minted are kept in memory (`issued`) for tests, which look for them where no
secret may be; no answer, snapshot or log line shows one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flysim._http import ApiError, SimContext, json_body, path_app, request_org

PREFIX = "fm2_"
SCHEME = "FlyV1"
DEFAULT_EXPIRY_SECONDS = 20 * 365 * 24 * 3600.0  # flyctl's default: 20 years
APP_SCOPE = "flysim.app"  # the request scope key naming the app a deploy token is for

_NONCE_BYTES = 16
_SIG_BYTES = 32
_ISSUED_KEPT = 1000
_APP_PATH_RE = re.compile(r"^/(?:api/)?v1/apps/(?P<app>[^/]+)(?:/.*)?$")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class TokenRefused(Exception):
    """A deploy token that may not make this request: answered with `status` and `error`."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


@dataclass(frozen=True)
class Grant:
    """What a valid deploy token allows: one app of one org, until `expires_at`."""

    org: str
    app: str
    app_id: str
    expires_at: float


@dataclass(frozen=True)
class Issued:
    """A token the emulator minted (for tests; the value does not show in reprs)."""

    org: str
    app: str
    expires_at: float
    token: str = field(repr=False)


def parse_go_duration(value: str) -> float:
    """Seconds in a Go duration (`1h30m`, `7200s`, `1.5h`); ValueError when it is none."""
    text = value.strip()
    parts = _DURATION_RE.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {value[:40]!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def token_body(authorization: str) -> str:
    """The macaroon of an Authorization header or token: without `Bearer ` or `FlyV1 `."""
    value = authorization.strip()
    for scheme in ("bearer ", "flyv1 "):
        if value[: len(scheme)].lower() == scheme:
            value = value[len(scheme) :].strip()
    return value


class DeployTokens:
    """Mints deploy tokens and checks them. `clock` is for tests that let one expire."""

    def __init__(self, key: bytes | None = None, *, clock: Callable[[], float] = time.time):
        self.key = key if key is not None else secrets.token_bytes(32)
        self.clock = clock
        self.issued: list[Issued] = []

    def __repr__(self) -> str:
        return f"DeployTokens(issued={len(self.issued)})"

    def mint(self, org: str, app: str, app_id: str, seconds: float) -> str:
        expires_at = self.clock() + seconds
        caveats = json.dumps({"o": org, "a": app, "i": app_id, "x": expires_at}).encode()
        raw = secrets.token_bytes(_NONCE_BYTES) + caveats
        signature = hmac.new(self.key, raw, hashlib.sha256).digest()
        body = base64.urlsafe_b64encode(raw + signature).decode().rstrip("=")
        token = f"{SCHEME} {PREFIX}{body}"
        self.issued.append(Issued(org, app, expires_at, token))
        del self.issued[:-_ISSUED_KEPT]
        return token

    def grant(self, authorization: str) -> Grant | None:
        """The grant of a deploy token (any Authorization form), or None when the value is
        not one this emulator minted. Raises `TokenRefused` (401) once it expired."""
        body = token_body(authorization)
        if not body.startswith(PREFIX):
            return None
        try:
            encoded = body[len(PREFIX) :]
            data = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except ValueError:
            return None
        raw, signature = data[:-_SIG_BYTES], data[-_SIG_BYTES:]
        expected = hmac.new(self.key, raw, hashlib.sha256).digest()
        if len(raw) <= _NONCE_BYTES or not hmac.compare_digest(signature, expected):
            return None
        caveats = json.loads(raw[_NONCE_BYTES:])
        grant = Grant(
            org=str(caveats["o"]),
            app=str(caveats["a"]),
            app_id=str(caveats["i"]),
            expires_at=float(caveats["x"]),
        )
        if self.clock() >= grant.expires_at:
            raise TokenRefused(401, "invalid token: the token has expired")
        return grant

    def authorize(self, grant: Grant, path: str, app_ids: dict[str, str]) -> None:
        """Raise `TokenRefused` unless the deploy token of `grant` may request `path`.
        `app_ids`: the id of every app that exists, by name."""
        match = _APP_PATH_RE.match(path)
        if match is None or unquote(match["app"]) != grant.app:
            raise TokenRefused(403, "unauthorized")
        current = app_ids.get(grant.app)
        if current is not None and current != grant.app_id:
            # The app the token was minted for was deleted; this is another of its name.
            raise TokenRefused(401, "invalid token: its app no longer exists")

    def to_json(self) -> dict[str, Any]:
        """What `persist.py` keeps: the signing key (the tokens themselves are not kept)."""
        return {"key": base64.b64encode(self.key).decode()}

    def load(self, data: dict[str, Any]) -> None:
        if data.get("key"):
            self.key = base64.b64decode(data["key"])


class TokenHost(SimContext, Protocol):
    @property
    def deploy_tokens(self) -> DeployTokens: ...


def refusal(exc: TokenRefused) -> Response:
    return JSONResponse({"error": exc.error, "status": "unknown"}, status_code=exc.status)


def deploy_token_routes(sim: TokenHost) -> list[Route]:
    async def create(request: Request) -> Response:
        if request.scope.get(APP_SCOPE) is not None:
            raise ApiError(403, "unauthorized: a deploy token cannot create tokens")
        app = path_app(sim.world, request)
        body = await json_body(request)
        expiry = body.get("expiry")
        seconds = DEFAULT_EXPIRY_SECONDS
        if expiry is not None and expiry != "":
            if not isinstance(expiry, str):
                raise ApiError(400, "expiry must be a duration string, e.g. 2h0m0s")
            try:
                seconds = parse_go_duration(expiry)
            except ValueError as exc:
                raise ApiError(400, f"expiry: {exc}") from None
            if not 0 < seconds <= DEFAULT_EXPIRY_SECONDS:
                raise ApiError(400, "expiry must be more than 0 and at most 20 years")
        token = sim.deploy_tokens.mint(request_org(request), app.name, app.id, seconds)
        return JSONResponse({"token": token})

    return [Route("/v1/apps/{app_name}/deploy_token", create, methods=["POST"])]
