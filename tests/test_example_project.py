"""The example project is a Nitro.js backend as the code-generation platform produces it.

Read as files only: building it needs npm and the network, which the suite does not use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parents[1] / "examples" / "nitro-hello"


@pytest.fixture(scope="module")
def package() -> dict[str, Any]:
    data = json.loads((PROJECT / "package.json").read_text())
    assert isinstance(data, dict)
    return data


def test_package_builds_and_serves_with_nitro(package: dict[str, Any]) -> None:
    dependencies = {**package.get("dependencies", {}), **package.get("devDependencies", {})}
    assert "nitropack" in dependencies
    scripts = package["scripts"]
    assert scripts["build"] == "nitro build"
    assert scripts["dev"].startswith("nitro dev")
    # What a container runs after `npm run build`: the self-contained server bundle.
    assert scripts["start"] == "node .output/server/index.mjs"
    assert scripts["preview"] == scripts["start"]
    assert package.get("type") == "module"


def test_nitro_finds_the_routes_under_its_source_dir() -> None:
    config = (PROJECT / "nitro.config.ts").read_text()
    assert "defineNitroConfig" in config
    src_dir = re.search(r"srcDir:\s*[\"']([^\"']+)[\"']", config)
    root = PROJECT / (src_dir[1] if src_dir else ".")
    assert (root / "api" / "health.get.ts").is_file()
    assert (root / "routes" / "index.ts").is_file()
    assert json.loads((PROJECT / "tsconfig.json").read_text())["extends"].startswith("./.nitro/")


@pytest.mark.parametrize("route", ["api/health.get.ts", "routes/index.ts"])
def test_route_files_export_an_event_handler(route: str) -> None:
    source = (PROJECT / "server" / route).read_text()
    assert re.search(r"export\s+default\s+defineEventHandler\(", source), route


def test_health_route_answers_status_ok() -> None:
    source = (PROJECT / "server" / "api" / "health.get.ts").read_text()
    assert re.search(r"\{\s*status:\s*[\"']ok[\"']\s*\}", source)


def test_project_leaves_deployment_files_to_the_deployer() -> None:
    files = [p.relative_to(PROJECT).as_posix() for p in PROJECT.rglob("*") if p.is_file()]
    assert not [f for f in files if Path(f).name in {"fly.toml", "Dockerfile"}]
    assert not [f for f in files if f.startswith(("node_modules/", ".output/", ".nitro/"))]
    assert "README.md" in files
