"""Response models. Liberal on purpose: unknown fields are kept, missing ones default,
because the live API grows fields faster than its published spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# States after which a machine is gone (or about to be) and must not be touched.
GONE_STATES = frozenset({"destroyed", "destroying", "replaced", "migrated"})
# States in which a machine will not start without being told to again: it failed to
# launch or crashed past its restarts, or this version of it was replaced or destroyed.
FAILED_STATES = frozenset({"failed", "launch_failed", *GONE_STATES})


class _Liberal(BaseModel):
    model_config = ConfigDict(extra="allow")


class Organization(_Liberal):
    slug: str | None = None
    name: str | None = None


class App(_Liberal):
    name: str
    id: str | None = None
    status: str | None = None
    organization: Organization | None = None

    @property
    def org_slug(self) -> str | None:
        return self.organization.slug if self.organization else None


class CheckStatus(_Liberal):
    name: str | None = None
    status: str | None = None  # "passing" | "warning" | "critical"
    output: str | None = None
    updated_at: str | None = None

    @property
    def passing(self) -> bool:
        return self.status == "passing"


class Machine(_Liberal):
    id: str
    name: str | None = None
    state: str | None = None
    region: str | None = None
    # The same value under two names: `version` now, `instance_id` (deprecated) before.
    instance_id: str | None = None
    version: str | None = None
    private_ip: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    checks: list[CheckStatus] = Field(default_factory=list)
    # Only present on a create that asked for a lease.
    nonce: str | None = None

    @model_validator(mode="after")
    def _versions(self) -> Machine:
        if self.version is None:
            self.version = self.instance_id
        elif self.instance_id is None:
            self.instance_id = self.version
        return self

    @property
    def failed(self) -> bool:
        """The machine could not run, or this version of it is gone: waiting for it to
        start is pointless."""
        return self.state in FAILED_STATES

    @field_validator("checks", mode="before")
    @classmethod
    def _checks(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("config", mode="before")
    @classmethod
    def _config(cls, value: Any) -> Any:
        return {} if value is None else value

    @property
    def metadata(self) -> dict[str, str]:
        """`config.metadata`, where the API keeps it (some answers repeat it at the top)."""
        value = self.config.get("metadata")
        if not isinstance(value, dict):
            value = (self.model_extra or {}).get("metadata")
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

    @property
    def image(self) -> str | None:
        value = self.config.get("image")
        return value if isinstance(value, str) else None

    @property
    def gone(self) -> bool:
        return self.state in GONE_STATES


class AppSecret(_Liberal):
    """An app secret as the API lists it: its name and a digest of its value."""

    name: str
    digest: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


class Lease(_Liberal):
    # Only its holder needs it; a lease read by anyone else may come without it.
    nonce: str = ""
    expires_at: int | None = None
    owner: str | None = None
    description: str | None = None
    version: str | None = None


class IPAssignment(_Liberal):
    ip: str
    region: str | None = None
    service_name: str | None = None
    shared: bool | None = None
    created_at: str | None = None


# Volume states after which a volume is on its way out (fly-go's GetVolumes leaves them out).
VOLUME_GONE_STATES = frozenset(
    {
        "scheduling_destroy",
        "fork_cleanup",
        "waiting_for_detach",
        "pending_destroy",
        "destroying",
        "destroyed",
    }
)


class Volume(_Liberal):
    id: str
    name: str | None = None
    state: str | None = None
    size_gb: int | None = None
    region: str | None = None
    zone: str | None = None
    encrypted: bool | None = None
    attached_machine_id: str | None = None
    attached_alloc_id: str | None = None
    created_at: str | None = None
    snapshot_retention: int | None = None
    auto_backup_enabled: bool | None = None
    host_status: str | None = None

    @property
    def attached(self) -> bool:
        return bool(self.attached_machine_id or self.attached_alloc_id)

    @property
    def gone(self) -> bool:
        return self.state in VOLUME_GONE_STATES


class MachineEvent(_Liberal):
    """One entry of a machine's event log: `type` (launch, start, stop, exit, update,
    destroy, ...), the `status` it led to, `source` (user, flyd, flyproxy), when (ms)."""

    id: str | None = None
    type: str | None = None
    status: str | None = None
    source: str | None = None
    timestamp: int | None = None  # epoch milliseconds
    request: dict[str, Any] | None = None


class LogEntry(_Liberal):
    """One line of an app's logs as `GET /api/v1/apps/{app}/logs` returns it (the
    `attributes` of a data item): `instance` is the machine id."""

    id: str | None = None
    timestamp: str = ""
    message: str = ""
    level: str | None = None
    instance: str | None = None
    region: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("meta", mode="before")
    @classmethod
    def _meta(cls, value: Any) -> Any:
        return {} if value is None else value


class LogPage(_Liberal):
    """A page of log entries, oldest first, and the token that asks for the ones after it
    (the same token again when there are none yet)."""

    entries: list[LogEntry] = Field(default_factory=list)
    next_token: str = ""


@dataclass(frozen=True)
class DeployToken:
    """An app-scoped deploy token (`POST /v1/apps/{app}/deploy_token`): it manages `app`
    and its resources only, until `expires_at` (Unix seconds, as the client computed it
    from the expiry it asked for, counted from before the request). The value does not
    show itself in reprs."""

    app: str
    expires_at: float
    token: str = field(repr=False)

    def valid_for(self, now: float) -> float:
        """Seconds left before it expires, at Unix time `now`."""
        return self.expires_at - now
