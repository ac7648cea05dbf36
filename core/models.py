"""The data that crosses layers: requests, results, progress, releases, timings.

The input and result of each activity live beside that activity (activities/), on the
`Model` base defined here. Everything here is plain data: safe to import inside the
workflow sandbox, serialised as JSON by the pydantic data converter, and readable in the
Temporal Web UI. No secret ever lives in these models: the Fly API token is resolved
inside activities only.

The naming conventions of the platform (app name, workflow id) are derived here and
nowhere else, so a project id travels from the edge to the activities without being
re-parsed.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

APP_NAME_PREFIX = "turbobackend-"
WORKFLOW_ID_PREFIX = "deploy-"
MAX_APP_NAME_LENGTH = 63  # longer names were accepted by Fly and then broke DNS
MAX_PROJECT_ID_LENGTH = MAX_APP_NAME_LENGTH - len(APP_NAME_PREFIX)

_PROJECT_ID_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BRANCH_RE = re.compile(r"^(?!/|.*(?:\.\.|//|@\{|\.lock$|/$|\.$))[A-Za-z0-9._/-]{1,200}$")
# [registry/]name[:tag][@sha256:digest] as Docker parses it: the first component is a
# registry only when it has a dot or a port (or is localhost); repositories are lower-case.
_IMAGE_RE = re.compile(
    r"^(?:(?:localhost|[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)+)(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@sha256:[a-f0-9]{64})?$"
)
_SSM_NAME_RE = re.compile(r"^/?[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*$")
_DEPLOYMENT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_SCP_GIT_RE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[A-Za-z0-9._/~-]+$")
_SAFE_URL_CHARS_RE = re.compile(r"^[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]+$")
_SHELL_META = set("`$;|&<>(){}\\\"' \t\n\r*?!")

# Fly.io regions (flyctl `platform regions`), so a typo fails before any side effect.
FLY_REGIONS = frozenset(
    {
        "ams", "arn", "atl", "bog", "bom", "bos", "cdg", "den", "dfw", "ewr", "eze", "fra",
        "gdl", "gig", "gru", "hkg", "iad", "jnb", "lax", "lhr", "mad", "mia", "nrt", "ord",
        "otp", "phx", "qro", "scl", "sea", "sin", "sjc", "syd", "waw", "yul", "yyz",
    }
)  # fmt: skip

MAX_ENV_VARS = 100
MAX_ENV_VALUE_BYTES = 4096
MAX_ENV_TOTAL_BYTES = 64 * 1024
# Names the platform sets itself; a request may not override them.
RESERVED_ENV_NAMES = frozenset({"PORT", "NODE_ENV", "FLY_APP_NAME", "FLY_REGION"})


def new_deployment_id() -> str:
    """A sortable, unique id: base36 milliseconds plus random bits, for callers that want
    to choose the id (and so make re-submits idempotent) before they submit.

    Never called inside workflow code (see `deployment_id_at`), nor while a payload is
    decoded: a request without an id gets it from the workflow that accepts it.
    """
    return deployment_id_at(int(time.time() * 1000), os.urandom(5).hex())


def deployment_id_at(millis: int, entropy: str) -> str:
    """The id of a deployment accepted at `millis` (epoch milliseconds), with `entropy`
    (lower-case hex) to tell apart two accepted in the same millisecond."""
    return f"d-{_base36(millis)}-{entropy}"


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


def _no_control_chars(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


def validate_project_id(value: str) -> str:
    if not value:
        raise ValueError("project id must not be empty")
    if len(value) > MAX_PROJECT_ID_LENGTH:
        raise ValueError(
            f"project id is {len(value)} characters; at most {MAX_PROJECT_ID_LENGTH} fit "
            f"in a Fly app name ({APP_NAME_PREFIX}<project id> must be at most "
            f"{MAX_APP_NAME_LENGTH} characters)"
        )
    if not _PROJECT_ID_RE.fullmatch(value):
        raise ValueError(
            f"project id {value!r} is not usable in a Fly app name: use lower-case letters, "
            "digits and '-', starting and ending with a letter or digit"
        )
    return value


def validate_repo_url(value: str) -> str:
    """Accept https/ssh/git/file URLs, scp-like `git@host:path`, and absolute local paths."""
    _no_control_chars(value)
    if not value or len(value) > 2048:
        raise ValueError("repository URL must be 1 to 2048 characters")
    if value.startswith("-"):
        raise ValueError("repository URL must not start with '-'")
    if any(c in _SHELL_META for c in value):
        raise ValueError("repository URL must not contain spaces, quotes or shell metacharacters")
    if value.startswith("/"):
        if ".." in value.split("/"):
            raise ValueError("repository path must not contain '..'")
        return value
    if _SCP_GIT_RE.fullmatch(value):
        return value
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise ValueError(
            "repository must be a URL (https://, ssh://, git://, file://), "
            "git@host:path, or an absolute path"
        )
    if scheme not in {"https", "http", "ssh", "git", "file"}:
        raise ValueError(f"unsupported repository URL scheme {scheme!r}")
    if not _SAFE_URL_CHARS_RE.fullmatch(rest):
        raise ValueError("repository URL contains characters that are not allowed in a URL")
    authority = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" in authority:
        _reject_user_info(scheme, authority.rpartition("@")[0])
    if scheme != "file" and not authority:
        raise ValueError("repository URL has no host")
    if scheme == "file" and not rest.startswith("/"):
        raise ValueError("file:// repository URL must hold an absolute path")
    return value


def _reject_user_info(scheme: str, user_info: str) -> None:
    """Credentials never travel in a URL: it is recorded in the workflow's history, the
    database and logs. An SSH user name alone (`ssh://git@host/...`) is not a secret."""
    if scheme == "ssh" and ":" not in user_info:
        return
    if scheme == "ssh":
        raise ValueError(
            "repository URL must not hold a password: SSH remotes authenticate with a deploy "
            "key the worker reads from SSM (TURBODEPLOY_GIT_SSH_KEY_PARAMETER)"
        )
    raise ValueError(
        "repository URL must not hold credentials (the part before '@'): the worker reads "
        "the git token from an SSM parameter named by TURBODEPLOY_GIT_TOKEN_PARAMETER (or "
        "per host, TURBODEPLOY_GIT_TOKEN_PARAMETERS); use the plain URL, "
        "https://github.com/owner/repo.git"
    )


def validate_image(value: str) -> str:
    _no_control_chars(value)
    if len(value) > 512 or not _IMAGE_RE.fullmatch(value):
        raise ValueError(
            f"image reference {value!r} is malformed; expected "
            "[registry/]repository[:tag][@sha256:digest], e.g. registry.fly.io/app:deployment-1"
        )
    return value


ProjectId = Annotated[str, AfterValidator(validate_project_id)]
RepoUrl = Annotated[str, AfterValidator(validate_repo_url)]
ImageRef = Annotated[str, AfterValidator(validate_image)]


def app_name_for(project_id: str) -> str:
    return f"{APP_NAME_PREFIX}{project_id}"


def workflow_id_for(project_id: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{project_id}"


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeployStatus(StrEnum):
    QUEUED = "queued"
    DEPLOYING = "deploying"
    DEPLOYED = "deployed"
    FAILED = "failed"
    STOPPED = "stopped"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"
    SUPERSEDED = "superseded"
    DESTROYED = "destroyed"

    @property
    def is_final(self) -> bool:
        return self not in (DeployStatus.DEPLOYING, DeployStatus.QUEUED)


class Strategy(StrEnum):
    """How a release replaces the running one (see activities/rollout.py)."""

    IMMEDIATE = "immediate"  # all machines at once, in parallel
    ROLLING = "rolling"  # one first, then `max_unavailable` at a time
    CANARY = "canary"  # one extra new machine verified first, then rolling
    BLUEGREEN = "bluegreen"  # new machines verified beside the old, then traffic moves
    FLYCTL = "flyctl"  # hand the whole deploy to `flyctl deploy --remote-only`


class DeployTimings(Model):
    """Every wait and poll of a deploy, with production defaults.

    They are inputs (not constants) so that tests run in milliseconds and an operator can
    give a slow-booting app more time without a code change.
    """

    # How long the app's public health endpoint may take to answer 200.
    health_deadline: timedelta = timedelta(minutes=5)
    health_poll_initial: timedelta = timedelta(seconds=1)
    health_poll_max: timedelta = timedelta(seconds=10)
    health_request_timeout: timedelta = timedelta(seconds=30)
    # How long a machine may take to reach `started` and pass its checks (flyctl: 5 min).
    machine_wait_timeout: timedelta = timedelta(minutes=5)
    machine_poll_interval: timedelta = timedelta(seconds=1)
    # Around the time a machine's checks passed in the app's last release, its checks are
    # read this often instead, so a deploy neither waits a whole interval too long nor
    # spends requests reading checks that cannot have passed yet.
    machine_poll_near_interval: timedelta = timedelta(milliseconds=200)
    # How long a newly created app may take to become visible (flyctl polls up to a minute).
    app_visible_timeout: timedelta = timedelta(minutes=1)
    app_visible_poll: timedelta = timedelta(milliseconds=500)
    # The lease a rollout holds on each machine lapses this long after its last refresh
    # (flyctl: 13 s, refreshed every 4 s), so a dead worker blocks its machines for
    # seconds. A retried attempt takes its leases over with their nonces instead.
    lease_ttl: timedelta = timedelta(seconds=13)
    # How long a lease held by someone else (an operator's `fly deploy`, a worker whose
    # lease nonces were lost) is waited for, within one attempt, before the attempt fails.
    lease_wait_timeout: timedelta = timedelta(minutes=1)
    # How soon a long step on a dead worker is noticed and retried on another one; also
    # bounds how long a cancellation takes to reach a running step (about 80% of it).
    heartbeat_timeout: timedelta = timedelta(seconds=10)

    @model_validator(mode="after")
    def _positive(self) -> DeployTimings:
        for name, value in self:
            if value <= timedelta(0):
                raise ValueError(f"{name} must be positive")
            if value > timedelta(hours=2):
                raise ValueError(f"{name} must be at most 2 hours")
        if self.health_poll_initial > self.health_poll_max:
            raise ValueError("health_poll_initial must not exceed health_poll_max")
        return self


DEPLOYMENT_ID_DESCRIPTION = (
    "The caller's idempotency key: a request sent again with the same id (a handler retried "
    "after a crash) makes no second deployment. Empty or absent: the workflow that accepts "
    "the request assigns one and returns it."
)


def _optional_deployment_id(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, str) and value and not _DEPLOYMENT_ID_RE.fullmatch(value):
        raise ValueError(
            "deployment id must be 1 to 63 lower-case letters, digits and '-', "
            "starting with a letter or digit"
        )
    return value


class IncomingRequest(Model):
    """What a workflow input, the `submit_request` update and the `submit` signal decode
    to: a `DeployRequest`, a `RollbackRequest`, or an `InvalidRequest` saying why the
    payload is neither.

    Decoding one never fails, so a bad request is answered (the update rejected, the run
    failed at once) instead of failing its workflow task on every attempt. It is a class,
    not an annotated union, because Temporal reads handler types without their annotations.
    """

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[BaseModel], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        if source.__name__ == "IncomingRequest" and source.__module__ == __name__:
            # (Called while the class is built, before its name is bound: hence the lambda.)
            return core_schema.no_info_plain_validator_function(lambda v: _decode_incoming(v))
        return handler(source)


class DeployRequest(IncomingRequest):
    """What the platform asks for: deploy `project_id` from `repo_url`@`branch`.

    Validated where it is built, and again by the workflow that receives it, before
    anything is started.
    """

    kind: Literal["deploy"] = "deploy"
    project_id: ProjectId
    repo_url: RepoUrl
    branch: str = "main"
    image: ImageRef | None = Field(
        default=None, description="Prebuilt image to roll out; built from the repository if absent"
    )
    region: str = "iad"
    env: dict[str, str] = Field(default_factory=dict)
    machine_count: int = Field(default=1, ge=1, le=20)
    strategy: Strategy = Strategy.ROLLING
    # Fraction (< 1) or count (>= 1) of machines updated at once after the first (rolling).
    max_unavailable: float = Field(default=0.33, gt=0, le=20)
    # App secrets by reference: env var name -> SSM parameter name. Values never travel here.
    secrets: dict[str, str] = Field(default_factory=dict)
    # Told the outcome with a signed JSON POST when the deploy ends.
    callback_url: str | None = None
    deployment_id: str = Field(default="", description=DEPLOYMENT_ID_DESCRIPTION)
    timings: DeployTimings = Field(default_factory=DeployTimings)

    @field_validator("branch")
    @classmethod
    def _branch(cls, v: str) -> str:
        _no_control_chars(v)
        if v.startswith("-") or not _BRANCH_RE.fullmatch(v):
            raise ValueError(f"branch {v!r} is not a valid git branch name")
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v: str) -> str:
        if v not in FLY_REGIONS:
            raise ValueError(
                f"unknown Fly region {v!r}; known regions: {', '.join(sorted(FLY_REGIONS))}"
            )
        return v

    @field_validator("deployment_id", mode="before")
    @classmethod
    def _deployment_id(cls, v: object) -> object:
        return _optional_deployment_id(v)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_ENV_VARS:
            raise ValueError(f"at most {MAX_ENV_VARS} environment variables are allowed")
        total = 0
        for name, value in v.items():
            if not _ENV_NAME_RE.fullmatch(name) or len(name) > 128:
                raise ValueError(f"environment variable name {name!r} is invalid")
            if name in RESERVED_ENV_NAMES or name.startswith("FLY_"):
                raise ValueError(f"environment variable {name} is set by the platform")
            if "\x00" in value:
                raise ValueError(f"environment variable {name} contains a NUL byte")
            size = len(value.encode())
            if size > MAX_ENV_VALUE_BYTES:
                raise ValueError(
                    f"environment variable {name} is {size} bytes; "
                    f"at most {MAX_ENV_VALUE_BYTES} are allowed"
                )
            total += size
        if total > MAX_ENV_TOTAL_BYTES:
            raise ValueError(f"environment is {total} bytes; at most {MAX_ENV_TOTAL_BYTES}")
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) > MAX_ENV_VARS:
            raise ValueError(f"at most {MAX_ENV_VARS} secrets are allowed")
        for name, parameter in v.items():
            if not _ENV_NAME_RE.fullmatch(name) or len(name) > 128:
                raise ValueError(f"secret name {name!r} is invalid")
            if name in RESERVED_ENV_NAMES or name.startswith("FLY_"):
                raise ValueError(f"secret {name} is set by the platform")
            if not _SSM_NAME_RE.fullmatch(parameter):
                raise ValueError(
                    f"secret {name}: {parameter!r} is not an SSM parameter name "
                    "(letters, digits and _.-/ ; at most 1011 characters)"
                )
        return v

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _no_control_chars(v)
        scheme, sep, rest = v.partition("://")
        if not sep or scheme not in {"http", "https"} or not rest.split("/", 1)[0]:
            raise ValueError("callback URL must be an http(s) URL with a host")
        if not _SAFE_URL_CHARS_RE.fullmatch(rest) or len(v) > 2048:
            raise ValueError("callback URL contains characters that are not allowed in a URL")
        return v

    @model_validator(mode="after")
    def _overlaps(self) -> DeployRequest:
        both = set(self.env) & set(self.secrets)
        if both:
            raise ValueError(f"{', '.join(sorted(both))} given both as env and as secret")
        return self

    @property
    def app_name(self) -> str:
        return app_name_for(self.project_id)

    @property
    def workflow_id(self) -> str:
        return workflow_id_for(self.project_id)


class RollbackRequest(IncomingRequest):
    """Put a project back on a recorded release: `to_deployment_id`, or the one before the
    release that runs now."""

    kind: Literal["rollback"] = "rollback"
    project_id: ProjectId
    to_deployment_id: str | None = None
    deployment_id: str = Field(default="", description=DEPLOYMENT_ID_DESCRIPTION)
    timings: DeployTimings = Field(default_factory=DeployTimings)

    @field_validator("to_deployment_id")
    @classmethod
    def _to(cls, v: str | None) -> str | None:
        if v is not None and not _DEPLOYMENT_ID_RE.fullmatch(v):
            raise ValueError("deployment id must be lower-case letters, digits and '-'")
        return v

    @field_validator("deployment_id", mode="before")
    @classmethod
    def _deployment_id(cls, v: object) -> object:
        return _optional_deployment_id(v)

    @property
    def app_name(self) -> str:
        return app_name_for(self.project_id)

    @property
    def workflow_id(self) -> str:
        return workflow_id_for(self.project_id)


class _AppRequest(IncomingRequest):
    """A request about the project's running app rather than a new release."""

    project_id: ProjectId
    deployment_id: str = Field(default="", description=DEPLOYMENT_ID_DESCRIPTION)
    timings: DeployTimings = Field(default_factory=DeployTimings)

    @field_validator("deployment_id", mode="before")
    @classmethod
    def _deployment_id(cls, v: object) -> object:
        return _optional_deployment_id(v)

    @property
    def app_name(self) -> str:
        return app_name_for(self.project_id)

    @property
    def workflow_id(self) -> str:
        return workflow_id_for(self.project_id)


