"""Git credentials for private remotes, read from SSM by reference.

Settings name SSM parameters, never values: a token for HTTPS remotes
(`TURBODEPLOY_GIT_TOKEN_PARAMETER`, or one per host in `TURBODEPLOY_GIT_TOKEN_PARAMETERS`)
and a private deploy key for SSH remotes (`TURBODEPLOY_GIT_SSH_KEY_PARAMETER[S]`). The value
is read with decryption inside the worker, cached like the Fly token, and handed to git as a
`gitrepo.GitAuth`, which puts it into git's environment only. It is never part of an
activity's input or result, a log line, the database or a child's argv.

A remote that refuses the credentials (or asks for some when none are configured) ends the
step with the non-retryable `GitAccessDenied`, naming the setting to check, and the cached
value is dropped so a rotated token is read on the next deploy.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError
from temporalio.exceptions import ApplicationError

from activities._errors import (
    CREDENTIALS_ACCESS_DENIED,
    CREDENTIALS_INVALID,
    CREDENTIALS_MISSING,
    GIT_ACCESS_DENIED,
    GIT_ERROR,
    SECRETS_UNAVAILABLE,
)
from activities._ssm import Cached, Secret, build_ssm_client, hide_response_bodies
from core import gitrepo
from core.settings import Settings, git_remote

if TYPE_CHECKING:
    from mypy_boto3_ssm import SSMClient

log = logging.getLogger(__name__)

_DENIED_CODES = frozenset(
    {"AccessDeniedException", "AccessDenied", "InvalidKeyId", "KMSAccessDeniedException"}
)


class GitCredentials:
    """The git credentials of one worker, shared by the steps that clone, fetch and push."""

    def __init__(self, settings: Settings, *, ssm_client: SSMClient | None = None) -> None:
        hide_response_bodies()
        self._settings = settings
        self._ssm = ssm_client
        self._ssm_lock = threading.Lock()
        self._cache: dict[str, Cached[Secret]] = {}

    def __repr__(self) -> str:
        return "GitCredentials(<by reference>)"

    async def auth_for(self, repo_url: str) -> gitrepo.GitAuth | None:
        """The credentials to reach `repo_url` with, or None when no setting names any."""
        found = self._settings.git_credential_parameter(repo_url)
        if found is None:
            return None
        kind, parameter, setting = found
        cached = self._cache.setdefault(parameter, Cached(self._settings.token_cache_seconds))
        secret = await cached.get(lambda: self._load(parameter, setting))
        try:
            if kind == "token":
                return gitrepo.GitAuth(
                    token=secret.reveal(), username=self._settings.git_token_username
                )
            return gitrepo.GitAuth(
                ssh_key=secret.reveal(),
                known_hosts=self._settings.git_ssh_known_hosts_file,
                ssh_command=self._settings.git_ssh_command,
            )
        except ValueError:
            raise CREDENTIALS_INVALID(
                f"the git credential in SSM parameter {parameter} ({setting}) holds "
                "control characters"
            ) from None

    def invalidate(self, repo_url: str) -> None:
        found = self._settings.git_credential_parameter(repo_url)
        if found is not None and found[1] in self._cache:
            self._cache[found[1]].clear()

    def failure(self, exc: gitrepo.GitError, repo_url: str, *, what: str = "") -> ApplicationError:
        """How a git failure reaches the workflow: a refused login as `GitAccessDenied`
        saying which setting to check, everything else as `GitError`."""
        prefix = f"{what}: " if what else ""
        if exc.reason != gitrepo.ACCESS_DENIED:
            return GIT_ERROR(f"{prefix}{exc}", non_retryable=not exc.retryable)
        self.invalidate(repo_url)
        found = self._settings.git_credential_parameter(repo_url)
        remote = git_remote(repo_url)
        host = remote[1] if remote else "the remote"
        if found is not None:
            _, parameter, setting = found
            hint = (
                f"{host} refused the git credential read from SSM parameter {parameter} "
                f"({setting}): check that it is valid and may read and push this repository"
            )
        elif remote is None:
            hint = "this remote takes no credentials from the worker"
        elif remote[0] == "token":
            hint = (
                f"no git token is configured for {host}: a private repository needs "
                "TURBODEPLOY_GIT_TOKEN_PARAMETER (or TURBODEPLOY_GIT_TOKEN_PARAMETERS for this "
                "host) naming the SSM parameter that holds one"
            )
        else:
            hint = (
                f"no SSH deploy key is configured for {host}: set "
                "TURBODEPLOY_GIT_SSH_KEY_PARAMETER (or TURBODEPLOY_GIT_SSH_KEY_PARAMETERS for "
                "this host) to the SSM parameter that holds one"
            )
        return GIT_ACCESS_DENIED(f"{prefix}{exc}; {hint}")

    def _client(self) -> SSMClient:
        with self._ssm_lock:
            if self._ssm is None:
                self._ssm = build_ssm_client(self._settings)
            return self._ssm

    async def _load(self, name: str, setting: str) -> Secret:
        region = self._settings.aws_region
        try:
            client = await asyncio.to_thread(self._client)
            response = await asyncio.to_thread(client.get_parameter, Name=name, WithDecryption=True)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code == "ParameterNotFound":
                raise CREDENTIALS_MISSING(
                    f"the git credential parameter {name} ({setting}) does not exist in SSM "
                    f"(region {region})"
                ) from None
            message = f"SSM GetParameter {name} ({setting}) failed: {code}"
            if code in _DENIED_CODES:
                raise CREDENTIALS_ACCESS_DENIED(message) from None
            raise SECRETS_UNAVAILABLE(message) from None
        except BotoCoreError as err:
            raise SECRETS_UNAVAILABLE(
                f"SSM is unreachable reading {name}: {type(err).__name__}"
            ) from None
        parameter = response["Parameter"]
        value = parameter.get("Value", "").strip()
        if not value:
            raise CREDENTIALS_MISSING(f"the git credential parameter {name} ({setting}) is empty")
        if parameter.get("Type") != "SecureString":
            log.warning(
                "the git credential parameter %s is a %s, not a SecureString: it is stored "
                "unencrypted",
                name,
                parameter.get("Type"),
            )
        log.debug("read the git credential from %s (version %d)", name, parameter.get("Version", 0))
        return Secret(value)
