"""The `credentials` step: the Fly API token and org, from AWS SSM Parameter Store.

The token is a SecureString read with decryption inside the worker only. It is held in
memory for `token_cache_seconds`, handed to the Fly HTTP client, and never returned by an
activity, logged, or put into an exception. The activity proves it exists and reports its
SSM version, so a run's history shows which token it used without showing the token.

botocore retries once with short timeouts: the activity's retry policy does the waiting, so
a worker never sits in a long botocore backoff that Temporal cannot see.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from temporalio import activity

from activities._errors import (
    CREDENTIALS_ACCESS_DENIED,
    CREDENTIALS_INVALID,
    CREDENTIALS_MISSING,
    SECRETS_UNAVAILABLE,
)
from activities._ssm import Cached, Secret, build_ssm_client, hide_response_bodies
from core.models import Model
from core.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient
    from mypy_boto3_ssm.type_defs import ParameterTypeDef

log = logging.getLogger(__name__)


# Errors no retry can fix: the worker's IAM role or the KMS key policy must change first.
_DENIED_CODES = frozenset(
    {"AccessDeniedException", "AccessDenied", "InvalidKeyId", "KMSAccessDeniedException"}
)
_ORG_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class CredentialsResult(Model):
    """Proof that a token is available, without the token: the org and the SSM version."""

    org_slug: str
    token_parameter: str
    token_version: int


@dataclass(frozen=True)
class _Token:
    secret: Secret
    version: int


class CredentialStore:
    """The Fly credentials of one worker, shared by all its activities."""

    def __init__(self, settings: Settings, *, ssm_client: SSMClient | None = None) -> None:
        hide_response_bodies()
        self._settings = settings
        self._ssm = ssm_client if ssm_client is not None else build_ssm_client(settings)
        self._token: Cached[_Token] = Cached(settings.token_cache_seconds)
        self._org: Cached[str] = Cached(settings.token_cache_seconds)

    @property
    def token_parameter(self) -> str:
        return self._settings.fly_token_parameter

    async def fly_token(self) -> str:
        token = await self._token.get(self._load_token)
        return token.secret.reveal()

    async def token_version(self) -> int:
        token = await self._token.get(self._load_token)
        return token.version

    async def org_slug(self) -> str:
        return await self._org.get(self._load_org)

    def invalidate(self) -> None:
        """Forget what was read, e.g. after Fly answered 401, so a rotated token is used."""
        self._token.clear()
        self._org.clear()

    def __repr__(self) -> str:
        return (
            f"CredentialStore(token_parameter={self._settings.fly_token_parameter!r}, "
            f"org_parameter={self._settings.fly_org_parameter!r})"
        )

    async def _load_token(self) -> _Token:
        name = self._settings.fly_token_parameter
        parameter = await self._get_parameter(name)
        if parameter is None:
            raise CREDENTIALS_MISSING(
                f"the Fly API token parameter {name} does not exist in SSM "
                f"(region {self._settings.aws_region})"
            )
        # A trailing newline (a token pasted from a file) would break the HTTP header.
        value = parameter.get("Value", "").strip()
        if not value:
            raise CREDENTIALS_MISSING(f"the Fly API token parameter {name} is empty")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise CREDENTIALS_INVALID(
                f"the Fly API token parameter {name} holds control characters"
            )
        kind = parameter.get("Type")
        if kind != "SecureString":
            log.warning(
                "the Fly API token parameter %s is a %s, not a SecureString: it is stored "
                "unencrypted",
                name,
                kind,
            )
        version = parameter.get("Version", 0)
        log.debug("read the Fly API token from %s (version %d)", name, version)
        return _Token(Secret(value), version)

    async def _load_org(self) -> str:
        name = self._settings.fly_org_parameter
        parameter = await self._get_parameter(name)
        slug = (parameter or {}).get("Value", "").strip()
        if not slug:
            log.info(
                "no Fly org in SSM parameter %s; using %s", name, self._settings.fly_default_org
            )
            return self._settings.fly_default_org
        if not _ORG_SLUG_RE.match(slug):
            raise CREDENTIALS_INVALID(
                f"SSM parameter {name} holds {slug[:80]!r}, which is not a Fly org slug"
            )
        return slug

    async def _get_parameter(self, name: str) -> ParameterTypeDef | None:
        """The parameter, decrypted, or None when it does not exist."""
        try:
            response = await asyncio.to_thread(
                self._ssm.get_parameter, Name=name, WithDecryption=True
            )
        except ClientError as err:
            error = err.response.get("Error", {})
            code = error.get("Code", "")
            if code == "ParameterNotFound":
                return None
            message = f"SSM GetParameter {name} failed: {code}: {error.get('Message', '')}"
            if code in _DENIED_CODES:
                raise CREDENTIALS_ACCESS_DENIED(message) from err
            # Throttling, 5xx, and expired AWS credentials that the provider will refresh.
            raise SECRETS_UNAVAILABLE(message) from err
        except BotoCoreError as err:
            raise SECRETS_UNAVAILABLE(f"SSM is unreachable reading {name}: {err}") from err
        return response["Parameter"]


class CredentialActivities:
    def __init__(self, store: CredentialStore) -> None:
        self._store = store

    @activity.defn(name="resolve_credentials")
    async def resolve_credentials(self) -> CredentialsResult:
        """Prove the token can be read; report its org and version, never the token."""
        version = await self._store.token_version()
        org = await self._store.org_slug()
        activity.logger.info(
            "Fly API token available from %s (version %d), org %s",
            self._store.token_parameter,
            version,
            org,
        )
        return CredentialsResult(
            org_slug=org, token_parameter=self._store.token_parameter, token_version=version
        )
