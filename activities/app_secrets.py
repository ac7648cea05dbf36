"""The `secrets` step (and its undoing in `rollback`): the app's secrets, by reference.

Each value is read from SSM Parameter Store inside this activity and handed to Fly's
secrets API, which makes it an environment variable of every
machine booted from then on.

A request names the parameters only. Values exist in this activity's memory for the time
of one request to Fly; the result, heartbeats, logs and errors carry names, parameter
names and SSM versions, never a value. Setting the same values again changes nothing, so
a retried attempt is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities._errors import (
    SECRET_ACCESS_DENIED,
    SECRET_INVALID,
    SECRET_MISSING,
    SECRETS_UNAVAILABLE,
    to_application_error,
)
from activities._ssm import build_ssm_client
from activities.secrets import CredentialStore
from core.models import Model, SecretVersion
from core.settings import Settings
from flyapi import FlyClient, FlyError, FlyUnauthorized

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient
    from mypy_boto3_ssm.type_defs import ParameterTypeDef

# Error types, not values.

# GetParameters takes at most this many names per call.
_SSM_BATCH = 10
# No retry fixes these: the IAM role, the KMS key policy or the request must change first.
_DENIED_CODES = frozenset(
    {"AccessDeniedException", "AccessDenied", "InvalidKeyId", "KMSAccessDeniedException"}
)
_INVALID_CODES = frozenset({"ValidationException", "InvalidParameterException"})


class AppSecretsInput(Model):
    app_name: str
    secrets: dict[str, str]  # env name -> SSM parameter name


class AppSecretsResult(Model):
    """Names and versions only: a value never leaves the activity."""

    secrets: list[SecretVersion] = Field(default_factory=list)
    added: list[str] = Field(default_factory=list)  # names the app did not have before
    # The app's secrets version on Fly after the change: machines created or updated from
    # now on send it as `min_secrets_version`.
    secrets_version: int | None = None


class RestoreSecretsInput(Model):
    """Put the app's secrets back as a release had them: each value read again from its
    SSM parameter at the recorded version, and the names that release did not have removed."""

    app_name: str
    secrets: list[SecretVersion] = Field(default_factory=list)
    remove: list[str] = Field(default_factory=list)


class RestoreSecretsResult(Model):
    restored: list[SecretVersion] = Field(default_factory=list)
    removed: list[str] = Field(default_factory=list)  # only names the app still had
    secrets_version: int | None = None  # as in AppSecretsResult; None when nothing changed


class AppSecretActivities:
    def __init__(
        self,
        fly: FlyClient,
        credentials: CredentialStore,
        settings: Settings,
        *,
        ssm_client: SSMClient | None = None,
    ) -> None:
        self._fly = fly
        self._credentials = credentials
        self._ssm = ssm_client if ssm_client is not None else build_ssm_client(settings)

    @activity.defn(name="set_app_secrets")
    async def set_app_secrets(self, input: AppSecretsInput) -> AppSecretsResult:
        if not input.secrets:
            return AppSecretsResult()
        parameters = {p["Name"]: p for p in await self._read(sorted(set(input.secrets.values())))}
        missing = sorted({p for p in input.secrets.values() if p not in parameters})
        if missing:
            names = sorted(n for n, p in input.secrets.items() if p in missing)
            raise SECRET_MISSING(
                f"SSM parameter(s) {', '.join(missing)} (for secret(s) {', '.join(names)}) "
                f"do not exist in region {self._ssm.meta.region_name}"
            )
        for name, parameter in sorted(parameters.items()):
            if parameter.get("Type") != "SecureString":
                activity.logger.warning(
                    "SSM parameter %s is a %s, not a SecureString: it is stored unencrypted",
                    name,
                    parameter.get("Type"),
                )
        app = input.app_name
        action = f"Set secrets {', '.join(sorted(input.secrets))} on Fly app {app}"
        with self._fly_errors(action):
            # What the app had before, so that a failed deploy removes only what it added.
            existing = {s.name for s in await self._fly.list_secrets(app)}
            fly_version = await self._fly.set_secrets(
                app, {n: parameters[p].get("Value", "") for n, p in input.secrets.items()}
            )
        result = AppSecretsResult(
            secrets=[
                SecretVersion(name=n, parameter=p, version=parameters[p].get("Version", 0))
                for n, p in sorted(input.secrets.items())
            ],
            added=sorted(set(input.secrets) - existing),
            secrets_version=fly_version or None,
        )
        activity.logger.info(
            "Fly app %s has secrets %s (secrets version %d)",
            app,
            ", ".join(f"{s.name} from {s.parameter} v{s.version}" for s in result.secrets),
            fly_version,
        )
        return result

    @activity.defn(name="restore_app_secrets")
    async def restore_app_secrets(self, input: RestoreSecretsInput) -> RestoreSecretsResult:
        """Put the app's secrets back as a release had them.

        Each value is read from its parameter at the version the release recorded (SSM
        keeps a parameter's last 100 versions), so a rolled-back app boots with the values
        it last ran with, not with what a failed deploy set. Like setting, repeating it
        changes nothing.
        """
        app = input.app_name
        action = f"Restore secrets of Fly app {app}"
        selectors = sorted({f"{s.parameter}:{s.version}" for s in input.secrets})
        found = {(p["Name"], p.get("Version")): p for p in await self._read(selectors)}
        values: dict[str, str] = {}
        for wanted in input.secrets:
            parameter = found.get((wanted.parameter, wanted.version))
            if parameter is None:
                raise SECRET_MISSING(
                    f"SSM parameter {wanted.parameter} has no version {wanted.version} any more "
                    f"(for secret {wanted.name}); the secret cannot be put back"
                )
            values[wanted.name] = parameter.get("Value", "")
        removed: list[str] = []
        version: int | None = None
        with self._fly_errors(action):
            if values:
                version = await self._fly.set_secrets(app, values) or None
            for name in sorted(set(input.remove) - set(values)):
                unset = await self._fly.unset_secret(app, name)
                if unset is not None:
                    removed.append(name)
                    version = unset or version
        result = RestoreSecretsResult(
            restored=sorted(input.secrets, key=lambda s: s.name),
            removed=removed,
            secrets_version=version,
        )
        activity.logger.info(
            "Fly app %s has its secrets back: %s%s",
            app,
            ", ".join(f"{s.name} from {s.parameter} v{s.version}" for s in result.restored)
            or "none set",
            f"; removed {', '.join(removed)}" if removed else "",
        )
        return result

    @contextlib.contextmanager
    def _fly_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except FlyUnauthorized as exc:
            # The cached token is rejected: make the next attempt re-read it.
            self._credentials.invalidate()
            raise to_application_error(exc, action=action) from None
        except FlyError as exc:
            raise to_application_error(exc, action=action) from None

    async def _read(self, names: list[str]) -> list[ParameterTypeDef]:
        """The parameters that exist among `names` (or `name:version` selectors), decrypted.

        Each comes back under its plain name with its version, whichever way it was asked for.
        """
        found: list[ParameterTypeDef] = []
        for start in range(0, len(names), _SSM_BATCH):
            batch = names[start : start + _SSM_BATCH]
            try:
                response = await asyncio.to_thread(
                    self._ssm.get_parameters, Names=batch, WithDecryption=True
                )
            except ClientError as err:
                raise _ssm_error(err, batch) from None
            except BotoCoreError as err:
                raise SECRETS_UNAVAILABLE(
                    f"SSM is unreachable reading {', '.join(batch)}: {type(err).__name__}"
                ) from None
            found.extend(response.get("Parameters", []))
            activity.heartbeat(f"read {min(start + _SSM_BATCH, len(names))} of {len(names)}")
        return found


def _ssm_error(err: ClientError, names: list[str]) -> ApplicationError:
    # Not chained (`from None` at the call): botocore's exception keeps the whole response.
    error = err.response.get("Error", {})
    code = error.get("Code", "")
    message = f"SSM GetParameters {', '.join(names)} failed: {code}: {error.get('Message', '')}"
    if code in _DENIED_CODES:
        return SECRET_ACCESS_DENIED(message)
    if code in _INVALID_CODES:
        return SECRET_INVALID(message)
    # Throttling, 5xx, and expired AWS credentials that the provider will refresh.
    return SECRETS_UNAVAILABLE(message)