class StopRequest(_AppRequest):
    """Stop every machine of the project's app: its release, IPs and volumes stay, and it
    costs storage only. The deployment ends `stopped`."""

    kind: Literal["stop"] = "stop"


class StartRequest(_AppRequest):
    """Start the machines of a stopped app again and verify `/api/health`; ends `deployed`."""

    kind: Literal["start"] = "start"


class DestroyRequest(_AppRequest):
    """Remove the project's app from Fly: machines, volumes, IP assignments, secrets and
    the app itself. The records stay; the deployment ends `destroyed`, and the next deploy
    of the project starts from scratch."""

    kind: Literal["destroy"] = "destroy"


# The requests about the running app, and the status each ends with when it succeeds.
AppRequest = StopRequest | StartRequest | DestroyRequest
REQUEST_KINDS = ("deploy", "rollback", "stop", "start", "destroy")


def success_status(request: object) -> DeployStatus:
    """The status a request of this kind ends with when it does what it asked."""
    if isinstance(request, StopRequest):
        return DeployStatus.STOPPED
    if isinstance(request, DestroyRequest):
        return DeployStatus.DESTROYED
    return DeployStatus.DEPLOYED


def _request_kind(value: Any) -> str:
    # A JSON caller may leave `kind` out: a request is a deploy unless it says otherwise.
    if isinstance(value, dict):
        return str(value.get("kind", "deploy"))
    return str(getattr(value, "kind", "deploy"))


