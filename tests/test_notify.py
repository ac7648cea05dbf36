"""notify_deployment against a real HTTP receiver on loopback, the key from moto's SSM."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from harness import ssm_settings
from temporalio import workflow
from temporalio.client import Client, WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.notify import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    CallbackKeys,
    NotifyActivities,
    NotifyInput,
    NotifyResult,
    sign,
    verify_signature,
)
from core.models import DeploymentNotice, DeployStatus
from turbodeploy import embedded


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """A minimal HTTP/1.1 server: answers each request with the next scripted status."""

    script: list[tuple[int, dict[str, str]]]
    default: int = 200
    deliveries: list[Delivery] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/hooks/deploys"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")[1:]
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        status, extra = self.script.pop(0) if self.script else (self.default, {})
        self.deliveries.append(Delivery(headers, body, status))
        text = b"nope" if status >= 300 else b"ok"
        response = [f"HTTP/1.1 {status} X", f"Content-Length: {len(text)}", "Connection: close"]
        response += [f"{k}: {v}" for k, v in extra.items()]
        writer.write(("\r\n".join(response) + "\r\n\r\n").encode() + text)
        await writer.drain()
        writer.close()

    @property
    def accepted(self) -> list[Delivery]:
        return [d for d in self.deliveries if 200 <= d.answered < 300]


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(script=[])
    r.server = await asyncio.start_server(r._handle, "127.0.0.1", 0)
    yield r
    r.server.close()
    await r.server.wait_closed()


@pytest.fixture
def key() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture
def key_parameter(ssm: Any, key: str) -> str:
    name = f"/t-{uuid.uuid4().hex[:10]}/callbacks/hmac_key"
    ssm.put_parameter(Name=name, Value=key, Type="SecureString")
    return name


@pytest_asyncio.fixture
async def notifier(ssm_endpoint: str, key_parameter: str) -> AsyncIterator[NotifyActivities]:
    settings = ssm_settings(ssm_endpoint)
    acts = NotifyActivities(settings, keys=CallbackKeys(settings, parameter=key_parameter))
    yield acts
    await acts.aclose()


def notice(**overrides: Any) -> DeploymentNotice:
    fields: dict[str, Any] = {
        "deployment_id": f"d-{uuid.uuid4().hex[:8]}",
        "project_id": "p1",
        "app_name": "turbobackend-p1",
        "status": DeployStatus.DEPLOYED,
        "url": "https://turbobackend-p1.fly.dev",
        "commit_sha": "a" * 40,
        "image": "registry.fly.io/turbobackend-p1:d-1",
    }
    fields.update(overrides)
    return DeploymentNotice.model_validate(fields)


@workflow.defn(sandboxed=False)
class NotifyOnce:
    @workflow.run
    async def run(self, payload: NotifyInput) -> NotifyResult:
        return await workflow.execute_activity(
            "notify_deployment",
            payload,
            result_type=NotifyResult,
            schedule_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(milliseconds=50),
                backoff_coefficient=1.0,
                maximum_attempts=6,
            ),
        )


async def run_notify(
    client: Client, task_queue: str, notifier: NotifyActivities, payload: NotifyInput
) -> NotifyResult:
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[NotifyOnce],
        activities=[notifier.notify_deployment],
        workflow_runner=UnsandboxedWorkflowRunner(),
    ):
        return await client.execute_workflow(
            NotifyOnce.run, payload, id=f"notify-{uuid.uuid4().hex[:8]}", task_queue=task_queue
        )


async def test_retries_through_server_errors_then_delivers_once_signed(
    temporal_client: Client,
    task_queue: str,
    notifier: NotifyActivities,
    receiver: Receiver,
    key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.script = [(500, {}), (500, {})]
    sent = notice()
    result = await run_notify(
        temporal_client, task_queue, notifier, NotifyInput(callback_url=receiver.url, notice=sent)
    )

    assert result == NotifyResult(delivered=True, attempts=3, status_code=200)
    assert [d.answered for d in receiver.deliveries] == [500, 500, 200]
    [accepted] = receiver.accepted
    assert accepted.headers[DELIVERY_HEADER.lower()] == sent.deployment_id
    assert accepted.headers["content-type"] == "application/json"
    assert verify_signature(key.encode(), accepted.headers[SIGNATURE_HEADER.lower()], accepted.body)
    assert DeploymentNotice.model_validate(json.loads(accepted.body)) == sent
    # Every attempt carries the same delivery id, so a receiver can drop duplicates.
    assert {d.headers[DELIVERY_HEADER.lower()] for d in receiver.deliveries} == {sent.deployment_id}
    assert key not in caplog.text
    assert all(key not in json.dumps(d.headers) for d in receiver.deliveries)


async def test_client_error_is_not_retried(
    temporal_client: Client,
    task_queue: str,
    notifier: NotifyActivities,
    receiver: Receiver,
    key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    receiver.script = [(400, {})]
    with pytest.raises(WorkflowFailureError) as info:
        await run_notify(
            temporal_client,
            task_queue,
            notifier,
            NotifyInput(callback_url=receiver.url, notice=notice()),
        )
    assert isinstance(info.value.cause, ActivityError)
    cause = info.value.cause.cause
    assert isinstance(cause, ApplicationError)
    assert cause.type == "CallbackRejected"
    assert cause.non_retryable
    assert "400" in cause.message and "nope" in cause.message
    assert len(receiver.deliveries) == 1
    assert key not in str(cause) and key not in caplog.text


async def test_retry_after_sets_the_next_delay(
    notifier: NotifyActivities, receiver: Receiver
) -> None:
    receiver.script = [(429, {"Retry-After": "7"}), (503, {})]
    env = ActivityEnvironment()
    payload = NotifyInput(callback_url=receiver.url, notice=notice())
    with pytest.raises(ApplicationError) as first:
        await env.run(notifier.notify_deployment, payload)
    assert first.value.type == "CallbackUnavailable"
    assert not first.value.non_retryable
    assert first.value.next_retry_delay == timedelta(seconds=7)
    with pytest.raises(ApplicationError) as second:
        await env.run(notifier.notify_deployment, payload)
    assert not second.value.non_retryable
    assert second.value.next_retry_delay is None


async def test_unreachable_receiver_is_retryable_and_hides_url_credentials(
    notifier: NotifyActivities,
) -> None:
    url = f"http://user:pw@127.0.0.1:{embedded.free_port()}/hook?token=abc123"
    with pytest.raises(ApplicationError) as info:
        await ActivityEnvironment().run(
            notifier.notify_deployment, NotifyInput(callback_url=url, notice=notice())
        )
    assert info.value.type == "CallbackUnavailable"
    assert not info.value.non_retryable
    assert "127.0.0.1" in info.value.message
    assert "abc123" not in info.value.message and "pw" not in info.value.message
    assert info.value.__cause__ is None


async def test_missing_key_parameter_is_not_retryable(
    ssm_endpoint: str, receiver: Receiver
) -> None:
    settings = ssm_settings(ssm_endpoint)
    acts = NotifyActivities(settings, keys=CallbackKeys(settings, parameter="/t-none/key"))
    try:
        with pytest.raises(ApplicationError) as info:
            await ActivityEnvironment().run(
                acts.notify_deployment, NotifyInput(callback_url=receiver.url, notice=notice())
            )
    finally:
        await acts.aclose()
    assert info.value.type == "CallbackKeyMissing"
    assert info.value.non_retryable
    assert receiver.deliveries == []


def test_verify_signature() -> None:
    key, body = b"k" * 32, b'{"a":1}'
    now = int(time.time())
    header = sign(key, body, now)
    assert verify_signature(key, header, body)
    assert not verify_signature(key, header, body + b" ")
    assert not verify_signature(b"other", header, body)
    # Replays outside the tolerance are rejected, however valid the digest.
    assert not verify_signature(key, header, body, now=now + 301)
    assert verify_signature(key, header, body, now=now + 299)
    old = sign(b"old-key", body, now).split(",")[1]
    assert verify_signature(key, f"{header},{old}", body)
    for bad in ("", "t=,v1=", f"v1={header.split('v1=')[1]}", f"t={now}", "garbage"):
        assert not verify_signature(key, bad, body)
