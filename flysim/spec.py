"""Check HTTP exchanges against the official Fly Machines OpenAPI document.

Used by tests of the emulator (its responses) and of the client (the requests it sends).
Needs `openapi-core`, a development dependency, imported on first use only.

Rules beyond plain openapi-core:
- The request is matched as if sent to the spec's server (`https://api.machines.dev/v1`),
  whatever host the exchange really used; its path must start with `/v1`.
- Paths the spec does not describe (IP assignments, secrets, suspend) are reported as not
  covered (`None`), not as violations.
- A response declared with `content: {}` has no schema, so any body is accepted.
- Error statuses the spec does not list for an operation (401, 404, 409, 422, 429, 5xx...)
  must carry a JSON object with a string `error` or `message`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

SPEC_SERVER = "https://api.machines.dev"


class SpecViolation(AssertionError):
    """An exchange that does not conform to the OpenAPI document."""


@functools.cache
def _load(spec_path: str) -> Any:
    from openapi_core import OpenAPI

    return OpenAPI.from_file_path(spec_path)


class _Request:
    """openapi-core's request protocol over an `httpx.Request`."""

    def __init__(self, request: httpx.Request) -> None:
        from openapi_core.datatypes import RequestParameters
        from werkzeug.datastructures import Headers, ImmutableMultiDict

        url = urlsplit(str(request.url))
        self.host_url = SPEC_SERVER
        self.path = url.path
        self.method = request.method.lower()
        self.body: bytes | None = request.read() or None
        self.content_type = request.headers.get("content-type", "")
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qs(url.query, keep_blank_values=True)),
            header=Headers(dict(request.headers)),
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
    oa_request = _Request(request)
    try:
        api.validate_request(oa_request)
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
    parts = [str(exc) or type(exc).__name__]
    cause = exc.__cause__
    while cause is not None:
        schema_errors = getattr(cause, "schema_errors", None)
        if schema_errors:
            parts.extend(getattr(e, "message", str(e)) for e in schema_errors)
        else:
            parts.append(str(cause) or type(cause).__name__)
        cause = cause.__cause__
    return "; ".join(dict.fromkeys(parts))