# What a project's deploy workflow runs, one at a time: a deploy, a rollback, or a stop,
# start or destroy of its app.
ProjectRequest = Annotated[
    Annotated[DeployRequest, Tag("deploy")]
    | Annotated[RollbackRequest, Tag("rollback")]
    | Annotated[StopRequest, Tag("stop")]
    | Annotated[StartRequest, Tag("start")]
    | Annotated[DestroyRequest, Tag("destroy")],
    Discriminator(
        _request_kind,
        custom_error_type="invalid_kind",
        custom_error_message=(
            "kind must be 'deploy' (the default), 'rollback', 'stop', 'start' or 'destroy'"
        ),
    ),
]
PROJECT_REQUEST: TypeAdapter[
    DeployRequest | RollbackRequest | StopRequest | StartRequest | DestroyRequest
] = TypeAdapter(ProjectRequest)


class InvalidRequest(IncomingRequest):
    """A payload that is no valid request, as the workflow received it: the reason only."""

    kind: Literal["invalid"] = "invalid"
    error: str


def describe_validation_error(err: ValidationError) -> str:
    """Every problem of a request on one line: `field: message; field: message`."""
    problems = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if p not in REQUEST_KINDS)
        message = str(e["msg"]).removeprefix("Value error, ")
        problems.append(f"{loc}: {message}" if loc else message)
    return "; ".join(problems)


