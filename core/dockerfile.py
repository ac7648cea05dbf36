"""A production Dockerfile for a Nitro.js project that has none, and its .dockerignore.

Pure functions without I/O: the fly config activity reads the repository and commits what
these return. A file the repository already has is never replaced: once committed, the
generated files are the project's own, to edit or replace.
"""

from __future__ import annotations

import tomllib
from typing import Any, Final

DOCKERFILE: Final = "Dockerfile"
DOCKERIGNORE: Final = ".dockerignore"
PACKAGE_JSON: Final = "package.json"
NODE_MAJOR: Final = 20

# `[build]` keys with which fly.toml names its own way to get an image: flyctl then reads
# neither our Dockerfile nor any other at the root.
_BUILD_SOURCE_KEYS: Final = ("image", "dockerfile", "builder", "buildpacks", "builtin")

_DOCKERFILE_TEXT: Final = f"""\
# syntax=docker/dockerfile:1
# Production image of this Nitro.js server, generated because the repository had no
# Dockerfile. It is the project's own now: deploys use it as committed, edits included.

ARG NODE_VERSION={NODE_MAJOR}

FROM node:${{NODE_VERSION}}-slim AS build
WORKDIR /app
# The lockfile (when there is one) is copied before the sources so that the dependency
# layer stays cached while only application code changes.
COPY package.json package-lock.json* npm-shrinkwrap.json* ./
# `npm ci` installs exactly what the lockfile pins, and fails when package.json and the
# lockfile disagree, so every build of a commit gets the same dependencies. Without a
# lockfile `npm ci` refuses to run; `npm install` then resolves the ranges of package.json
# afresh, which is not reproducible: commit package-lock.json to get `npm ci`.
# Dev dependencies are included because the build (nitro) usually is one.
RUN if [ -f package-lock.json ] || [ -f npm-shrinkwrap.json ]; then \\
      npm ci --include=dev --no-audit --no-fund; \\
    else \\
      npm install --include=dev --no-audit --no-fund; \\
    fi
COPY . .
RUN npm run build

FROM node:${{NODE_VERSION}}-slim
WORKDIR /app
ENV NODE_ENV=production \\
    PORT=3000
# Nitro bundles the server and the dependencies it uses into .output: node_modules and the
# sources stay behind in the build stage.
COPY --from=build --chown=node:node /app/.output ./.output
# The official image's unprivileged user (uid 1000).
USER node
EXPOSE 3000
CMD ["node", ".output/server/index.mjs"]
"""

_DOCKERIGNORE_TEXT: Final = """\
# Kept out of the image build context (generated with the Dockerfile).
# Installed and built inside the image, never copied from a checkout:
node_modules
.output
.nitro
.data
# History and local settings have no place in an image; secrets come from Fly secrets:
.git
.env
.env.*
npm-debug.log*
"""


def render_dockerfile() -> str:
    """The generated Dockerfile: the same bytes on every call (deploys stay idempotent)."""
    return _DOCKERFILE_TEXT


def render_dockerignore() -> str:
    return _DOCKERIGNORE_TEXT


def wants_generated_dockerfile(
    *, has_dockerfile: bool, has_package_json: bool, fly_toml: str | None
) -> bool:
    """Whether a deploy should add a Dockerfile: a Node project (package.json) without one,
    whose fly.toml (as it will be committed) does not choose another image source."""
    if has_dockerfile or not has_package_json:
        return False
    return not _build_source(fly_toml)


def _build_source(fly_toml: str | None) -> bool:
    if fly_toml is None:
        return False
    try:
        doc: dict[str, Any] = tomllib.loads(fly_toml)
    except tomllib.TOMLDecodeError:
        return False
    build = doc.get("build")
    return isinstance(build, dict) and any(build.get(k) for k in _BUILD_SOURCE_KEYS)
