"""`turbodeploy demo`: the main job, on its own embedded stack, leaves no token behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    keep=False, ui_port=int(sys.argv[2]), token=token,
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

    # Temporal's database, PostgreSQL's files, the repositories, every log and the output.
    files = [p for p in state_dir.rglob("*") if p.is_file()]
    assert any(p.name == "temporal.db" for p in files)
    assert any("postgres" in p.parts for p in files)
    secret = token.split("fm2_", 1)[1].encode()
    leaked = [str(p) for p in files if secret[:32] in p.read_bytes()]
    assert leaked == []
    assert secret[:32].decode() not in proc.stdout + proc.stderr