def _decode_incoming(value: Any) -> IncomingRequest:
    if isinstance(value, IncomingRequest):
        return value
    try:
        return PROJECT_REQUEST.validate_python(value)
    except ValidationError as err:
        return InvalidRequest(error=describe_validation_error(err))


class Accepted(Model):
    """The answer to `submit_request`: the request is this project's deployment
    `deployment_id`, running or queued in run `run_id` of workflow `workflow_id`."""

    deployment_id: str
    project_id: str
    workflow_id: str
    run_id: str
    status: DeployStatus  # deploying, queued, or the final status of one already ended


class DeployStep(StrEnum):
    """The steps of a deploy, in order: the one list that the progress query, the Web UI's
    details, the README's diagram and the activity modules' docstrings name.

    Each step is one activity (`rollout` is also where the machines are snapshotted first;
    a rollback request restores a release in `fly_config`, `secrets` and `rollout`).
    `secrets` and `build` run only when the request needs them, `rollback` only after a
    failure; `done` is no step, the end.
    """

    RECORD_START = "record_start"
    CREDENTIALS = "credentials"
    FLY_CONFIG = "fly_config"
    APP = "app"
    SECRETS = "secrets"
    BUILD = "build"
    ROLLOUT = "rollout"
    HEALTH = "health"
    ROLLBACK = "rollback"
    RECORD_RESULT = "record_result"
    # The steps of a stop, start or destroy of the app (with record_start, credentials,
    # secrets, app, health and record_result above).
    MACHINES = "machines"
    VOLUMES = "volumes"
    IPS = "ips"
    DONE = "done"


