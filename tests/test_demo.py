"""`turbodeploy demo`: the main job, on its own embedded stack, leaves no token behind."""

from __future__ import annotations

from pathlib import Path

from turbodeploy import embedded
from turbodeploy.demo import run_demo


async def test_demo_deploys_the_example_and_leaves_no_token_behind(tmp_path: Path) -> None:
    token = embedded.generate_fly_token()
    state_dir = tmp_path / ".turbodeploy"
    outcome = await run_demo(
        state_dir,
        project_id="nitro-hello",
        image="registry.fly.io/turbobackend-nitro-hello:demo",
        keep=False,
        ui_port=embedded.free_port(),
        token=token,
    )
    assert outcome["status"] == "deployed"
    assert outcome["url"].endswith("/_apps/turbobackend-nitro-hello")
    assert outcome["machine_ids"]

    # Temporal's database, PostgreSQL's files, the repositories and every log.
    files = [p for p in state_dir.rglob("*") if p.is_file()]
    assert any(p.name == "temporal.db" for p in files)
    assert any("postgres" in p.parts for p in files)
    secret = token.split("fm2_", 1)[1].encode()
    leaked = [str(p) for p in files if secret in p.read_bytes() or secret[:32] in p.read_bytes()]
    assert leaked == []
