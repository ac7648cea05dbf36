"""`turbodeploy demo`: the main job, on its own local stack, leaves no token behind, says
what stays and what is gone, and with `--keep` prints commands that work as printed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.processes import ProcessRecord
from turbodeploy import embedded

ROOT = Path(__file__).resolve().parent.parent

# Runs in a child process: moto keeps its state per process, and the demo's stack must not
# share it with the test session's. The token arrives on stdin, never in argv.
_RUN_DEMO = """
import asyncio, json, sys
from pathlib import Path
from turbodeploy.demo import run_demo
token = sys.stdin.readline().strip()
outcome = asyncio.run(run_demo(
    Path(sys.argv[1]), project_id="nitro-hello",
    image="registry.fly.io/turbobackend-nitro-hello:demo",
    keep=False, ui_port=int(sys.argv[2]), temporal_port=0, flysim_port=0, token=token,
))
print("OUTCOME " + json.dumps(outcome))
"""


def test_demo_deploys_the_example_and_leaves_no_token_behind(tmp_path: Path) -> None:
    token = embedded.generate_fly_token()
    state_dir = tmp_path / ".turbodeploy"
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_DEMO, str(state_dir), str(embedded.free_port())],
        input=token + "\n",
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's code, from any cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("OUTCOME ")]
    outcome = json.loads(line.removeprefix("OUTCOME "))
    assert outcome["status"] == "deployed"
    assert outcome["url"].endswith("/_apps/turbobackend-nitro-hello")
    assert outcome["machine_ids"]
    assert "URL:" in proc.stdout and "Temporal UI:" in proc.stdout
    # The row the deploy recorded, as PostgreSQL holds it.
    assert "recorded row:" in proc.stdout
    assert '"status": "deployed"' in proc.stdout
    # What is gone and what stays, said when it returns; and nothing left running.
    assert "the URL and the Temporal UI link above no longer answer" in proc.stdout
    assert f"Kept under {state_dir.resolve()}" in proc.stdout
    assert "stopped: worker, flysim, ssm, postgres, temporal" in proc.stdout
    assert not (state_dir / "run" / "stack.json").exists()

    # Temporal's database, PostgreSQL's files, the repositories, every log and the output.
    files = [p for p in state_dir.rglob("*") if p.is_file()]
    assert any(p.name == "temporal.db" for p in files)
    assert any("postgres" in p.parts for p in files)
    secret = token.split("fm2_", 1)[1].encode()
    leaked = [str(p) for p in files if secret[:32] in p.read_bytes()]
    assert leaked == []
    assert secret[:32].decode() not in proc.stdout + proc.stderr


def test_demo_keep_prints_commands_that_work_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    state_dir = tmp_path / ".turbodeploy"
    out_path = tmp_path / "demo.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    argv = [
        sys.executable,
        "-m",
        "turbodeploy.cli",
        "demo",
        "--keep",
        "--state-dir",
        str(state_dir),
        "--ui-port",
        "0",
        "--temporal-port",
        "0",
        "--flysim-port",
        "0",
    ]
    with open(out_path, "wb") as out:
        demo = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=tmp_path,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while "press Ctrl-C to stop" not in out_path.read_text():
                assert demo.poll() is None, out_path.read_text()
                assert time.monotonic() < deadline, out_path.read_text()
                time.sleep(0.2)
            text = out_path.read_text()
            lines = text.splitlines()
            exports = [x.strip() for x in lines if x.strip().startswith("export ")]
            names = {x.removeprefix("export ").split("=", 1)[0] for x in exports}
            assert {"TURBODEPLOY_TEMPORAL_ADDRESS", "TURBODEPLOY_TEMPORAL_UI_URL",
                    "DATABASE_URL", "AWS_ENDPOINT_URL", "TURBODEPLOY_FLY_API_BASE_URL",
                    "TEMPORAL_ADDRESS"} <= names  # fmt: skip
            for label in ("Temporal:", "Temporal UI:", "PostgreSQL:", "SSM (moto):", "Fly API:"):
                assert any(x.startswith(label) for x in lines), label
            start = next(i for i, x in enumerate(lines) if x.startswith("Then try")) + 1
            commands = []
            for line in lines[start:]:
                if not line.startswith("  "):
                    break
                commands.append(line.strip())
            assert any(" status nitro-hello" in c for c in commands)
            assert any(" workflow list --address " in c for c in commands)
            # Every command as printed, in a shell that ran the printed export lines and
            # has nothing else of the stack's: no AWS credentials of its own either.
            shell_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
            for command in commands:
                done = subprocess.run(
                    ["bash", "-c", "\n".join([*exports, command])],
                    capture_output=True, text=True, timeout=60, env=shell_env, cwd=tmp_path,
                )  # fmt: skip
                assert done.returncode == 0, (command, done.stdout, done.stderr)
                if " status " in command or " workflow list " in command:
                    assert "deploy" in done.stdout.lower(), (command, done.stdout)

            records = {
                name: ProcessRecord.from_json(c)
                for name, c in json.loads((state_dir / "run" / "stack.json").read_text())[
                    "components"
                ].items()
            }
            assert set(records) == {"temporal", "postgres", "ssm", "flysim", "worker"}
            demo.send_signal(signal.SIGINT)  # Ctrl-C
            demo.wait(timeout=120)
        finally:
            if demo.poll() is None:  # a failed assertion: stop the stack it started too
                demo.send_signal(signal.SIGINT)
                try:
                    demo.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    demo.kill()
                    demo.wait()
    deadline = time.monotonic() + 30
    while any(r.alive() for r in records.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {n: r.pid for n, r in records.items() if r.alive()} == {}  # PostgreSQL too
    assert "stopped: worker, flysim, ssm, postgres, temporal" in out_path.read_text()