class DeployProgress(Model):
    deployment_id: str
    project_id: str
    step: DeployStep
    step_index: int
    step_count: int
    detail: str = ""
    status: DeployStatus = DeployStatus.DEPLOYING
    completed_steps: list[DeployStep] = Field(default_factory=list)
    error: str | None = None
    queued: list[str] = Field(default_factory=list)  # deployment ids waiting behind this one
    # How long each completed step took, in seconds, and when the current one began.
    step_seconds: dict[DeployStep, float] = Field(default_factory=dict)
    step_started_at: datetime | None = None


class DeployResult(Model):
    deployment_id: str
    project_id: str
    app_name: str
    url: str
    status: DeployStatus
    commit_sha: str | None = None
    image: str | None = Field(
        default=None,
        description=(
            "The image the deployment tried: the request's, the one built, or the release's "
            "that a rollback request restores"
        ),
    )
    serving_image: str | None = Field(
        default=None,
        description=(
            "The image serving when the deployment ended: `image` when it deployed, the "
            "previous release's when it was rolled back or failed before the rollout; null "
            "when nothing serves (a failed first deploy), or for a deployment that never ran"
        ),
    )
    machine_ids: list[str] = Field(default_factory=list)
    error: str | None = None
    detail: str | None = Field(
        default=None,
        description="What a stop, start or destroy did, in one line (not recorded)",
    )


