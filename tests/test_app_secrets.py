"""App secrets by reference: values from moto's SSM, set on the emulator's app, seen by its
machines, and shown nowhere else."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from harness import ssm_settings
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.app_secrets import (
    AppSecretActivities,
    AppSecretsInput,
    AppSecretsResult,
    RestoreSecretsInput,
    RestoreSecretsResult,
)
from activities.secrets import CredentialStore
from core.models import SecretVersion
from core.settings import Settings
from flyapi import FlyClient, FlyNotFound
from turbodeploy import embedded

IMAGE = "registry.fly.io/secrets-test:1"


@pytest.fixture
def activities(
    fly: FlyClient, credentials: CredentialStore, settings: Settings
) -> AppSecretActivities:
    return AppSecretActivities(fly, credentials, settings)


@pytest.fixture
def prefix() -> str:
    return f"/apps/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Everything logged at DEBUG: botocore's and httpx's wire logs included."""
    caplog.set_level(logging.DEBUG)
    yield caplog


def _value() -> str:
    """A secret value no other text of the run could contain by chance."""
    return f"postgres://app:{uuid.uuid4().hex}@db.internal:5432/app"


async def _machine(fly: FlyClient, app: str) -> str:
    machine = await fly.create_machine(app, {"image": IMAGE, "env": {"PLAIN": "yes"}}, "iad")
    return machine.id


