"""Check HTTP exchanges against the official Fly Machines OpenAPI document.

Used by tests of the client (the requests it sends), and by the emulator itself: with a
spec to check against (`FlySim(spec_check=path)`, `python -m flysim --validate-spec PATH`
or `$FLYSIM_VALIDATE_SPEC`), every `/v1` exchange it serves goes through `SpecChecker`,
which records what does not conform. Needs `openapi-core`, a development dependency,
imported on first use only.

Rules beyond plain openapi-core:
- The request is matched as if sent to the spec's server (`https://api.machines.dev/v1`),
  whatever host the exchange really used; its path must start with `/v1`.
- Paths the spec does not describe are reported as not covered (`None`), not as violations.
- A query parameter given more than once (`state=started&state=failed`, as fly-go sends
  it) has every value checked against the parameter's schema, not just the first.
- `Authorization: FlyV1 <macaroon>`, as flyctl sends it, counts as the bearer token the
  spec asks for (Fly accepts both).
- `autostop` may be a boolean, as fly-go sends it and the API accepts, and a secrets
  update may give `null` to unset one, as its description says, and a volume create may
  give `null` for its optional fields, as fly-go sends them (`_amend`).
- A lease request without a body (fly-go sends `?ttl=` only) counts as an empty one.
- A response declared with `content: {}` has no schema, so any body is accepted.
- Error statuses the spec does not list for an operation (401, 404, 409, 422, 429, 5xx...)
  must carry a JSON object with a string `error` or `message`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from starlette.types import Message, Receive, Scope, Send

logger = logging.getLogger("flysim.spec")

SPEC_SERVER = "https://api.machines.dev"
# Operations whose body the spec requires but Fly's own clients leave out, and Fly accepts:
# fly-go's AcquireLease sends the ttl as `?ttl=` and no body.
_BODY_OPTIONAL = frozenset({"Machines_create_lease"})


class SpecViolation(AssertionError):
    """An exchange that does not conform to the OpenAPI document."""


@functools.cache
def _load(spec_path: str) -> Any:
    import yaml
    from openapi_core import OpenAPI

    with open(spec_path, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    _amend(document)
    return OpenAPI.from_dict(document, base_uri=Path(spec_path).absolute().as_uri())


def _amend(document: dict[str, Any]) -> None:
    """Where the generated spec says less than the server accepts, say what it accepts.

    `fly.MachineService.autostop` is typed a string with `false` among its values, while
    its own description, fly-go (which sends `true`/`false` for stop/off) and the API
    take a boolean as well. A secrets update unsets a secret given `null`. A volume create
    may give `null` for any optional field: fly-go's `CreateVolumeRequest` has no
    `omitempty`, so every unset field arrives as `null`, and the API takes it as unset.
    """
    schemas = document.get("components", {}).get("schemas", {})
    service = schemas.get("fly.MachineService", {}).get("properties", {})
    autostop = service.get("autostop")
    if (
        isinstance(autostop, dict)
        and autostop.get("type") == "string"
        and False in (autostop.get("enum") or [])
    ):
        autostop["type"] = ["boolean", "string"]
        autostop["enum"] = [True, False, "off", "stop", "suspend"]
    # "Update app secret request, with values to set, or nil to unset" (its description;
    # fly-go sends a map of string pointers), while the schema allows strings only.
    values = schemas.get("AppSecretsUpdateRequest", {}).get("properties", {}).get("values")
    if isinstance(values, dict) and values.get("additionalProperties") == {"type": "string"}:
        values["additionalProperties"] = {"type": ["string", "null"]}
    volume = schemas.get("CreateVolumeRequest", {})
    required = set(volume.get("required") or ()) | {"name", "region"}  # always sent
    for name, prop in (volume.get("properties") or {}).items():
        if name in required or not isinstance(prop, dict):
            continue
        if str(document.get("openapi", "")).startswith("3.0"):  # no "null" type before 3.1
            volume["properties"][name] = (
                {"allOf": [{"$ref": prop["$ref"]}], "nullable": True}
                if "$ref" in prop
                else {**prop, "nullable": True}
            )
        elif isinstance(prop.get("type"), str):
            prop["type"] = [prop["type"], "null"]
        elif "$ref" in prop:
            volume["properties"][name] = {"anyOf": [{"$ref": prop.pop("$ref")}, {"type": "null"}]}


class _Request:
    """openapi-core's request protocol over an `httpx.Request`."""

    def __init__(self, request: httpx.Request, query: dict[str, list[str]] | None = None) -> None:
        from openapi_core.datatypes import RequestParameters
        from werkzeug.datastructures import Headers, ImmutableMultiDict

        url = urlsplit(str(request.url))
        self.host_url = SPEC_SERVER
        self.path = url.path
        self.method = request.method.lower()
        self.body: bytes | None = request.read() or None
        self.content_type = request.headers.get("content-type", "")
        if query is None:
            query = parse_qs(url.query, keep_blank_values=True)
        self.query = query
        headers = dict(request.headers)
        scheme, _, _ = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "flyv1":
            # flyctl sends macaroons as `FlyV1 fm2_...`, which Fly accepts like a bearer token.
            headers["authorization"] = f"Bearer {headers['authorization']}"
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(query),
            header=Headers(headers),
            cookie=ImmutableMultiDict({}),
        )


