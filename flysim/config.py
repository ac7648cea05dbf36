"""Knobs of the emulator: accepted tokens, timings, injected faults.

All of them can be changed while the emulator runs, through `FlySim.config` or the
`POST /_sim/config` control endpoint.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SimTiming(BaseModel):
    """Durations in seconds. Zero keeps tests instant; a demo can make them realistic."""

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    api_latency: float = Field(default=0.0, ge=0)
    create_delay: float = Field(default=0.0, ge=0)
    start_delay: float = Field(default=0.0, ge=0)
    stop_delay: float = Field(default=0.0, ge=0)
    healthy_after: float = Field(default=0.0, ge=0)
    # A lease request without a ttl gets this one.
    lease_default_ttl: float = Field(default=30.0, gt=0)
    # Seconds without proxied traffic after which a machine whose service has autostop
    # stops itself; None disables idle stops.
    autostop_after: float | None = Field(default=None, ge=0)
    # How long the proxy holds a request while it wakes a machine before giving up.
    proxy_wait_limit: float = Field(default=60.0, ge=0)
    # Seconds a machine of a `crashing_images` image runs before it crashes.
    crash_after: float = Field(default=0.0, ge=0)


class Faults(BaseModel):
    """Failures injected into `/v1` API requests, decided before any side effect."""

    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    error_rate: float = Field(default=0.0, ge=0, le=1)
    error_codes: tuple[int, ...] = (500, 502, 503)
    rate_limit_rate: float = Field(default=0.0, ge=0, le=1)
    retry_after: int = Field(default=1, ge=0)
    latency_spike_rate: float = Field(default=0.0, ge=0, le=1)
    latency_spike: float = Field(default=0.0, ge=0)
    drop_rate: float = Field(default=0.0, ge=0, le=1)
    seed: int | None = None
    # Machines created or updated without `min_secrets_version` boot with the app's
    # secrets of before their last change, as when the secrets a host reads lag behind.
    stale_secrets: bool = False


class SimConfig(BaseModel):
    model_config = ConfigDict(validate_assignment=True, extra="forbid")

    # Bearer token -> slug of the organisation it belongs to. Never shown in reprs.
    tokens: dict[str, str] = Field(default_factory=dict, repr=False)
    timing: SimTiming = Field(default_factory=SimTiming)
    faults: Faults = Field(default_factory=Faults)
    unhealthy_images: set[str] = Field(default_factory=set)
    # Machines of these images fail to launch: starting, then launch_failed and failed.
    failing_images: set[str] = Field(default_factory=set)
    # Machines of these images start, then crash (failed) `timing.crash_after` seconds later.
    crashing_images: set[str] = Field(default_factory=set)
    # Regions whose hosts have no capacity: a machine create or start there is refused
    # with 503 `insufficient_capacity`, as the API refuses it.
    full_regions: set[str] = Field(default_factory=set)
    rate_limit_rps: float | None = Field(default=None, gt=0)

    def public_dict(self) -> dict[str, Any]:
        """The configuration without the tokens, for the control API."""
        data = self.model_dump(mode="json", exclude={"tokens"})
        data["token_count"] = len(self.tokens)
        return data

    def apply(self, patch: dict[str, Any]) -> None:
        """Merge a partial update; nested sections are merged field by field.

        The whole patch is validated before anything changes, so a bad field leaves the
        configuration as it was.
        """
        unknown = set(patch) - set(type(self).model_fields)
        if unknown:
            raise ValueError(f"unknown configuration fields: {sorted(unknown)}")
        timing = self.timing.model_copy(update={})
        faults = self.faults.model_copy(update={})
        merged = {
            "timing": SimTiming.model_validate({**timing.model_dump(), **patch.get("timing", {})}),
            "faults": Faults.model_validate({**faults.model_dump(), **patch.get("faults", {})}),
            "unhealthy_images": set(patch.get("unhealthy_images", self.unhealthy_images)),
            "failing_images": set(patch.get("failing_images", self.failing_images)),
            "crashing_images": set(patch.get("crashing_images", self.crashing_images)),
            "full_regions": set(patch.get("full_regions", self.full_regions)),
            "tokens": dict(patch.get("tokens", self.tokens)),
            "rate_limit_rps": patch.get("rate_limit_rps", self.rate_limit_rps),
        }
        checked = SimConfig.model_validate(merged)
        for name in merged:
            setattr(self, name, getattr(checked, name))
