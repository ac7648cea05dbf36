"""`python -m flysim` options: what config they build, what they refuse, and a served run."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import pytest

from flysim import Faults, SimConfig, SimTiming
from flysim.cli import build_config, build_parser, config_patch, main
from turbodeploy import embedded

TOKEN = embedded.generate_fly_token()
BROKEN = "registry.fly.io/demo:broken"


def parsed(*argv: str) -> SimConfig:
    return build_config(build_parser().parse_args(list(argv)), {TOKEN: "personal"})


def test_no_options_keep_the_model_defaults() -> None:
    config = parsed()
    assert config.timing == SimTiming()
    assert config.faults == Faults()
    assert config.unhealthy_images == set()
    assert config.rate_limit_rps is None
    assert config.tokens == {TOKEN: "personal"}


def test_every_option_sets_its_config_field() -> None:
    argv = [
        "--api-latency", "0.05", "--create-delay", "0.1", "--start-delay", "0.2",
        "--stop-delay", "0.3", "--healthy-after", "0.4", "--autostop-after", "5",
        "--lease-default-ttl", "12", "--proxy-wait-limit", "2",
        "--error-rate", "0.1", "--error-codes", "502, 503", "--rate-limit-rate", "0.2",
        "--retry-after", "3", "--latency-spike-rate", "0.3", "--latency-spike", "1.5",
        "--drop-rate", "0.05", "--fault-seed", "42", "--rate-limit-rps", "20",
        "--unhealthy-image", BROKEN, "--unhealthy-image", "other:1", "--unhealthy-image", BROKEN,
    ]  # fmt: skip
    args = build_parser().parse_args(argv)
    # The same body POST /_sim/config accepts.
    assert config_patch(args) == {
        "timing": {
            "api_latency": 0.05, "create_delay": 0.1, "start_delay": 0.2, "stop_delay": 0.3,
            "healthy_after": 0.4, "autostop_after": 5.0, "lease_default_ttl": 12.0,
            "proxy_wait_limit": 2.0,
        },
        "faults": {
            "error_rate": 0.1, "error_codes": [502, 503], "rate_limit_rate": 0.2,
            "retry_after": 3, "latency_spike_rate": 0.3, "latency_spike": 1.5,
            "drop_rate": 0.05, "seed": 42,
        },
        "rate_limit_rps": 20.0,
        "unhealthy_images": ["other:1", BROKEN],  # sorted, without repeats
    }  # fmt: skip
    config = build_config(args, {TOKEN: "personal"})
    assert config.timing == SimTiming(
        api_latency=0.05, create_delay=0.1, start_delay=0.2, stop_delay=0.3,
        healthy_after=0.4, autostop_after=5, lease_default_ttl=12, proxy_wait_limit=2,
    )  # fmt: skip
    assert config.faults == Faults(
        error_rate=0.1, error_codes=(502, 503), rate_limit_rate=0.2, retry_after=3,
        latency_spike_rate=0.3, latency_spike=1.5, drop_rate=0.05, seed=42,
    )  # fmt: skip
    assert config.rate_limit_rps == 20
    assert config.unhealthy_images == {BROKEN, "other:1"}

    # Applying the patch to a running config gives the same result.
    running = SimConfig(tokens={TOKEN: "personal"})
    running.apply(config_patch(args))
    assert running == config


def test_only_the_options_given_are_in_the_patch() -> None:
    args = build_parser().parse_args(["--drop-rate", "0", "--retry-after", "0"])
    assert config_patch(args) == {"faults": {"drop_rate": 0.0, "retry_after": 0}}


@pytest.mark.parametrize(
    "argv",
    [
        ["--start-delay", "-1"],
        ["--api-latency", "-0.1"],
        ["--autostop-after", "-5"],
        ["--latency-spike", "nan"],
        ["--lease-default-ttl", "0"],
        ["--error-rate", "1.5"],
        ["--drop-rate", "-0.1"],
        ["--rate-limit-rate", "2"],
        ["--latency-spike-rate", "x"],
        ["--retry-after", "1.5"],
        ["--retry-after", "-1"],
        ["--error-codes", "200"],
        ["--error-codes", "500,"],
        ["--rate-limit-rps", "0"],
        ["--fault-seed", "abc"],
    ],
)
def test_bad_values_are_refused_with_exit_code_2(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYSIM_TOKENS", TOKEN)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {argv[0]}:" in capsys.readouterr().err


def test_served_emulator_keeps_an_unhealthy_image_unhealthy() -> None:
    port = embedded.free_port()
    env = {**os.environ, "FLYSIM_TOKENS": f"{TOKEN}=personal"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flysim", "--port", str(port), "--unhealthy-image", BROKEN],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        embedded.wait_for_port("127.0.0.1", port, timeout=20)
        root = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=root, timeout=10) as control:
            assert control.get("/_sim/state").json()["config"]["unhealthy_images"] == [BROKEN]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=f"{root}/v1", headers=headers, timeout=10) as api:
            r = api.post("/apps", json={"name": "demo", "org_slug": "personal"})
            assert r.status_code == 201, r.text
            machine = api.post(
                "/apps/demo/machines", json={"region": "ams", "config": _config(BROKEN)}
            ).json()
            wait = api.get(
                f"/apps/demo/machines/{machine['id']}/wait",
                params={"state": "started", "timeout": 5},
            )
            assert wait.status_code == 200, wait.text
            checks = api.get(f"/apps/demo/machines/{machine['id']}").json()["checks"]
            assert checks and {c["status"] for c in checks} == {"critical"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _config(image: str) -> dict[str, Any]:
    return {
        "image": image,
        "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
        "services": [
            {
                "protocol": "tcp",
                "internal_port": 3000,
                "ports": [{"port": 80, "handlers": ["http"]}],
                "checks": [{"type": "http", "path": "/", "interval": "10s", "timeout": "2s"}],
            }
        ],
    }


def test_turbodeploy_flysim_passes_the_emulator_options_on() -> None:
    from click.testing import CliRunner

    from turbodeploy.cli import main as turbodeploy_main

    refused = CliRunner().invoke(turbodeploy_main, ["flysim", "--error-rate", "2"])
    assert refused.exit_code == 2
    # The emulator's own parser refused the value (not the CLI, for an unknown option).
    assert "flysim: error: argument --error-rate" in refused.output, refused.output