class _Response:
    def __init__(self, response: httpx.Response) -> None:
        from werkzeug.datastructures import Headers

        self.status_code = response.status_code
        self.data: bytes | None = response.read()
        self.content_type = response.headers.get("content-type", "")
        self.headers = Headers(dict(response.headers))


def operation_id(spec_path: str | Path, method: str, path: str) -> str | None:
    """The spec's operationId for `method path` (a `/v1/...` path), or None if absent."""
    from openapi_core.templating.paths.exceptions import PathError
    from openapi_core.templating.paths.finders import APICallPathFinder

    api = _load(str(spec_path))
    try:
        found = APICallPathFinder(api.spec).find(method.lower(), SPEC_SERVER + path)
    except PathError:
        return None
    return str(found.operation["operationId"])


def validate_exchange(
    spec_path: str | Path, request: httpx.Request, response: httpx.Response | None = None
) -> str | None:
    """Validate `request` (and `response`, if given) against the spec at `spec_path`.

    Returns the operationId that was checked, or None when the spec does not describe the
    path. Raises `SpecViolation` naming the operation and what is wrong.
    """
    path = urlsplit(str(request.url)).path
    if not path.startswith("/v1/") and path != "/v1":
        raise SpecViolation(f"{request.method} {path}: API paths start with /v1")
    op = operation_id(spec_path, request.method, path)
    if op is None:
        return None
    api = _load(str(spec_path))
    if op in _BODY_OPTIONAL and not request.content:
        request = httpx.Request(
            request.method,
            request.url,
            headers={**request.headers, "content-type": "application/json"},
            content=b"{}",
        )
    oa_request = _Request(request)
    # openapi-core reads the first value of a repeated parameter: check the others too.
    variants = [oa_request]
    for name, values in oa_request.query.items():
        for value in values[1:]:
            variants.append(_Request(request, {**oa_request.query, name: [value]}))
    for variant in variants:
        try:
            api.validate_request(variant)
        except Exception as exc:
            raise SpecViolation(f"{op}: request does not conform: {_describe(exc)}") from exc
    if response is not None:
        _validate_response(api, op, oa_request, _Response(response))
    return op


def _validate_response(api: Any, op: str, request: _Request, response: _Response) -> None:
    from openapi_core.templating.paths.finders import APICallPathFinder

    found = APICallPathFinder(api.spec).find(request.method, SPEC_SERVER + request.path)
    responses = found.operation / "responses"
    status = str(response.status_code)
    if status not in responses and "default" not in responses:
        if response.status_code >= 400:
            _check_error_body(op, response)
            return
        declared = ", ".join(sorted(responses.keys()))
        raise SpecViolation(f"{op}: status {status} is not declared (declared: {declared})")
    declared_response = responses / status if status in responses else responses / "default"
    if "content" not in declared_response or not list((declared_response / "content").keys()):
        return  # declared without a schema: any body conforms
    try:
        api.validate_response(request, response)
    except Exception as exc:
        raise SpecViolation(f"{op}: response {status} does not conform: {_describe(exc)}") from exc


def _check_error_body(op: str, response: _Response) -> None:
    try:
        body = json.loads(response.data or b"")
    except ValueError:
        body = None
    if not isinstance(body, dict) or not any(
        isinstance(body.get(key), str) for key in ("error", "message")
    ):
        raise SpecViolation(
            f"{op}: error response {response.status_code} must be a JSON object with a "
            f"string 'error' or 'message', got {response.data!r:.200}"
        )


def _describe(exc: BaseException) -> str:
    parts = [_short(str(exc) or type(exc).__name__)]
    cause = exc.__cause__
    while cause is not None:
        schema_errors = getattr(cause, "schema_errors", None)
        if schema_errors:
            for error in schema_errors:
                where = "/".join(str(p) for p in getattr(error, "absolute_path", []))
                message = _short(getattr(error, "message", str(error)))
                parts.append(f"at {where or '(root)'}: {message}")
        else:
            parts.append(_short(str(cause) or type(cause).__name__))
        cause = cause.__cause__
    return "; ".join(dict.fromkeys(parts))


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------ the emulator's check


@dataclass(frozen=True)
class Violation:
    """One exchange the emulator served that does not conform to the spec."""

    operation: str
    method: str
    path: str
    status: int
    problem: str

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}: {self.problem}"


