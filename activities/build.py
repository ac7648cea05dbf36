"""The `build` step, the image built with `flyctl`, and the `flyctl` strategy of `rollout`.

Both run `flyctl deploy --remote-only` in a checkout of exactly the commit the deploy
prepared, so what is built is what was reviewed, whatever the branch does meanwhile:

    build_image    flyctl deploy --build-only --push --remote-only --image-label=<deployment>
                   --app=<app> --config=fly.toml
                   -> registry.fly.io/<app>:<deployment>, then our own rollout
    flyctl_deploy  flyctl deploy --remote-only --app=<app> --config=fly.toml [--image=<ref>]
                   --image-label=<deployment> --wait-timeout=<s>s --yes
                   -> flyctl builds (unless given an image) and rolls out itself

flyctl runs directly (never through a shell) in its own process group, with a trimmed
environment. Its token is a deploy token of the one app it works on, minted by the
worker's Fly client (`activities._deploy_tokens`): the org token never reaches a child.
That token travels only as FLY_API_TOKEN in the child's environment, never in argv;
FLY_FLAPS_BASE_URL (flyctl's own variable for the Machines API, the root
URL without `/v1`) points it at the configured Fly API. flyctl's own settings (FLY_*,
FLYCTL_*) pass through; AWS credentials, database URLs and the like do not.

Its output streams into the activity's heartbeats (the last lines) and a short excerpt of
its tail goes into the result or the failure; anything that looks like a token is
redacted from both. Cancellation (a cancelled deploy, a heartbeat timeout, a worker
shutdown) interrupts flyctl with SIGINT so it can release its machine leases, then kills
its whole process group after a grace period.

Exit codes: 0 success; 127 or a signal -> retryable `FlyctlInterrupted`; any other ->
`FlyctlFailed`, retryable only when the error reads like a network or capacity hiccup.
A flyctl that is not installed is a non-retryable `FlyctlMissing`.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import re
import shutil
import signal
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._deploy_tokens import AppTokens, child_run_seconds
from activities._errors import (
    FLYCTL_FAILED,
    FLYCTL_INTERRUPTED,
    FLYCTL_MISSING,
    INVALID_BUILD_INPUT,
)
from activities._git_credentials import GitCredentials
from activities._heartbeat import PeriodicHeartbeat
from activities.secrets import CredentialStore
from core import gitrepo
from core.models import DeployTimings, Model, validate_image
from core.processes import StopPolicy, start_in_group, stop_group
from core.settings import Settings
from flyapi import FlyClient, FlyError, FlyUnauthorized

FLY_CONFIG: Final = "fly.toml"
REGISTRY: Final = "registry.fly.io"
DEFAULT_FLYCTL: Final = "flyctl"
DEFAULT_KILL_GRACE_SECONDS: Final = 10.0
EXCERPT_CHARS: Final = 2000
HEARTBEAT_LINES: Final = 15

_EXIT_INTERRUPTED: Final = 127
_TAIL_LINES: Final = 200
_MAX_LINE_CHARS: Final = 4000
_DRAIN_SECONDS: Final = 2.0
_INSTALL_HINT: Final = (
    "install it with `curl -L https://fly.io/install.sh | sh` (the worker image does), "
    "or point TURBODEPLOY_FLYCTL_PATH at it"
)

# The worker's variables a child may see; everything else (AWS keys, DATABASE_URL, ...)
# stays in the worker.
_PASSTHROUGH: Final = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "TMPDIR", "TZ", "LANG", "LC_ALL", "LC_CTYPE",
        "SSL_CERT_FILE", "SSL_CERT_DIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME",
        "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
        "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    }
)  # fmt: skip
_PASSTHROUGH_PREFIXES: Final = ("FLY_", "FLYCTL_")
# Set by us, or would override what we set: flyctl prefers FLY_ACCESS_TOKEN to
# FLY_API_TOKEN, and FLY_APP to fly.toml's app.
_NOT_INHERITED: Final = frozenset(
    {"FLY_API_TOKEN", "FLY_ACCESS_TOKEN", "FLY_FLAPS_BASE_URL", "FLY_APP"}
)

_APP_NAME_RE: Final = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_ANSI_RE: Final = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_IMAGE_LINE_RE: Final = re.compile(r"^\s*image:\s*(\S+)\s*$", re.I)
_PUSHED_RE: Final = re.compile(r"push(?:ing)?\s+image\s+done|\bpushed\b|push\s+complete", re.I)
_MACHINE_ID_RE: Final = re.compile(r"\bMachine\s+([0-9a-f]{14})\b")
# Token shapes: Fly macaroons ("FlyV1 fm2_..."), personal tokens (fo1_...), bearer headers
# and key=value dumps of anything called a token, secret or password.
_TOKEN_PATTERNS: Final = (
    re.compile(r"FlyV1\s+\S+"),
    re.compile(r"\bf[a-z][0-9][a-z]?_[A-Za-z0-9_+/=.-]{8,}"),
    re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9_+/=.,:-]{8,}"),
    re.compile(r"(?i)\b(\w*(?:token|secret|password|authorization)\w*)(\s*[:=]\s*)\S+"),
)
_REDACTED: Final = "[REDACTED]"

# Failures no retry can fix, checked first: a failing health check also "times out".
_PERMANENT_RE: Final = re.compile(
    r"health check|must be authenticated|not authorized|unauthori[sz]ed|forbidden|"
    r"could not find app|does not have a Dockerfile|no such file|failed loading app config|"
    r"error building|exit code|invalid|unknown flag|unprocessable|\b40[013]\b|\b422\b",
    re.I,
)
_TRANSIENT_RE: Final = re.compile(
    r"connection (reset|refused)|broken pipe|i/o timeout|timed? ?out|timeout|deadline exceeded|"
    r"tls handshake|unexpected eof|\beof\b|no such host|temporary failure in name resolution|"
    r"network is unreachable|bad gateway|service unavailable|gateway time|too many requests|"
    r"rate.?limit|\b(429|500|502|503|504)\b|lease (is )?(currently )?held|failed to obtain lease|"
    r"builder .*(unavailable|not ready|failed to start)|no capacity|try again",
    re.I,
)


class BuildInput(Model):
    deployment_id: str
    app_name: str
    repo_url: str
    commit_sha: str


class BuildResult(Model):
    image: str
    output_excerpt: str = ""


class FlyctlDeployInput(Model):
    deployment_id: str
    app_name: str
    repo_url: str
    commit_sha: str
    image: str | None = None
    machine_count: int = 1
    timings: DeployTimings = Field(default_factory=DeployTimings)


class FlyctlDeployResult(Model):
    image: str | None = None
    machine_ids: list[str] = Field(default_factory=list)
    output_excerpt: str = ""


class FlyctlProgress(BaseModel):
    """Heartbeat details: what flyctl is doing, readable in the Web UI."""

    step: str
    output: list[str] = Field(default_factory=list)


class BuildActivities:
    def __init__(
        self,
        credentials: CredentialStore,
        settings: Settings,
        *,
        flyctl: str | None = None,
        fly: FlyClient | None = None,
        kill_grace_seconds: float = DEFAULT_KILL_GRACE_SECONDS,
        git: GitCredentials | None = None,
        tokens: AppTokens | None = None,
    ) -> None:
        """`flyctl`: the executable (a name looked up on PATH, or a path); defaults to the
        `flyctl_path` setting. `fly`: when given, `flyctl_deploy` reports the machines from
        the Machines API rather than from flyctl's output, and deploy tokens are minted
        through it. `git`: credentials for private remotes (from the settings when not
        given). `tokens`: the worker's deploy tokens (one cache per worker process)."""
        self._credentials = credentials
        self._settings = settings
        self._git = git if git is not None else GitCredentials(settings)
        self._tokens = tokens if tokens is not None else AppTokens(credentials, settings, fly=fly)
        self._flyctl: str = flyctl or getattr(settings, "flyctl_path", None) or DEFAULT_FLYCTL
        self._fly = fly
        # Interrupted like Ctrl-C, flyctl releases its leases; then its whole group goes.
        self._stop = StopPolicy(signal.SIGINT, grace=kill_grace_seconds)

    @activity.defn(name="build_image")
    async def build_image(self, input: BuildInput) -> BuildResult:
        """Build and push the image of `input.commit_sha`; returns its reference.

        Safe to repeat: a retry builds the same commit under the same label.
        """
        _check_app(input.app_name)
        label = _check_label(input.deployment_id)
        args = [
            "deploy", "--build-only", "--push", "--remote-only", f"--image-label={label}",
            f"--app={input.app_name}", f"--config={FLY_CONFIG}",
        ]  # fmt: skip
        what = f"Build of Fly app {input.app_name} at {input.commit_sha[:12]}"
        run = await self._run_at_commit(
            input.app_name, input.repo_url, input.commit_sha, args, what=what
        )
        image = run.pushed_image(input.app_name, label)
        if image is None:
            raise FLYCTL_FAILED(
                f"{what}: flyctl succeeded but reported no pushed image.\n{run.excerpt()}",
                non_retryable=True,
            )
        activity.logger.info("%s pushed %s", what, image)
        return BuildResult(image=image, output_excerpt=run.excerpt())

    @activity.defn(name="flyctl_deploy")
    async def flyctl_deploy(self, input: FlyctlDeployInput) -> FlyctlDeployResult:
        """Hand the whole deploy of `input.commit_sha` to flyctl (build unless an image is
        given, then its rolling strategy). Safe to repeat: a retry deploys the same commit
        (or image) again, and machines already updated are updated to the same config."""
        _check_app(input.app_name)
        label = _check_label(input.deployment_id)
        args = ["deploy", "--remote-only", f"--app={input.app_name}", f"--config={FLY_CONFIG}"]
        if input.image:
            args.append(f"--image={_check_image(input.image)}")
        wait = max(1, round(input.timings.machine_wait_timeout.total_seconds()))
        args += [f"--image-label={label}", f"--wait-timeout={wait}s", "--yes"]
        if input.machine_count == 1:
            # flyctl's first deploy of a service makes a spare machine unless told not to.
            args.append("--ha=false")
        what = f"flyctl deploy of Fly app {input.app_name} at {input.commit_sha[:12]}"
        run = await self._run_at_commit(
            input.app_name, input.repo_url, input.commit_sha, args, what=what
        )
        excerpt = run.excerpt()
        listed = await self._app_machines(input.app_name)
        if listed and len(listed) != input.machine_count:
            # flyctl deploy keeps an app's machine count; the request's count is set apart.
            scale = ["scale", "count", str(input.machine_count), f"--app={input.app_name}"]
            scale += [f"--wait-timeout={wait}s", "--yes"]
            what_scale = f"flyctl scale count {input.machine_count} of {input.app_name}"
            scaled = await self._run_anywhere(input.app_name, scale, what=what_scale)
            excerpt = f"{excerpt}\n{scaled.excerpt()}".strip()
            listed = await self._app_machines(input.app_name)
        machine_ids = listed or run.machine_ids
        activity.logger.info("%s finished: machines %s", what, ", ".join(machine_ids) or "-")
        return FlyctlDeployResult(
            image=input.image or run.pushed_image(input.app_name, label),
            machine_ids=machine_ids,
            output_excerpt=excerpt,
        )

    # ---------------------------------------------------------------------------- running

    async def _run_at_commit(
        self, app: str, repo_url: str, sha: str, args: Sequence[str], *, what: str
    ) -> _Output:
        async def in_checkout(output: _Output) -> int:
            output.step = "fetching the commit"
            activity.heartbeat(output.progress())
            auth = await self._git.auth_for(repo_url)
            try:
                async with gitrepo.cloned_commit(
                    repo_url, sha, work_dir=self._settings.work_dir or None, auth=auth
                ) as checkout:
                    return await self._flyctl_with_token(app, args, checkout.path, output)
            except gitrepo.GitError as exc:
                raise self._git.failure(exc, repo_url, what=what) from None

        return await self._run(app, in_checkout, what=what)

    async def _run_anywhere(self, app: str, args: Sequence[str], *, what: str) -> _Output:
        """flyctl for a command that reads no checkout (`scale count`)."""
        # The system's temporary folder: it exists, and flyctl reads nothing from it.
        cwd = Path(tempfile.gettempdir())
        return await self._run(
            app, lambda output: self._flyctl_with_token(app, args, cwd, output), what=what
        )

    async def _flyctl_with_token(
        self, app: str, args: Sequence[str], cwd: Path, output: _Output
    ) -> int:
        output.step = "getting a deploy token"
        activity.heartbeat(output.progress())
        # The app's own deploy token, valid for as long as this attempt may run.
        token = await self._tokens.token_for(app, valid_for=child_run_seconds())
        output.secrets = _secret_forms(token)
        output.step = "running flyctl"
        activity.heartbeat(output.progress())
        return await self._flyctl_run(args, cwd, token, output)

    async def _run(
        self, app: str, body: Callable[[_Output], Awaitable[int]], *, what: str
    ) -> _Output:
        """Run `body` (which runs flyctl) with heartbeats of its output; a non-zero exit
        becomes a clear error."""
        output = _Output()
        async with PeriodicHeartbeat(output.progress):
            code = await body(output)
        if code != 0:
            error = _failure(what, code, output)
            if _AUTH_RE.search(output.error_text()):
                # The next attempt (or deploy) gets a new deploy token, minted with the
                # token read again from SSM (perhaps rotated).
                self._tokens.invalidate(app)
                self._credentials.invalidate()
            activity.logger.warning("%s", error.message)
            raise error
        return output

    async def _flyctl_run(self, args: Sequence[str], cwd: Path, token: str, output: _Output) -> int:
        env = self._child_env(token)
        executable = shutil.which(self._flyctl, path=env.get("PATH"))
        if executable is None:
            raise FLYCTL_MISSING(
                f"flyctl is not installed on this worker ({self._flyctl!r} was not found): "
                f"{_INSTALL_HINT}"
            )
        try:
            proc = await start_in_group(
                [executable, *args],
                stop=self._stop,
                cwd=cwd,
                env=env,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise FLYCTL_MISSING(
                f"flyctl at {executable} cannot be started ({exc.strerror}): {_INSTALL_HINT}"
            ) from None
        activity.logger.info("started flyctl %s (pid %d)", " ".join(args), proc.pid)
        assert proc.stdout is not None
        reader = asyncio.create_task(output.consume(proc.stdout))
        try:
            code = await proc.wait()
            # A daemon that inherited the pipe must not keep the activity waiting.
            done, _ = await asyncio.wait({reader}, timeout=_DRAIN_SECONDS)
            if not done:
                reader.cancel()
        except BaseException:
            await stop_group(proc, self._stop)
            raise
        finally:
            if not reader.done():
                reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            output.finish()
        return code

    def _child_env(self, token: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if (k in _PASSTHROUGH or k.startswith(_PASSTHROUGH_PREFIXES))
            and k not in _NOT_INHERITED
        }
        env.setdefault("PATH", os.defpath)
        env["FLY_API_TOKEN"] = token
        env["FLY_FLAPS_BASE_URL"] = flaps_base_url(self._settings.fly_api_base_url)
        env["FLY_NO_UPDATE_CHECK"] = "1"
        return env

    async def _app_machines(self, app: str) -> list[str]:
        """The app's machines as the Machines API lists them; empty when unknown.

        The deploy has succeeded by now: a failed listing must not make it run again, so
        flyctl's own report of the machines stands in.
        """
        if self._fly is None:
            return []
        try:
            machines = await self._fly.list_machines(app)
        except FlyError as exc:
            if isinstance(exc, FlyUnauthorized):
                self._credentials.invalidate()
            activity.logger.warning("could not list the machines of Fly app %s: %s", app, exc)
            return []
        ours = [
            m
            for m in machines
            if not m.gone
            and m.metadata.get("fly_platform_version") == "v2"
            and m.metadata.get("fly_process_group", "app") == "app"
        ]
        return [m.id for m in sorted(ours, key=lambda m: (m.created_at or "", m.id))]


def flaps_base_url(api_base_url: str) -> str:
    """FLY_FLAPS_BASE_URL for a Machines API base URL: flyctl appends `/v1/...` itself."""
    base = api_base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


# ---------------------------------------------------------------------------- output


@dataclass
class _Output:
    """flyctl's output as it arrives: the tail, and what a deploy needs from it."""

    step: str = "starting"
    secrets: tuple[str, ...] = ()
    image: str | None = None
    pushed: bool = False
    machine_ids: list[str] = field(default_factory=list)
    _tail: deque[str] = field(default_factory=lambda: deque(maxlen=_TAIL_LINES))
    _partial: str = ""
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )

    async def consume(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(4096):
            self._feed(self._decoder.decode(chunk))

    def finish(self) -> None:
        self._feed(self._decoder.decode(b"", final=True))
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _feed(self, text: str) -> None:
        # Progress bars redraw with \r: each redraw is a line of its own.
        parts = re.split(r"\r\n|\r|\n", self._partial + text)
        self._partial = parts.pop()[-_MAX_LINE_CHARS:]
        for part in parts:
            self._line(part)

    def _line(self, raw: str) -> None:
        line = self.redact(_ANSI_RE.sub("", raw).rstrip())[:_MAX_LINE_CHARS]
        if not line.strip():
            return
        self._tail.append(line)
        match = _IMAGE_LINE_RE.match(line)
        if match:
            with contextlib.suppress(ValueError):
                self.image = validate_image(match[1])
        if _PUSHED_RE.search(line):
            self.pushed = True
        for machine_id in _MACHINE_ID_RE.findall(line):
            if machine_id not in self.machine_ids:
                self.machine_ids.append(machine_id)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, _REDACTED)
        for pattern in _TOKEN_PATTERNS:
            text = pattern.sub(_redacted_match, text)
        return text

    def pushed_image(self, app: str, label: str) -> str | None:
        """The image flyctl reported; when it said it pushed without naming it, the name
        flyctl gives a labelled image."""
        if self.image is None and self.pushed:
            return f"{REGISTRY}/{app}:{label}"
        return self.image

    def lines(self, count: int) -> list[str]:
        return list(self._tail)[-count:]

    def excerpt(self, limit: int = EXCERPT_CHARS) -> str:
        text = "\n".join(self._tail)
        return text if len(text) <= limit else "…" + text[-(limit - 1) :]

    def error_text(self) -> str:
        """The lines that explain a failure: flyctl's `Error:` lines, else the tail."""
        errors = [line for line in self._tail if line.lstrip().lower().startswith("error")]
        return "\n".join(errors[-5:] or self.lines(20))

    def progress(self) -> FlyctlProgress:
        return FlyctlProgress(step=self.step, output=self.lines(HEARTBEAT_LINES))


