"""Every failure an activity reports to the workflow, named once, with whether a retry can
fix it.

An activity fails with an `ApplicationError` whose `type` is one of the names below and
whose message a person can act on. Retryable failures are passing conditions: the step's
retry policy waits them out. Non-retryable ones end the step at once, and every step's
`non_retryable_error_types` is `NON_RETRYABLE`, derived from this catalogue, so a raise
that forgot to say so still does not retry a hopeless request for minutes.

    ApplicationError.type
    ├── retryable: a passing condition
    │   ├── DatabaseUnavailable      PostgreSQL down, restarting or failing over
    │   ├── SecretsUnavailable       SSM unreachable or throttling
    │   ├── AppNotVisible            a Fly app just created is not readable yet
    │   ├── CallbackUnavailable      the platform's callback receiver is down
    │   ├── FlyctlInterrupted        flyctl killed before it finished
    │   ├── MachineNotSettled        a machine stopped or started is not there yet
    │   ├── VolumeInUse              a volume still attached to a machine being destroyed
    │   └── AppNotGone               a deleted Fly app is still visible
    ├── decided by each failure
    │   ├── GitError                 auth or a missing branch: no; the network: yes
    │   ├── FlyctlFailed             its output says whether the cause was transient
    │   └── Fly API errors           by flyapi's class: FlyTransportError, FlyRetryableError
    │                                (408, 409, 429, 5xx) retry; FlyClientError and its
    │                                subclasses (FlyBadRequest, FlyUnauthorized, FlyForbidden,
    │                                FlyNotFound, FlyUnprocessable) do not
    └── non-retryable: a retry sends the same thing again
        ├── credentials              CredentialsMissing, CredentialsInvalid,
        │                            CredentialsAccessDenied, GitAccessDenied (the git
        │                            remote refused the worker's git credentials, or none)
        ├── app secrets              SecretMissing, SecretAccessDenied, SecretInvalid
        ├── records                  DeploymentNotFound, DeploymentConflict,
        │                            DeploymentRecordInvalid, ReleaseNotFound,
        │                            ReleaseNotRestorable, ProjectNotRegistered
        ├── the app                  AppNameTaken, AppNotFound
        ├── configuration            FlyTomlError, UnsupportedStrategy, BlueGreenNeedsChecks,
        │                            BlueGreenWithVolumes
        ├── build                    FlyctlMissing, InvalidBuildInput
        ├── health                   MachineFailed, MachineUnhealthy, HealthCheckFailed
        └── notification             CallbackRejected, CallbackKeyMissing
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio.exceptions import ApplicationError

from flyapi import FlyAPIError, FlyClientError, FlyError

_CATALOGUE: dict[str, Failure] = {}


class Failure(str):
    """A failure type: the `type` string itself, with its retryability, and a constructor
    of the `ApplicationError` that reports it."""

    retryable: bool | None  # None: each failure says (see `__call__`)

    def __new__(cls, name: str, *, retryable: bool | None) -> Failure:
        failure = super().__new__(cls, name)
        failure.retryable = retryable
        _CATALOGUE[name] = failure
        return failure

    def __call__(
        self,
        message: str,
        *details: Any,
        non_retryable: bool | None = None,
        next_retry_delay: timedelta | None = None,
    ) -> ApplicationError:
        if self.retryable is None:
            if non_retryable is None:
                raise TypeError(f"{self}: say whether this failure can be retried")
        elif non_retryable is not None:
            raise TypeError(f"{self} is always {'' if self.retryable else 'non-'}retryable")
        return ApplicationError(
            message,
            *details,
            type=str(self),
            non_retryable=not self.retryable if non_retryable is None else non_retryable,
            next_retry_delay=next_retry_delay,
        )


# retryable
DATABASE_UNAVAILABLE = Failure("DatabaseUnavailable", retryable=True)
SECRETS_UNAVAILABLE = Failure("SecretsUnavailable", retryable=True)
APP_NOT_VISIBLE = Failure("AppNotVisible", retryable=True)
CALLBACK_UNAVAILABLE = Failure("CallbackUnavailable", retryable=True)
FLYCTL_INTERRUPTED = Failure("FlyctlInterrupted", retryable=True)
MACHINE_NOT_SETTLED = Failure("MachineNotSettled", retryable=True)
VOLUME_IN_USE = Failure("VolumeInUse", retryable=True)
APP_NOT_GONE = Failure("AppNotGone", retryable=True)
# decided by each failure
GIT_ERROR = Failure("GitError", retryable=None)
FLYCTL_FAILED = Failure("FlyctlFailed", retryable=None)
# non-retryable
CREDENTIALS_MISSING = Failure("CredentialsMissing", retryable=False)
CREDENTIALS_INVALID = Failure("CredentialsInvalid", retryable=False)
CREDENTIALS_ACCESS_DENIED = Failure("CredentialsAccessDenied", retryable=False)
GIT_ACCESS_DENIED = Failure("GitAccessDenied", retryable=False)
SECRET_MISSING = Failure("SecretMissing", retryable=False)
SECRET_ACCESS_DENIED = Failure("SecretAccessDenied", retryable=False)
SECRET_INVALID = Failure("SecretInvalid", retryable=False)
DEPLOYMENT_NOT_FOUND = Failure("DeploymentNotFound", retryable=False)
DEPLOYMENT_CONFLICT = Failure("DeploymentConflict", retryable=False)
DEPLOYMENT_RECORD_INVALID = Failure("DeploymentRecordInvalid", retryable=False)
RELEASE_NOT_FOUND = Failure("ReleaseNotFound", retryable=False)
RELEASE_NOT_RESTORABLE = Failure("ReleaseNotRestorable", retryable=False)
APP_NAME_TAKEN = Failure("AppNameTaken", retryable=False)
APP_NOT_FOUND = Failure("AppNotFound", retryable=False)
PROJECT_NOT_REGISTERED = Failure("ProjectNotRegistered", retryable=False)
FLY_TOML_ERROR = Failure("FlyTomlError", retryable=False)
UNSUPPORTED_STRATEGY = Failure("UnsupportedStrategy", retryable=False)
BLUE_GREEN_NEEDS_CHECKS = Failure("BlueGreenNeedsChecks", retryable=False)
BLUE_GREEN_WITH_VOLUMES = Failure("BlueGreenWithVolumes", retryable=False)
# fly.toml gained [mounts] and the app's machines have no volume to keep.
MOUNTS_NEED_NEW_MACHINES = Failure("MountsNeedNewMachines", retryable=False)
FLYCTL_MISSING = Failure("FlyctlMissing", retryable=False)
INVALID_BUILD_INPUT = Failure("InvalidBuildInput", retryable=False)
# The machine failed to launch, crashed, or its version was replaced while we waited.
MACHINE_FAILED = Failure("MachineFailed", retryable=False)
MACHINE_UNHEALTHY = Failure("MachineUnhealthy", retryable=False)
HEALTH_CHECK_FAILED = Failure("HealthCheckFailed", retryable=False)
CALLBACK_REJECTED = Failure("CallbackRejected", retryable=False)
CALLBACK_KEY_MISSING = Failure("CallbackKeyMissing", retryable=False)


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    sub: type
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


def catalogue() -> dict[str, Failure]:
    return dict(_CATALOGUE)


# Every step's `non_retryable_error_types`.
NON_RETRYABLE: list[str] = sorted(
    [name for name, failure in _CATALOGUE.items() if failure.retryable is False]
    + [cls.__name__ for cls in _subclasses(FlyClientError)]
)


def to_application_error(exc: FlyError, *, action: str) -> ApplicationError:
    """How a Fly API failure reaches the workflow: its flyapi class as the type, its
    retryability as the API's classification says, `Retry-After` as the next delay.

    `action` reads like "Create Fly app turbobackend-p1"; the message becomes
    "Create Fly app turbobackend-p1 failed: 422 Name has already been taken (request id …)".
    """
    retry_after = exc.retry_after if isinstance(exc, FlyAPIError) else None
    details = []
    if isinstance(exc, FlyAPIError):
        details.append(
            {"status_code": exc.status_code, "request_id": exc.request_id, "path": exc.path}
        )
    return ApplicationError(
        f"{action} failed: {exc}",
        *details,
        type=type(exc).__name__,
        non_retryable=not exc.retryable,
        next_retry_delay=(
            timedelta(seconds=retry_after) if retry_after is not None and exc.retryable else None
        ),
    )