# Every violation any checker of this process records, in order, unless tolerated: what a
# test suite looks at after each test.
RECORDED: list[Violation] = []
_tolerating = 0
_recorded_lock = threading.Lock()


@contextlib.contextmanager
def tolerated() -> Iterator[None]:
    """Inside, violations are kept by their checker but not added to `RECORDED`: for a
    test that sends what the spec forbids on purpose, to see the emulator answer it."""
    global _tolerating
    with _recorded_lock:
        _tolerating += 1
    try:
        yield
    finally:
        with _recorded_lock:
            _tolerating -= 1


class SpecChecker:
    """Checks every exchange an emulator serves against the spec at `spec_path`.

    A response that does not conform is a violation, and so is a request that does not
    conform but was accepted (answered below 400): rejecting such a request is the
    emulator's job, accepting it hides a client bug. Paths the spec does not describe are
    counted in `uncovered`. Nothing here changes an answer.
    """

    def __init__(self, spec_path: str | Path) -> None:
        self.spec_path = str(spec_path)
        if not Path(self.spec_path).is_file():
            raise FileNotFoundError(f"no OpenAPI document at {self.spec_path}")
        _load(self.spec_path)  # a document openapi-core cannot read fails here, not later
        self.violations: list[Violation] = []
        self.checked: Counter[str] = Counter()  # operationId -> exchanges checked
        self.uncovered: Counter[str] = Counter()  # "METHOD /path" -> exchanges
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SpecChecker({self.spec_path!r}, violations={len(self.violations)})"

    def operation(self, method: str, path: str) -> str | None:
        if not (path == "/v1" or path.startswith("/v1/")):
            return None
        return operation_id(self.spec_path, method, path)

    def check(self, request: httpx.Request, response: httpx.Response) -> list[Violation]:
        """Check one exchange; returns (and records) its violations."""
        path = urlsplit(str(request.url)).path
        op = self.operation(request.method, path)
        if op is None:
            with self._lock:
                self.uncovered[f"{request.method} {path}"] += 1
            return []
        found: list[str] = []
        try:
            validate_exchange(self.spec_path, request)
        except SpecViolation as exc:
            if response.status_code < 400:
                found.append(f"accepted a request that does not conform: {exc}")
        except Exception as exc:  # the checker must never break serving
            found.append(f"request could not be checked: {exc!r}")
        try:
            api = _load(self.spec_path)
            _validate_response(api, op, _Request(request), _Response(response))
        except SpecViolation as exc:
            found.append(str(exc))
        except Exception as exc:
            found.append(f"response could not be checked: {exc!r}")
        if "secret" in op.lower() or "token" in op.lower():
            # A schema error quotes the value it rejects, and these values are secrets
            # (or, for a deploy token, the token itself).
            found = [f.split(":", 1)[0] + " (details withheld: secret values)" for f in found]
        violations = [Violation(op, request.method, path, response.status_code, f) for f in found]
        with self._lock:
            self.checked[op] += 1
            self.violations.extend(violations)
        with _recorded_lock:
            if not _tolerating:
                RECORDED.extend(violations)
        for violation in violations:
            logger.warning("spec violation: %s", violation)
        return violations

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "spec": self.spec_path,
                "checked": dict(self.checked),
                "uncovered": dict(self.uncovered),
                "violations": [str(v) for v in self.violations],
            }

    async def serve(self, scope: Scope, receive: Receive, send: Send, app: Any) -> None:
        """Run the ASGI `app` on one HTTP exchange, checking it before the answer leaves.

        The response is held until it is complete, so a client that has its answer finds
        the exchange checked. Only exchanges the spec describes are held (a stream the
        spec does not know, like a log tail, passes straight through).
        """
        method, path = scope["method"], scope["path"]
        if self.operation(method, path) is None:
            with self._lock:
                self.uncovered[f"{method} {path}"] += 1
            await app(scope, receive, send)
            return
        body = bytearray()

        async def recording_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
            return message

        start: Message | None = None
        chunks = bytearray()

        async def holding_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            chunks.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            self._check_asgi(scope, bytes(body), start, bytes(chunks))
            await send(start)
            await send({"type": "http.response.body", "body": bytes(chunks)})

        await app(scope, recording_receive, holding_send)

    def _check_asgi(self, scope: Scope, body: bytes, start: Message, content: bytes) -> None:
        try:
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
            query = scope.get("query_string", b"").decode("latin-1")
            url = SPEC_SERVER + scope["path"] + (f"?{query}" if query else "")
            request = httpx.Request(scope["method"], url, headers=headers, content=body)
            response_headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in start.get("headers", [])
            ]
            response = httpx.Response(
                int(start["status"]), headers=response_headers, content=content, request=request
            )
        except Exception:
            logger.exception("could not rebuild an exchange to check it")
            return
        self.check(request, response)
