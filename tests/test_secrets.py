"""Fly credentials from moto's SSM server, read through a real boto3 client."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from harness import ssm_settings
from temporalio.api.failure.v1 import Failure
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.secrets import CredentialActivities, CredentialStore, build_ssm_client
from core.settings import Settings
from turbodeploy import embedded


class CountingCalls:
    """Counts GetParameter calls per parameter name, from botocore's own event hooks."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, params: dict[str, Any], **_: Any) -> None:
        self.calls[params["Name"]] += 1


@pytest.fixture
def prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:10]}"


def _store(settings: Settings) -> tuple[CredentialStore, CountingCalls]:
    client = build_ssm_client(settings)
    counter = CountingCalls()
    client.meta.events.register("provide-client-params.ssm.GetParameter", counter)
    return CredentialStore(settings, ssm_client=client), counter


async def _encoded_failure(err: BaseException) -> bytes:
    """The failure as the worker would send it to the Temporal server."""
    failure = Failure()
    await pydantic_data_converter.encode_failure(err, failure)
    return failure.SerializeToString()


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Everything logged at DEBUG, botocore's wire logs included."""
    caplog.set_level(logging.DEBUG)
    yield caplog


async def test_token_is_read_once_for_a_burst_and_cached(
    ssm_endpoint: str, fly_token: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    settings = ssm_settings(ssm_endpoint)
    store, counter = _store(settings)

    tokens = await asyncio.gather(*(store.fly_token() for _ in range(20)))
    assert set(tokens) == {fly_token}
    assert await store.fly_token() == fly_token
    assert await store.token_version() >= 1
    assert counter.calls == {settings.fly_token_parameter: 1}

    # The token was on the wire and in memory; none of it may surface.
    secret_part = fly_token.split()[-1]
    assert secret_part not in debug_logs.text
    assert secret_part not in repr(store)
    assert secret_part not in repr(vars(store))


async def test_the_cache_expires(ssm_endpoint: str, ssm: Any, prefix: str) -> None:
    name = f"{prefix}/token"
    ssm.put_parameter(Name=name, Value="fo1_first", Type="SecureString")
    store, counter = _store(
        ssm_settings(ssm_endpoint, fly_token_parameter=name, token_cache_seconds=0.05)
    )

    assert await store.fly_token() == "fo1_first"
    assert await store.fly_token() == "fo1_first"
    assert counter.calls[name] == 1
    await asyncio.sleep(0.1)
    assert await store.fly_token() == "fo1_first"
    assert counter.calls[name] == 2


async def test_invalidate_picks_up_a_rotated_token(
    ssm_endpoint: str, ssm: Any, prefix: str
) -> None:
    name = f"{prefix}/token"
    ssm.put_parameter(Name=name, Value="fo1_old-token\n", Type="SecureString")
    store, counter = _store(ssm_settings(ssm_endpoint, fly_token_parameter=name))

    assert await store.fly_token() == "fo1_old-token"  # the stray newline is not sent
    assert await store.token_version() == 1
    ssm.put_parameter(Name=name, Value="fo1_new-token", Type="SecureString", Overwrite=True)
    assert await store.fly_token() == "fo1_old-token"  # cached until told otherwise

    store.invalidate()
    assert await store.fly_token() == "fo1_new-token"
    assert await store.token_version() == 2
    assert counter.calls[name] == 2


async def test_a_missing_token_fails_for_good_without_showing_the_old_one(
    ssm_endpoint: str, ssm: Any, prefix: str, fly_token: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    name = f"{prefix}/token"
    ssm.put_parameter(Name=name, Value=fly_token, Type="SecureString")
    store = CredentialStore(ssm_settings(ssm_endpoint, fly_token_parameter=name))
    debug_logs.clear()  # seeding logged the value it sent; only the store's logs count
    assert await store.fly_token() == fly_token

    ssm.delete_parameter(Name=name)
    store.invalidate()
    with pytest.raises(ApplicationError) as caught:
        await store.fly_token()

    err = caught.value
    assert (err.type, err.non_retryable) == ("CredentialsMissing", True)
    assert name in str(err)
    secret_part = fly_token.split()[-1]
    for text in (str(err), repr(err), repr(err.details), debug_logs.text):
        assert secret_part not in text
    assert secret_part.encode() not in await _encoded_failure(err)


async def test_a_blank_token_is_missing(ssm_endpoint: str, ssm: Any, prefix: str) -> None:
    name = f"{prefix}/token"
    ssm.put_parameter(Name=name, Value="  \n", Type="SecureString")
    store = CredentialStore(ssm_settings(ssm_endpoint, fly_token_parameter=name))

    with pytest.raises(ApplicationError) as caught:
        await store.fly_token()
    assert (caught.value.type, caught.value.non_retryable) == ("CredentialsMissing", True)
    assert "is empty" in str(caught.value)


async def test_an_unreachable_ssm_is_retryable_and_asked_once_per_burst() -> None:
    settings = ssm_settings(f"http://127.0.0.1:{embedded.free_port()}")
    store, counter = _store(settings)

    began = time.monotonic()
    outcomes = await asyncio.gather(*(store.fly_token() for _ in range(10)), return_exceptions=True)
    # botocore gives up quickly and leaves the waiting to the activity's retry policy.
    assert time.monotonic() - began < 5
    assert counter.calls == {settings.fly_token_parameter: 1}
    for outcome in outcomes:
        assert isinstance(outcome, ApplicationError)
        assert (outcome.type, outcome.non_retryable) == ("SecretsUnavailable", False)

    # Nothing is cached from a failure: the next caller asks again.
    with pytest.raises(ApplicationError):
        await store.fly_token()
    assert counter.calls[settings.fly_token_parameter] == 2


async def test_org_comes_from_ssm_or_the_default(ssm_endpoint: str, ssm: Any, prefix: str) -> None:
    org_parameter = f"{prefix}/org"
    store, counter = _store(
        ssm_settings(ssm_endpoint, fly_org_parameter=org_parameter, fly_default_org="fallback-org")
    )
    assert await store.org_slug() == "fallback-org"

    ssm.put_parameter(Name=org_parameter, Value="acme-inc", Type="String")
    store.invalidate()
    assert await store.org_slug() == "acme-inc"
    assert await store.org_slug() == "acme-inc"
    assert counter.calls[org_parameter] == 2


async def test_an_org_that_is_not_a_slug_is_rejected(
    ssm_endpoint: str, ssm: Any, prefix: str
) -> None:
    org_parameter = f"{prefix}/org"
    ssm.put_parameter(Name=org_parameter, Value="Acme Inc; rm -rf", Type="String")
    store = CredentialStore(ssm_settings(ssm_endpoint, fly_org_parameter=org_parameter))

    with pytest.raises(ApplicationError) as caught:
        await store.org_slug()
    assert (caught.value.type, caught.value.non_retryable) == ("CredentialsInvalid", True)


async def test_resolve_credentials_reports_everything_but_the_token(
    ssm_endpoint: str, ssm: Any, prefix: str, fly_token: str, debug_logs: pytest.LogCaptureFixture
) -> None:
    token_parameter, org_parameter = f"{prefix}/token", f"{prefix}/org"
    ssm.put_parameter(Name=token_parameter, Value="fo1_v1", Type="SecureString")
    ssm.put_parameter(Name=token_parameter, Value=fly_token, Type="SecureString", Overwrite=True)
    ssm.put_parameter(Name=org_parameter, Value="acme-inc", Type="String")
    debug_logs.clear()  # seeding logged the value it sent; only the store's logs count
    store = CredentialStore(
        ssm_settings(
            ssm_endpoint, fly_token_parameter=token_parameter, fly_org_parameter=org_parameter
        )
    )

    result = await ActivityEnvironment().run(CredentialActivities(store).resolve_credentials)

    assert (result.org_slug, result.token_parameter, result.token_version) == (
        "acme-inc",
        token_parameter,
        2,
    )
    payloads = pydantic_data_converter.payload_converter.to_payloads([result])
    serialized = b"".join(p.data for p in payloads)
    assert b'"token_parameter":"' + token_parameter.encode() in serialized
    secret_part = fly_token.split()[-1]
    assert secret_part.encode() not in serialized
    assert secret_part not in debug_logs.text