async def test_secrets_reach_new_machines_and_no_value_shows_anywhere(
    activities: AppSecretActivities,
    fly: FlyClient,
    flysim: Any,
    ssm: Any,
    prefix: str,
    app: str,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    database_url, api_key = _value(), _value()
    ssm.put_parameter(Name=f"{prefix}/db", Value=database_url, Type="SecureString")
    ssm.put_parameter(Name=f"{prefix}/key", Value="old", Type="SecureString")
    ssm.put_parameter(Name=f"{prefix}/key", Value=api_key, Type="SecureString", Overwrite=True)
    before = await _machine(fly, app)
    debug_logs.clear()  # the seeding above logged its own request bodies
    heartbeats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: heartbeats.append(details)
    request = AppSecretsInput(
        app_name=app,
        secrets={"DATABASE_URL": f"{prefix}/db", "API_KEY": f"{prefix}/key"},
    )

    result = await env.run(activities.set_app_secrets, request)

    assert result == AppSecretsResult(
        secrets=[
            SecretVersion(name="API_KEY", parameter=f"{prefix}/key", version=2),
            SecretVersion(name="DATABASE_URL", parameter=f"{prefix}/db", version=1),
        ],
        added=["API_KEY", "DATABASE_URL"],
        secrets_version=flysim.snapshot()["secrets"][app]["version"],
    )
    listed = {s.name: s.digest for s in await fly.list_secrets(app)}
    assert set(listed) == {"API_KEY", "DATABASE_URL"}
    assert all(listed.values())

    # A machine booted after the secrets were set has them; one booted before gets them
    # at its next boot. The config the API returns never holds them.
    after = await _machine(fly, app)
    runtime = flysim.machine_runtime_env(app, after)
    assert runtime == {"PLAIN": "yes", "DATABASE_URL": database_url, "API_KEY": api_key}
    assert "DATABASE_URL" not in flysim.machine_runtime_env(app, before)
    machine_json = (await fly.get_machine(app, after)).model_dump_json()

    snapshot = flysim.snapshot()
    assert snapshot["secrets"][app]["secrets"] == [
        {"name": "API_KEY", "digest": listed["API_KEY"]},
        {"name": "DATABASE_URL", "digest": listed["DATABASE_URL"]},
    ]
    async with httpx.AsyncClient() as http:
        state = (await http.get(flysim.base_url.replace("/v1", "/_sim/state"))).text
    assert app in state
    texts = {
        "result": result.model_dump_json(),
        "heartbeats": repr(heartbeats),
        "logs": debug_logs.text,
        "snapshot": json.dumps(snapshot),
        "/_sim/state": state,
        "request log": repr(flysim.request_log),
        "machine config": machine_json,
        "listing": repr(await fly.list_secrets(app)),
        "vault": repr(flysim.secrets),
    }
    assert heartbeats and debug_logs.records
    for where, text in texts.items():
        for value in (database_url, api_key):
            assert value not in text, f"a secret value appears in the {where}"
            assert value.split(":")[2].split("@")[0] not in text, where

    # A retried attempt changes nothing: same versions, same secrets version; and it
    # claims to have added nothing, so a rollback never removes what it cannot tell apart.
    version = snapshot["secrets"][app]["version"]
    again = await env.run(activities.set_app_secrets, request)
    assert (again.secrets, again.added) == (result.secrets, [])
    assert flysim.snapshot()["secrets"][app]["version"] == version
    assert {s.name: s.digest for s in await fly.list_secrets(app)} == listed


async def test_a_machine_sees_secrets_from_its_next_boot(
    activities: AppSecretActivities, fly: FlyClient, flysim: Any, ssm: Any, prefix: str,
    app: str,
) -> None:  # fmt: skip
    value = _value()
    ssm.put_parameter(Name=f"{prefix}/token", Value=value, Type="SecureString")
    machine = await _machine(fly, app)
    await ActivityEnvironment().run(
        activities.set_app_secrets,
        AppSecretsInput(app_name=app, secrets={"TOKEN": f"{prefix}/token"}),
    )
    assert "TOKEN" not in flysim.machine_runtime_env(app, machine)

    current = await fly.get_machine(app, machine)
    await fly.update_machine(app, machine, current.config, None, nonce=None)
    assert flysim.machine_runtime_env(app, machine)["TOKEN"] == value


async def test_restore_sets_recorded_versions_and_removes_only_present_names(
    activities: AppSecretActivities, fly: FlyClient, flysim: Any, ssm: Any, prefix: str,
    app: str, debug_logs: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    first, second = _value(), _value()
    ssm.put_parameter(Name=f"{prefix}/db", Value=first, Type="SecureString")
    ssm.put_parameter(Name=f"{prefix}/db", Value=second, Type="SecureString", Overwrite=True)
    await fly.set_secrets(app, {"DATABASE_URL": second, "ADDED": "x"})
    debug_logs.clear()
    # Two names from one parameter version: both are set from a single read.
    wanted = [
        SecretVersion(name="DATABASE_URL", parameter=f"{prefix}/db", version=1),
        SecretVersion(name="READ_URL", parameter=f"{prefix}/db", version=1),
    ]
    request = RestoreSecretsInput(app_name=app, secrets=wanted, remove=["ADDED", "GONE"])

    result = await ActivityEnvironment().run(activities.restore_app_secrets, request)

    assert result == RestoreSecretsResult(
        restored=wanted,
        removed=["ADDED"],
        # What machines restored after it must boot with: the version after the restore.
        secrets_version=flysim.snapshot()["secrets"][app]["version"],
    )
    machine = await _machine(fly, app)
    runtime = flysim.machine_runtime_env(app, machine)
    assert (runtime["DATABASE_URL"], runtime["READ_URL"]) == (first, first)
    assert "ADDED" not in runtime
    for text in (result.model_dump_json(), debug_logs.text):
        assert first not in text and second not in text
    # Repeating it changes nothing.
    version = flysim.snapshot()["secrets"][app]["version"]
    again = await ActivityEnvironment().run(activities.restore_app_secrets, request)
    assert again.removed == [] and flysim.snapshot()["secrets"][app]["version"] == version


async def test_restoring_a_version_ssm_no_longer_has_fails_for_good(
    activities: AppSecretActivities, fly: FlyClient, ssm: Any, prefix: str, app: str
) -> None:
    ssm.put_parameter(Name=f"{prefix}/db", Value=_value(), Type="SecureString")
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            activities.restore_app_secrets,
            RestoreSecretsInput(
                app_name=app,
                secrets=[SecretVersion(name="DB", parameter=f"{prefix}/db", version=7)],
                remove=["OTHER"],
            ),
        )
    assert (caught.value.type, caught.value.non_retryable) == ("SecretMissing", True)
    assert f"{prefix}/db has no version 7" in str(caught.value)
    assert await fly.list_secrets(app) == []


async def test_a_missing_parameter_fails_for_good_and_sets_nothing(
    activities: AppSecretActivities, fly: FlyClient, ssm: Any, prefix: str, app: str
) -> None:
    present = _value()
    ssm.put_parameter(Name=f"{prefix}/present", Value=present, Type="SecureString")

    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            activities.set_app_secrets,
            AppSecretsInput(
                app_name=app,
                secrets={"PRESENT": f"{prefix}/present", "ABSENT": f"{prefix}/absent"},
            ),
        )

    error = caught.value
    assert (error.type, error.non_retryable) == ("SecretMissing", True)
    assert f"{prefix}/absent" in str(error) and "ABSENT" in str(error)
    assert f"{prefix}/present" not in str(error)
    assert present not in str(error)
    assert await fly.list_secrets(app) == []


