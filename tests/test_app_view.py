"""`turbodeploy app` and `turbodeploy logs`: the app as Fly sees it and its logs, read from
the emulator with the token resolved from SSM as the worker resolves it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from typing import Any

import httpx
import pytest

from core.models import app_name_for
from core.settings import Settings
from flyapi import FlyClient
from flysim.logs import PAGE_SIZE
from turbodeploy.flyview import app_status, read_logs

IMAGE = "registry.fly.io/turbobackend-view:deployment-1"
BROKEN = "registry.fly.io/turbobackend-view:deployment-broken"
SERVICE = {
    "protocol": "tcp",
    "internal_port": 3000,
    "autostart": False,
    "ports": [{"port": 80, "handlers": ["http"]}],
    "checks": [{"type": "http", "path": "/api/health", "method": "GET"}],
}


@pytest.fixture(autouse=True)
def _broken(calm_emulator: Any) -> None:
    calm_emulator.config.unhealthy_images.add(BROKEN)


async def _machine(fly: FlyClient, app: str, image: str = IMAGE) -> str:
    machine = await fly.create_machine(app, {"image": image, "services": [SERVICE]}, "iad")
    assert await fly.wait_machine(app, machine.id, "started", timeout=10)
    return machine.id


async def _project_app(fly: FlyClient) -> tuple[str, str]:
    project = f"v{uuid.uuid4().hex[:10]}"
    app = app_name_for(project)
    await fly.create_app(app, "personal")
    await fly.assign_ip(app, "v6")
    return project, app


async def test_status_of_a_healthy_a_stopped_and_a_half_failed_app(
    fly: FlyClient, flysim: Any
) -> None:
    _, app = await _project_app(fly)
    one, two = await _machine(fly, app), await _machine(fly, app)
    volume = await fly.create_volume(app, "data", "iad", 1)
    url = flysim.app_url(app)

    healthy = await app_status(fly, app, url)
    assert healthy.exists and healthy.healthy
    assert {m.id for m in healthy.machines} == {one, two}
    assert {m.state for m in healthy.machines} == {"started"}
    assert all(m.image == IMAGE and m.region == "iad" for m in healthy.machines)
    assert all(c.status == "passing" for m in healthy.machines for c in m.checks)
    assert all(m.last_event == "start → started" and m.last_event_at for m in healthy.machines)
    assert [ip["ip"] for ip in healthy.ips] and healthy.volumes[0]["id"] == volume.id

    for machine in (one, two):
        await fly.stop_machine(app, machine)
        assert await fly.wait_machine(app, machine, "stopped", timeout=10)
    stopped = await app_status(fly, app, url)
    assert {m.state for m in stopped.machines} == {"stopped"}
    assert {m.last_event for m in stopped.machines} == {"exit → stopped"}
    assert not stopped.healthy and stopped.health_status == 503

    await fly.start_machine(app, one)
    assert await fly.wait_machine(app, one, "started", timeout=10)
    three = await _machine(fly, app, BROKEN)
    half = await app_status(fly, app, url)
    states = {m.id: (m.state, [c.status for c in m.checks]) for m in half.machines}
    assert states[one] == ("started", ["passing"])
    assert states[two] == ("stopped", ["critical"])
    assert states[three] == ("started", ["critical"])
    assert half.healthy, "the proxy still routes to the healthy machine"

    gone = await app_status(fly, "turbobackend-nothing-here", url)
    assert not gone.exists and gone.machines == []


async def test_logs_page_through_every_line_and_filter_by_machine(
    fly: FlyClient, flysim: Any
) -> None:
    _, app = await _project_app(fly)
    one, two = await _machine(fly, app), await _machine(fly, app)
    async with httpx.AsyncClient(base_url=flysim.app_url(app), timeout=10) as http:
        for i in range(PAGE_SIZE + 20):
            assert (await http.get(f"/api/items/{i}?token=s3cret")).status_code == 200

    first = await fly.get_app_logs(app)
    assert len(first.entries) == PAGE_SIZE and first.next_token
    entries = [e async for e in read_logs(fly, app)]
    requests = [e for e in entries if e.message.startswith("GET /api/items/")]
    assert len(requests) == PAGE_SIZE + 20
    assert [int(e.message.split("/")[3].split()[0]) for e in requests] == list(
        range(PAGE_SIZE + 20)
    )
    assert not any("s3cret" in e.message or "s3cret" in json.dumps(e.meta) for e in entries)
    boots = [
        e.message for e in entries if e.instance == one and e.meta["event"]["provider"] == "runner"
    ]
    assert f"Pulling container image {IMAGE}" in boots
    assert any("is now passing" in m for m in boots)
    assert any(e.message == "Listening on http://[::]:3000" for e in entries)
    assert [e.timestamp for e in entries] == sorted(e.timestamp for e in entries)

    only_two = [e async for e in read_logs(fly, app, machine=two)]
    assert only_two and {e.instance for e in only_two} == {two}

    # Polling with the last token gives nothing new until something happens.
    last = (await fly.get_app_logs(app, next_token=first.next_token)).next_token
    tail = await fly.get_app_logs(app, next_token=last)
    while tail.entries:
        last = tail.next_token
        tail = await fly.get_app_logs(app, next_token=last)
    await fly.stop_machine(app, two)
    assert await fly.wait_machine(app, two, "stopped", timeout=10)
    new = await fly.get_app_logs(app, next_token=last)
    assert [e.message for e in new.entries] == [
        "Sending signal SIGINT to main child process",
        "Main child exited normally with code: 0",
    ]


def _cli_env(settings: Settings, ssm_endpoint: str, flysim: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURBODEPLOY_")}
    env.update(
        TURBODEPLOY_FLY_API_BASE_URL=flysim.base_url,
        TURBODEPLOY_APP_URL_TEMPLATE=flysim.app_url_template,
        AWS_ENDPOINT_URL=ssm_endpoint,
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    return env


async def test_the_cli_shows_the_app_and_follows_its_logs_until_ctrl_c(
    fly: FlyClient, flysim: Any, settings: Settings, ssm_endpoint: str, fly_token: str
) -> None:
    project, app = await _project_app(fly)
    machine = await _machine(fly, app)
    env = _cli_env(settings, ssm_endpoint, flysim)

    shown = subprocess.run(
        [sys.executable, "-m", "turbodeploy.cli", "app", project, "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert view["healthy"] and [m["id"] for m in view["machines"]] == [machine]
    assert fly_token not in shown.stdout + shown.stderr

    proc = subprocess.Popen(
        [sys.executable, "-m", "turbodeploy.cli", "logs", project, "--follow", "--since", "10m"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        while not any("Listening on" in line for line in lines):
            lines.append(proc.stdout.readline())
        # A request made while it follows shows up without restarting it.
        httpx.get(flysim.app_url(app) + "/api/hello", timeout=10)
        while not any("GET /api/hello 200" in line for line in lines):
            lines.append(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and fly_token not in "".join(lines) + out + err
    assert any(f"app[{machine}] iad [info] GET /api/hello 200" in line for line in lines)
