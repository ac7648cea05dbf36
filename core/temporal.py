"""How the worker, the CLI and the Python API reach Temporal: one place, read the way the
`temporal` CLI reads it (the SDK's `temporalio.envconfig`).

In order, each over the one before:

1. a profile of `temporal.toml` (`TEMPORAL_CONFIG_FILE`, by default
   `~/.config/temporalio/temporal.toml`; the profile `TEMPORAL_PROFILE`, the setting
   `TURBODEPLOY_TEMPORAL_PROFILE`, or `default`): address, namespace, api_key, [tls];
2. the `temporal` CLI's variables: `TEMPORAL_ADDRESS`, `TEMPORAL_NAMESPACE`,
   `TEMPORAL_API_KEY`, `TEMPORAL_TLS`, `TEMPORAL_TLS_SERVER_CA_CERT_PATH`,
   `TEMPORAL_TLS_CLIENT_CERT_PATH`, `TEMPORAL_TLS_CLIENT_KEY_PATH`,
   `TEMPORAL_TLS_SERVER_NAME`, `TEMPORAL_GRPC_META_*`;
3. `TURBODEPLOY_TEMPORAL_ADDRESS` and `TURBODEPLOY_TEMPORAL_NAMESPACE`, when set.

Without any of them: `localhost:7233`, namespace `default`, no TLS. An API key turns TLS on
(Temporal Cloud); the key is sent as `Authorization: Bearer <key>` and never shown.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from core.settings import Settings

if TYPE_CHECKING:
    from temporalio.client import Client, Interceptor
    from temporalio.runtime import Runtime
    from temporalio.service import TLSConfig


class TemporalConfigError(ValueError):
    """The Temporal connection settings cannot be used (a missing profile or file)."""


@dataclass(frozen=True)
class TemporalConnection:
    """Where and how to connect, resolved from the profile, the environment and settings."""

    target_host: str
    namespace: str
    tls: bool | TLSConfig = False
    api_key: str | None = field(default=None, repr=False)
    rpc_metadata: Mapping[str, str] = field(default_factory=dict, repr=False)
    profile: str | None = None

    def describe(self) -> str:
        """`host (namespace ns, TLS, API key)`, for logs and messages: no secret in it."""
        parts = [f"namespace {self.namespace}"]
        if self.tls is not False:
            mtls = not isinstance(self.tls, bool) and self.tls.client_cert is not None
            parts.append("mTLS" if mtls else "TLS")
        if self.api_key:
            parts.append("API key")
        if self.profile:
            parts.append(f"profile {self.profile}")
        return f"{self.target_host} ({', '.join(parts)})"

    async def connect(
        self,
        *,
        runtime: Runtime | None = None,
        interceptors: Sequence[Interceptor] = (),
        **kwargs: Any,
    ) -> Client:
        """A client with the pydantic data converter (the workflow's payloads), plus the
        tracing interceptor when OpenTelemetry is enabled (core/tracing.py)."""
        from temporalio.client import Client
        from temporalio.contrib.pydantic import pydantic_data_converter

        from core import tracing

        kwargs.setdefault("data_converter", pydantic_data_converter)
        return await Client.connect(
            self.target_host,
            namespace=self.namespace,
            api_key=self.api_key,
            tls=self.tls,
            rpc_metadata=dict(self.rpc_metadata),
            runtime=runtime,
            interceptors=[*tracing.client_interceptors(), *interceptors],
            **kwargs,
        )


def temporal_connection(
    settings: Settings, *, environ: Mapping[str, str] | None = None
) -> TemporalConnection:
    """The connection `settings` and the environment (`environ`, this process's by
    default) describe."""
    from temporalio.envconfig import ClientConfigProfile

    env = dict(os.environ if environ is None else environ)
    profile_name = settings.temporal_profile or env.get("TEMPORAL_PROFILE") or None
    if settings.temporal_profile:
        env["TEMPORAL_PROFILE"] = settings.temporal_profile
    try:
        profile = ClientConfigProfile.load(profile=profile_name, override_env_vars=env)
        config = profile.to_client_connect_config()
    except Exception as exc:  # the bridge's ConfigError, OSError from a cert path, ...
        where = env.get("TEMPORAL_CONFIG_FILE") or "~/.config/temporalio/temporal.toml"
        raise TemporalConfigError(
            f"cannot read the Temporal connection (profile {profile_name or 'default'} of "
            f"{where}, TEMPORAL_* variables): {exc}"
        ) from exc
    explicit = settings.model_fields_set
    address = (
        settings.temporal_address
        if "temporal_address" in explicit
        else config.get("target_host") or settings.temporal_address
    )
    namespace = (
        settings.temporal_namespace
        if "temporal_namespace" in explicit
        else config.get("namespace") or settings.temporal_namespace
    )
    return TemporalConnection(
        target_host=address,
        namespace=namespace,
        tls=config.get("tls", False),
        api_key=config.get("api_key") or None,
        rpc_metadata=dict(config.get("rpc_metadata") or {}),
        profile=profile_name,
    )


async def connect(
    settings: Settings,
    *,
    runtime: Runtime | None = None,
    interceptors: Sequence[Interceptor] = (),
    **kwargs: Any,
) -> Client:
    """Connect as `settings` and the environment say (see the module's docstring)."""
    connection = temporal_connection(settings)
    return await connection.connect(runtime=runtime, interceptors=interceptors, **kwargs)