def _redacted_match(match: re.Match[str]) -> str:
    if match.re.groups >= 2:  # key: value — keep the key
        return f"{match[1]}{match[2]}{_REDACTED}"
    if match.re.groups == 1:  # Bearer xxx — keep the scheme
        return f"{match[1]} {_REDACTED}"
    return _REDACTED


def _secret_forms(token: str) -> tuple[str, ...]:
    """The token and the pieces of it a program might print on their own (a macaroon
    token is `FlyV1 <macaroon>,<macaroon>`), longest first."""
    pieces = {token}
    body = token.removeprefix("FlyV1 ").strip()
    pieces.add(body)
    pieces.update(p for p in body.split(",") if len(p) >= 16)
    return tuple(sorted((p for p in pieces if p), key=len, reverse=True))


# --------------------------------------------------------------------------- failures

_AUTH_RE: Final = re.compile(
    r"must be authenticated|not authorized|unauthori[sz]ed|no access token|\b401\b", re.I
)


def _failure(what: str, code: int, output: _Output) -> ApplicationError:
    excerpt = output.excerpt()
    if code == _EXIT_INTERRUPTED or code < 0:
        how = f"killed by signal {_signal_name(-code)}" if code < 0 else "exit code 127"
        return FLYCTL_INTERRUPTED(f"{what} was interrupted ({how}).\n{excerpt}")
    reason = output.error_text()
    transient = not _PERMANENT_RE.search(reason) and bool(_TRANSIENT_RE.search(reason))
    return FLYCTL_FAILED(
        f"{what} failed (flyctl exit code {code}"
        f"{', a transient error: retried' if transient else ''}).\n{excerpt}",
        non_retryable=not transient,
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# -------------------------------------------------------------------------- validation


def _check_app(app: str) -> None:
    if not _APP_NAME_RE.fullmatch(app):
        raise INVALID_BUILD_INPUT(f"{app!r} is not a Fly app name")


def _check_label(label: str) -> str:
    if not _LABEL_RE.fullmatch(label):
        raise INVALID_BUILD_INPUT(f"{label!r} cannot be an image label (a Docker tag)")
    return label


def _check_image(image: str) -> str:
    try:
        return validate_image(image)
    except ValueError as exc:
        raise INVALID_BUILD_INPUT(str(exc)) from None


__all__ = [
    "FLYCTL_FAILED",
    "FLYCTL_INTERRUPTED",
    "FLYCTL_MISSING",
    "BuildActivities",
    "FlyctlProgress",
    "flaps_base_url",
]
