"""Worker and client configuration, read from the environment (prefix `TURBODEPLOY_`).

Loaded by the worker and the CLI only; workflow code never sees it.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

TASK_QUEUE = "turbodeploy"

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_SCP_REMOTE_RE = re.compile(r"^(?:[A-Za-z0-9._-]+@)?(?P<host>[A-Za-z0-9.-]+):(?!//)")

GitCredentialKind = Literal["token", "ssh_key"]


def git_remote(repo_url: str) -> tuple[GitCredentialKind, str] | None:
    """Which kind of credential a remote takes and its host (lower case): a token for
    http(s) URLs, an SSH key for ssh:// and `git@host:path`; None for local paths,
    file:// and git://."""
    if repo_url.startswith("/"):
        return None
    if "://" not in repo_url:
        match = _SCP_REMOTE_RE.match(repo_url)
        return ("ssh_key", match["host"].lower()) if match else None
    parts = urlsplit(repo_url)
    host = (parts.hostname or "").lower()
    if not host:
        return None
    if parts.scheme in {"http", "https"}:
        return "token", host
    if parts.scheme == "ssh":
        return "ssh_key", host
    return None


def validate_schema_name(value: str) -> str:
    """A PostgreSQL schema name is an identifier: accept a strict subset, never raw input."""
    if not _SCHEMA_RE.fullmatch(value):
        raise ValueError(
            f"schema name {value!r} is invalid: use lower-case letters, digits and '_', "
            "starting with a letter or '_', at most 63 characters"
        )
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TURBODEPLOY_", extra="ignore", populate_by_name=True
    )

    # Temporal. The connection is read as the `temporal` CLI reads it (core/temporal.py):
    # a temporal.toml profile, then TEMPORAL_ADDRESS, TEMPORAL_NAMESPACE, TEMPORAL_API_KEY,
    # TEMPORAL_TLS*, then these two when set.
    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_profile: str | None = None  # a profile of temporal.toml (or TEMPORAL_PROFILE)
    task_queue: str = TASK_QUEUE
    temporal_ui_url: str = "http://localhost:8233"

    # PostgreSQL
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("TURBODEPLOY_DATABASE_URL", "DATABASE_URL")
    )
    db_schema: str = Field(
        default="turbobackend",
        validation_alias=AliasChoices("TURBODEPLOY_DB_SCHEMA", "PG_DB_SCHEMA"),
    )
    db_pool_min: int = 1
    db_pool_max: int = 10

    # AWS SSM Parameter Store
    aws_region: str = Field(
        default="us-east-1",
        validation_alias=AliasChoices("TURBODEPLOY_AWS_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    )
    aws_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TURBODEPLOY_AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
    )
    fly_token_parameter: str = "/turbobackend/flyio/api_token"  # noqa: S105 - a parameter name
    fly_org_parameter: str = "/turbobackend/flyio/org_slug"
    fly_default_org: str = "personal"
    # The token is cached briefly so a burst of activities does not hammer SSM, and a
    # rotated token is picked up within this many seconds.
    token_cache_seconds: float = 60.0

    # Fly.io
    fly_api_base_url: str = "https://api.machines.dev/v1"
    # `{app}` is replaced by the Fly app name; the emulator serves apps under a path.
    app_url_template: str = "https://{app}.fly.dev"
    fly_api_timeout_seconds: float = 30.0
    # One budget of Fly API requests per second shared by every deploy this worker runs.
    # Fly documents about 1 req/s (bursts of 3) per action per app/machine; the default
    # leaves room for several apps at once. 0 disables the limit.
    fly_api_rate: float = 10.0
    fly_api_burst: int = 10
    # Attempts per idempotent Fly API request on a transient error, before the step's own
    # retry policy takes over.
    fly_api_request_attempts: int = 5
    # Connections for the Fly API calls other than server-side waits (those get one per
    # concurrent activity). Measured with 200 deploys at once (BENCHMARKS.md).
    fly_api_max_connections: int = Field(default=20, ge=1)

    # flyctl, for builds and the `flyctl` strategy: a name looked up on PATH, or a path.
    flyctl_path: str = "flyctl"
    # flyctl children get a deploy token of their app, never the org token: minted through
    # the Machines API for this long (or longer, for a child that may run longer), and
    # reused while it outlives the next child's longest run by the margin.
    fly_deploy_token_seconds: float = Field(default=7200.0, ge=60)
    fly_deploy_token_margin_seconds: float = Field(default=300.0, ge=0)

    # Callbacks to the platform are signed with this key (HMAC-SHA256), read from SSM.
    callback_secret_parameter: str = "/turbobackend/callbacks/hmac_key"  # noqa: S105 - a name

    # Git
    git_author_name: str = "turbodeploy"
    git_author_email: str = "turbodeploy@users.noreply.local"
    work_dir: str = Field(default="", description="Scratch space for checkouts; temp dir if empty")
    # Credentials for private remotes, by reference like every secret here: names of SSM
    # parameters (SecureString) read inside the worker and handed to git through its
    # environment only. HTTPS remotes take a token (a GitHub token: sent as HTTP basic auth
    # with `git_token_username`); SSH remotes a private deploy key. The per-host maps, as
    # JSON ({"github.com": "/turbobackend/github/token"}), win over the platform-wide one.
    git_token_parameter: str | None = None
    git_token_parameters: dict[str, str] = Field(default_factory=dict)
    git_token_username: str = "x-access-token"  # noqa: S105 - GitHub's user name for tokens
    git_ssh_key_parameter: str | None = None
    git_ssh_key_parameters: dict[str, str] = Field(default_factory=dict)
    # known_hosts for SSH remotes (the worker user's own when unset), and the ssh to run.
    git_ssh_known_hosts_file: str | None = None
    git_ssh_command: str = "ssh"

    # Worker
    max_concurrent_activities: int = 200
    max_concurrent_workflow_tasks: int = 100
    # Workflows kept in memory between tasks; an evicted one is replayed from its history
    # on its next task, trading CPU for memory. Measured with 1,000 deploys in flight
    # (BENCHMARKS.md): 1000 cached -> 441 MB peak RSS, 250 -> 278 MB but 1.5x the CPU.
    max_cached_workflows: int = 500
    graceful_shutdown_seconds: float = 30.0
    # The SDK sends an activity's heartbeats at most every min(0.8 x its heartbeat timeout,
    # this): with the 10 s timeouts, one every 8 s, 2 s before the server would time the
    # attempt out. Lower it where heartbeats take long to reach the server, at the cost
    # of more heartbeat calls. 60 s is the SDK's own default.
    max_heartbeat_throttle_seconds: float = Field(default=60.0, gt=0)
    # Prometheus metrics (Temporal SDK and deploy metrics), e.g. "0.0.0.0:9464"; off if unset.
    metrics_bind_address: str | None = None
    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("db_schema")
    @classmethod
    def _schema(cls, v: str) -> str:
        return validate_schema_name(v)

    @field_validator("app_url_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{app}" not in v:
            raise ValueError("app_url_template must contain '{app}'")
        return v.rstrip("/")

    @field_validator("fly_api_base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        return v.rstrip("/")

    @field_validator("git_token_parameter", "git_ssh_key_parameter", "git_ssh_known_hosts_file")
    @classmethod
    def _empty_is_unset(cls, v: str | None) -> str | None:
        return v.strip() or None if v is not None else None

    @field_validator("git_token_parameters", "git_ssh_key_parameters")
    @classmethod
    def _hosts(cls, v: dict[str, str]) -> dict[str, str]:
        hosts: dict[str, str] = {}
        for host, parameter in v.items():
            if not re.fullmatch(r"[A-Za-z0-9.-]+", host) or not parameter.strip():
                raise ValueError(f"{host!r}: map a host name (github.com) to an SSM parameter name")
            hosts[host.lower()] = parameter.strip()
        return hosts

    def git_credential_parameter(self, repo_url: str) -> tuple[GitCredentialKind, str, str] | None:
        """The credential `repo_url` is cloned with: its kind, the SSM parameter holding
        it and the setting that named it (for messages); None when it takes none."""
        remote = git_remote(repo_url)
        if remote is None:
            return None
        kind, host = remote
        if kind == "token":
            if host in self.git_token_parameters:
                return kind, self.git_token_parameters[host], "TURBODEPLOY_GIT_TOKEN_PARAMETERS"
            if self.git_token_parameter:
                return kind, self.git_token_parameter, "TURBODEPLOY_GIT_TOKEN_PARAMETER"
            return None
        if host in self.git_ssh_key_parameters:
            return kind, self.git_ssh_key_parameters[host], "TURBODEPLOY_GIT_SSH_KEY_PARAMETERS"
        if self.git_ssh_key_parameter:
            return kind, self.git_ssh_key_parameter, "TURBODEPLOY_GIT_SSH_KEY_PARAMETER"
        return None

    def app_url(self, app_name: str) -> str:
        return self.app_url_template.replace("{app}", app_name)

    @cached_property
    def workflow_ui_base(self) -> str:
        return f"{self.temporal_ui_url.rstrip('/')}/namespaces/{self.temporal_namespace}/workflows"

    def workflow_ui_link(self, workflow_id: str, run_id: str | None = None) -> str:
        link = f"{self.workflow_ui_base}/{workflow_id}"
        return f"{link}/{run_id}/history" if run_id else link
