"""The generated Dockerfile and .dockerignore, and when a deploy generates them."""

from __future__ import annotations

import re

import pytest

from core.dockerfile import (
    render_dockerfile,
    render_dockerignore,
    wants_generated_dockerfile,
)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a continuation line runs past the end of the file"
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(ins)
    return found


def test_rendering_is_deterministic() -> None:
    assert render_dockerfile() == render_dockerfile()
    assert render_dockerignore() == render_dockerignore()
    assert render_dockerfile().endswith("\n") and render_dockerignore().endswith("\n")


def test_it_is_a_multi_stage_node_20_build() -> None:
    text = render_dockerfile()
    assert text.startswith("# syntax=docker/dockerfile:1\n")
    assert ("ARG", "NODE_VERSION=20") in instructions(text)
    build, runtime = stages(text)
    assert build[0] == ("FROM", "node:${NODE_VERSION}-slim AS build")
    assert runtime[0] == ("FROM", "node:${NODE_VERSION}-slim")


def test_the_build_stage_installs_from_the_lockfile_then_builds() -> None:
    build, _ = stages(render_dockerfile())
    kinds = [k for k, _ in build]
    runs = [args for k, args in build if k == "RUN"]
    install, build_cmd = runs
    # Dependencies first (a cached layer), then the sources, then the build.
    assert kinds.index("COPY") < kinds.index("RUN")
    copies = [args for k, args in build if k == "COPY"]
    assert copies[0].split()[:3] == ["package.json", "package-lock.json*", "npm-shrinkwrap.json*"]
    assert copies[1] == ". ."
    # `npm ci` whenever a lockfile exists; `npm install` only without one.
    assert re.search(
        r"if \[ -f package-lock\.json \] \|\| \[ -f npm-shrinkwrap\.json \]; then\s+npm ci\b",
        install,
    )
    assert re.search(r"else\s+npm install\b", install)
    assert build_cmd == "npm run build"


def test_the_runtime_stage_runs_the_nitro_output_as_non_root() -> None:
    _, runtime = stages(render_dockerfile())
    assert ("ENV", "NODE_ENV=production PORT=3000") in [
        (k, " ".join(a.split())) for k, a in runtime
    ]
    assert ("EXPOSE", "3000") in runtime
    assert ("COPY", "--from=build --chown=node:node /app/.output ./.output") in runtime
    users = [a for k, a in runtime if k == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert runtime[-1] == ("CMD", '["node", ".output/server/index.mjs"]')
    # Only the build output reaches the runtime image: no sources, no node_modules.
    assert [a for k, a in runtime if k == "COPY"] == [
        "--from=build --chown=node:node /app/.output ./.output"
    ]
    assert not [a for k, a in runtime if k == "RUN"]


def test_dockerignore_keeps_local_builds_and_history_out() -> None:
    entries = [
        line
        for line in render_dockerignore().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in ("node_modules", ".output", ".git"):
        assert required in entries
    assert ".env" in entries
    # The build needs these in its context.
    for needed in ("package.json", "package-lock.json", "Dockerfile", "*", "server"):
        assert needed not in entries


@pytest.mark.parametrize(
    ("has_dockerfile", "has_package_json", "fly_toml", "expected"),
    [
        (False, True, None, True),
        (False, True, 'app = "a"\n', True),
        (False, True, 'app = "a"\n[build]\n  args = {A = "1"}\n', True),
        (True, True, None, False),
        (False, False, None, False),
        (False, True, '[build]\n  dockerfile = "Dockerfile.prod"\n', False),
        (False, True, '[build]\n  image = "registry.fly.io/x:1"\n', False),
        (False, True, '[build]\n  builder = "paketobuildpacks/builder:base"\n', False),
        (False, True, '[build]\n  buildpacks = ["gcr.io/paketo-buildpacks/nodejs"]\n', False),
        (False, True, '[build]\n  image = ""\n', True),
    ],
)
def test_when_a_dockerfile_is_generated(
    has_dockerfile: bool, has_package_json: bool, fly_toml: str | None, expected: bool
) -> None:
    assert (
        wants_generated_dockerfile(
            has_dockerfile=has_dockerfile, has_package_json=has_package_json, fly_toml=fly_toml
        )
        is expected
    )