class CheckWindow(Model):
    """When a machine's health checks first passed, in seconds after it was seen started.

    They passed after `failing_until` (the last read that saw a check not passing; 0 when
    the first read already passed) and by `passing_at` (the read that saw them pass).
    """

    failing_until: float = Field(ge=0)
    passing_at: float = Field(ge=0)

    @staticmethod
    def typical(machines: Iterable[MachineOutcome]) -> CheckWindow | None:
        """The median machine's window (by `passing_at`): what the next deploy expects."""
        windows = sorted(
            (m.checks_passed for m in machines if m.checks_passed is not None),
            key=lambda w: w.passing_at,
        )
        return windows[(len(windows) - 1) // 2] if windows else None


class MachineOutcome(Model):
    machine_id: str
    action: str  # "created" | "updated" | "unchanged"
    instance_id: str | None = None
    region: str | None = None
    previous_instance_id: str | None = None
    previous_version: str | None = None
    # None when the rollout did not wait for this machine's checks (none defined, the
    # machine was left stopped, or the strategy does not wait).
    checks_passed: CheckWindow | None = None


class MachineSnapshot(Model):
    """One machine of a release as it ran: enough to put it back exactly."""

    machine_id: str
    region: str
    state: str
    instance_id: str | None = None
    config: dict[str, Any]
    # The machine's version when it was read: an update guarded by it (`current_version`)
    # is refused when the machine changed since.
    version: str | None = None


class ReleaseSnapshot(Model):
    """The app's `app` process group machines before a rollout touches them."""

    app_name: str
    machines: list[MachineSnapshot] = Field(default_factory=list)
    # The listing answered 404: the app itself does not exist (any more).
    app_missing: bool = False
    # Canaries of interrupted deploys the listing showed (never part of a release).
    canaries: list[str] = Field(default_factory=list)

    @property
    def image(self) -> str | None:
        images = {m.config.get("image") for m in self.machines}
        return images.pop() if len(images) == 1 else None


class SecretVersion(Model):
    name: str
    parameter: str
    version: int


class ReleaseRecord(Model):
    """A release bundle: everything needed to put this release back later."""

    deployment_id: str
    project_id: str
    app_name: str
    status: DeployStatus
    strategy: Strategy
    image: str  # the image this release tried
    # What served when it ended: `image` when deployed, the previous one after a rollback.
    serving_image: str | None = None
    image_digest: str | None = None
    commit_sha: str | None = None
    fly_toml: str
    env: dict[str, str] = Field(default_factory=dict)
    secrets: list[SecretVersion] = Field(default_factory=list)
    machines: list[MachineOutcome] = Field(default_factory=list)
    snapshot: ReleaseSnapshot | None = None  # the machines as this release left them
    created_at: int | None = None


class DeploymentNotice(Model):
    """The JSON body POSTed to a request's callback URL when a deploy ends."""

    deployment_id: str
    project_id: str
    app_name: str
    status: DeployStatus
    url: str | None = None
    error: str | None = None
    commit_sha: str | None = None
    image: str | None = None


class DeploymentRow(Model):
    """One row of `project_deployments`, as read back by the CLI."""

    deployment_id: str
    project_id: str
    platform: str
    app_name: str
    url: str
    status: DeployStatus
    deployed_at: int
    last_updated: int
    workflow_id: str | None = None
    run_id: str | None = None
    repo_url: str | None = None
    branch: str | None = None
    commit_sha: str | None = None
    image: str | None = None  # what the deployment tried
    serving_image: str | None = None  # what served when it ended (see DeployResult)
    machine_ids: list[str] = Field(default_factory=list)
    error: str | None = None
    finished_at: int | None = None

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def outcome(self) -> DeployResult:
        """What the recorded deployment ended as, as its workflow reports it."""
        return DeployResult.model_validate(self.model_dump(include=set(DeployResult.model_fields)))