async def test_ssm_being_down_is_retryable(
    fly: FlyClient, credentials: CredentialStore, app: str
) -> None:
    settings = ssm_settings(f"http://127.0.0.1:{embedded.free_port()}")
    activities = AppSecretActivities(fly, credentials, settings)
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            activities.set_app_secrets,
            AppSecretsInput(app_name=app, secrets={"TOKEN": "/apps/x/token"}),
        )
    assert (caught.value.type, caught.value.non_retryable) == ("SecretsUnavailable", False)


async def test_an_unknown_app_fails_for_good_without_echoing_a_value(
    activities: AppSecretActivities, fly: FlyClient, ssm: Any, prefix: str
) -> None:
    # The emulator names the app in its 404; here the value is that very name.
    missing_app = f"turbobackend-m{uuid.uuid4().hex[:12]}"
    ssm.put_parameter(Name=f"{prefix}/echo", Value=missing_app, Type="SecureString")
    with pytest.raises(ApplicationError) as caught:
        await ActivityEnvironment().run(
            activities.set_app_secrets,
            AppSecretsInput(app_name=missing_app, secrets={"ECHO": f"{prefix}/echo"}),
        )
    assert (caught.value.type, caught.value.non_retryable) == ("FlyNotFound", True)
    # The activity found the app missing before sending a value; the client's own
    # request, which carries it, has the echo redacted.
    with pytest.raises(FlyNotFound) as echoed:
        await fly.set_secrets(missing_app, {"ECHO": missing_app})
    assert "404 app not found: [redacted]" in str(echoed.value)
    assert missing_app not in str(echoed.value)


async def test_nothing_to_set_makes_no_call(activities: AppSecretActivities, flysim: Any) -> None:
    calls = len(flysim.request_log)
    result = await ActivityEnvironment().run(
        activities.set_app_secrets, AppSecretsInput(app_name="turbobackend-none", secrets={})
    )
    assert result == AppSecretsResult()
    assert len(flysim.request_log) == calls


# ------------------------------------------------------------------ the emulator's API


async def test_secrets_api_sets_lists_and_removes_by_name(
    fly: FlyClient, flysim: Any, app: str, fly_token: str
) -> None:
    value = _value()
    assert await fly.set_secrets(app, {"ONE": value, "TWO": "2"}) == 1
    assert await fly.set_secrets(app, {"ONE": value}) == 1  # unchanged: same version
    assert await fly.unset_secret(app, "TWO") == 2
    assert await fly.unset_secret(app, "TWO") is None
    assert [s.name for s in await fly.list_secrets(app)] == ["ONE"]

    headers = {"Authorization": f"Bearer {fly_token}"}
    base = f"{flysim.base_url}/apps/{app}/secrets"
    async with httpx.AsyncClient(headers=headers) as http:
        one = await http.post(f"{base}/THREE", json={"value": "3"})
        assert one.status_code == 201 and one.json()["version"] == 3
        assert one.json()["name"] == "THREE" and "value" not in one.json()
        shown = await http.get(f"{base}/THREE")
        assert shown.status_code == 200
        assert set(shown.json()) == {"name", "digest", "created_at", "updated_at"}
        assert (await http.get(base, params={"show_secrets": "true"})).status_code == 403
        old = await http.get(base, params={"version": "1"})
        assert [s["name"] for s in old.json()["secrets"]] == ["ONE", "TWO"]
        bulk = await http.post(base, json={"values": {"ONE": None, "FOUR": "4"}})
        assert [s["name"] for s in bulk.json()["secrets"]] == ["FOUR", "THREE"]
        bad = await http.post(base, json={"values": {"FIVE": 5}})
        assert bad.status_code == 400 and "FIVE" in bad.json()["error"]
        assert (await http.post(base, json={"values": {"1X": "v"}})).status_code == 400
        assert (await http.delete(f"{base}/NOPE")).status_code == 404
        assert (await http.get(f"{base}/NOPE")).status_code == 404
    assert value not in json.dumps(flysim.snapshot())

    with pytest.raises(FlyNotFound):
        await fly.list_secrets(f"{app}-gone")
    # A deleted app's secrets go with it: a new app of the same name starts empty.
    await fly.delete_app(app)
    await fly.create_app(app, "personal")
    assert await fly.list_secrets(app) == []
