"""A stand-in for `flyctl`, for tests and the offline demo. It is NOT flyctl.

flyctl cannot be installed everywhere (it is on neither PyPI nor npm), so this module
plays the part of the few `flyctl deploy` invocations turbodeploy makes, with flyctl's
flags, environment variables and exit codes, against the Machines API that
FLY_FLAPS_BASE_URL names (the variable flyctl reads; a root URL, `/v1` is appended as
flyctl does). Nothing is ever built or pushed: the "build" only checks the checkout and
prints build-like lines.

    python -m flysim.flyctl deploy --build-only --push --remote-only \\
        --image-label L --app A --config fly.toml
        checks fly.toml and the Dockerfile (or `[build] image`), prints
        `image: registry.fly.io/A:L`, exit 0
    python -m flysim.flyctl deploy --remote-only [--image REF] [--image-label L] \\
        --app A --config fly.toml [--wait-timeout 5m] [--ha=false] --yes
        "builds" as above unless --image, then creates the app's first machines or updates
        the existing ones one at a time (leased), waiting for each to start and pass its
        checks; machine metadata as flyctl sets it
    python -m flysim.flyctl scale count N --app A --yes
        creates (a copy of the newest machine's config, in its region) or destroys machines
        of the app's process group until it has N
    python -m flysim.flyctl version

The token comes from FLY_ACCESS_TOKEN, else FLY_API_TOKEN (flyctl's order), and is never
printed. Exit codes: 0 success, 1 any failure, 127 interrupted (SIGINT or SIGTERM).

For tests:
    FLYCTL_STANDIN_FAIL=1           fail during the build, after printing some lines
    FLYCTL_STANDIN_FAIL_MESSAGE=... the error printed then (default: a build error)
    FLYCTL_STANDIN_SLEEP=<seconds>  a build that takes this long
    FLYCTL_STANDIN_ARGV_LOG=<file>  append a JSON line per run: pid, argv, cwd, the
                                    names (never the values) of its environment variables,
                                    and the SHA-256 of the token it was given
    FLYCTL_STANDIN_PROBE_APP=<app>  first try to read that app with the token, and append
                                    {"pid", "probe", "status"} to the log above: what the
                                    token lets a child do beyond its own app
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import secrets
import signal
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

from core.flytoml import FlyTomlError, machine_config, overlay_managed
from flyapi import FlyAPIError, FlyClient, FlyError, FlyForbidden, FlyUnauthorized, Machine

VERSION: Final = "0.0.0-standin"
EXIT_FAILED: Final = 1
EXIT_INTERRUPTED: Final = 127
REGISTRY: Final = "registry.fly.io"
PROCESS_GROUP: Final = "app"

FAIL_ENV: Final = "FLYCTL_STANDIN_FAIL"
FAIL_MESSAGE_ENV: Final = "FLYCTL_STANDIN_FAIL_MESSAGE"
SLEEP_ENV: Final = "FLYCTL_STANDIN_SLEEP"
ARGV_LOG_ENV: Final = "FLYCTL_STANDIN_ARGV_LOG"
PROBE_APP_ENV: Final = "FLYCTL_STANDIN_PROBE_APP"

_DEFAULT_WAIT_SECONDS: Final = 300.0
_POLL_SECONDS: Final = 0.1
_ASLEEP: Final = frozenset({"stopped", "suspended"})
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS: Final = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class _Failure(Exception):
    """Ends the run with exit code 1 and `Error: <message>`, as flyctl does."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # cobra reports usage errors on stderr with exit code 1.
        print(f"Error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_FAILED)


_BOOL_FLAGS: Final = frozenset({"build-only", "push", "remote-only", "local-only", "yes", "ha"})
_TRUE: Final = frozenset({"1", "t", "true"})
_FALSE: Final = frozenset({"0", "f", "false"})


def _go_bools(argv: Sequence[str]) -> list[str]:
    """`--flag=false` in Go's syntax becomes argparse's `--no-flag`."""
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if sep and name.startswith("--") and name[2:] in _BOOL_FLAGS:
            if value.lower() in _TRUE:
                arg = name
            elif value.lower() in _FALSE:
                arg = f"--no-{name[2:]}"
            else:
                raise _Failure(f'invalid argument "{value}" for "{name}" flag: invalid syntax')
        out.append(arg)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flyctl", add_help=True)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("version")
    deploy = commands.add_parser("deploy")
    deploy.add_argument("workdir", nargs="?", default=".")
    deploy.add_argument("-a", "--app")
    deploy.add_argument("-c", "--config")
    deploy.add_argument("-i", "--image")
    deploy.add_argument("--image-label")
    deploy.add_argument("--strategy", default="rolling")
    deploy.add_argument("--wait-timeout")
    # Go bool flags: `--push`, `--push=true` or `--push=false` (see _go_bools).
    for flag in ("--build-only", "--push", "--remote-only", "--local-only"):
        deploy.add_argument(flag, action=argparse.BooleanOptionalAction, default=False)
    deploy.add_argument("-y", "--yes", action=argparse.BooleanOptionalAction, default=False)
    deploy.add_argument("--ha", action=argparse.BooleanOptionalAction, default=True)
    scale = commands.add_parser("scale")
    scale_commands = scale.add_subparsers(dest="scale_command", required=True, parser_class=_Parser)
    count = scale_commands.add_parser("count")
    count.add_argument("count", type=int)
    count.add_argument("-a", "--app", required=True)
    count.add_argument("-y", "--yes", action=argparse.BooleanOptionalAction, default=False)
    count.add_argument("--wait-timeout")
    return parser


# ------------------------------------------------------------------------------- output


class _Console:
    """Prints like flyctl, never the token."""

    def __init__(self, hidden: Sequence[str]) -> None:
        self._hidden = [h for h in hidden if h]

    def say(self, line: str = "") -> None:
        print(self._scrub(line), flush=True)

    def error(self, message: str) -> None:
        print(f"Error: {self._scrub(message)}", file=sys.stderr, flush=True)

    def _scrub(self, text: str) -> str:
        for hidden in self._hidden:
            text = text.replace(hidden, "[REDACTED]")
        return text


# ------------------------------------------------------------------------------- deploy


def _token() -> str | None:
    for name in ("FLY_ACCESS_TOKEN", "FLY_API_TOKEN"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _wait_seconds(value: str | None) -> float:
    if not value:
        return _DEFAULT_WAIT_SECONDS
    if value.isdigit():  # older flyctl took plain seconds
        return float(value)
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise _Failure(f'invalid argument "{value}" for "--wait-timeout" flag: invalid duration')
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _load_config(workdir: Path, config: str | None) -> tuple[Path, str, dict[str, Any]]:
    path = workdir / (config or "fly.toml")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _Failure(
            f"failed loading app config from {path}: open {path}: no such file or directory"
        ) from None
    try:
        return path, text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _Failure(f"failed loading app config from {path}: {exc}") from None


def _default_label() -> str:
    # flyctl labels its images deployment-<ULID>.
    return "deployment-" + secrets.token_hex(13).upper()


async def _build(
    out: _Console,
    workdir: Path,
    doc: Mapping[str, Any],
    app: str,
    label: str,
    *,
    push: bool,
) -> str:
    out.say("==> Verifying app config")
    out.say("--> Verified app config")
    out.say("==> Building image")
    build = doc.get("build") if isinstance(doc.get("build"), dict) else {}
    assert isinstance(build, dict)
    if build.get("image"):
        image = str(build["image"])
        out.say(f"Searching for image '{image}' remotely...")
        out.say(f"image found: {image}")
        out.say(f"image: {image}")
        return image
    dockerfile = workdir / str(build.get("dockerfile") or "Dockerfile")
    if not dockerfile.is_file():
        raise _Failure(
            "failed to fetch an image or build from source: app does not have a Dockerfile "
            "or buildpacks configured. See "
            "https://fly.io/docs/reference/configuration/#the-build-section"
        )
    out.say("Waiting for depot builder...")
    out.say(f"==> Building image with Depot (stand-in: nothing is built) from {dockerfile.name}")
    steps = _dockerfile_steps(dockerfile.read_text(encoding="utf-8", errors="replace"))
    delay = float(os.environ.get(SLEEP_ENV) or 0)
    for number, step in enumerate(steps, start=1):
        out.say(f"#{number} {step}")
        if delay:
            await asyncio.sleep(delay / max(len(steps), 1))
        if number == min(2, len(steps)) and os.environ.get(FAIL_ENV) == "1":
            raise _Failure(
                os.environ.get(FAIL_MESSAGE_ENV)
                or "failed to fetch an image or build from source: error building: "
                'failed to solve: process "/bin/sh -c npm run build" did not complete '
                "successfully: exit code: 1"
            )
    out.say("--> Building image done")
    image = f"{REGISTRY}/{app}:{label}"
    if push:
        out.say("==> Pushing image to fly")
        out.say("--> Pushing image done")
    out.say(f"image: {image}")
    out.say(f"image size: {40 + len(steps)} MB")
    return image


def _dockerfile_steps(text: str) -> list[str]:
    steps: list[str] = []
    stage = "internal"
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = pending + line, ""
        word = line.split(maxsplit=1)[0].upper()
        if word == "FROM":
            words = line.split()
            stage = words[3] if len(words) >= 4 and words[2].upper() == "AS" else "stage"
        if word in {"FROM", "RUN", "COPY", "ADD"}:
            steps.append(f"[{stage}] {line[:120]}")
    return steps or ["[internal] load build definition from Dockerfile"]


async def _deploy(out: _Console, args: argparse.Namespace, token: str, base_url: str) -> None:
    workdir = Path(args.workdir)
    _, fly_toml, doc = _load_config(workdir, args.config)
    app = args.app or doc.get("app")
    if not app or not isinstance(app, str):
        raise _Failure("the config for your app is missing an app name, add an app field")
    if args.local_only:
        raise _Failure("this flyctl builds remotely only: use --remote-only")
    wait = _wait_seconds(args.wait_timeout)
    async with FlyClient(base_url, token, user_agent=f"fly-cli/{VERSION}") as fly:
        await _find_app(fly, app)
        if args.image:
            image = str(args.image)
            out.say(f"==> Deploying image {image}")
        else:
            label = args.image_label or _default_label()
            image = await _build(
                out, workdir, doc, app, label, push=bool(args.push or not args.build_only)
            )
        if args.build_only:
            return
        await _release(out, fly, app, doc, fly_toml, image, ha=args.ha, wait=wait)


async def _scale_count(out: _Console, args: argparse.Namespace, token: str, base_url: str) -> None:
    """`flyctl scale count N`: the process group gets N machines, new ones as copies of
    the newest one, surplus ones (the newest first) destroyed."""
    if args.count < 0:
        raise _Failure("count must be 0 or more")
    if not args.yes:
        raise _Failure("refusing to scale without --yes in a non-interactive session")
    app, wait = str(args.app), _wait_seconds(args.wait_timeout)
    async with FlyClient(base_url, token, user_agent=f"fly-cli/{VERSION}") as fly:
        await _find_app(fly, app)
        machines = sorted(
            (m for m in await fly.list_machines(app) if _in_group(m)),
            key=lambda m: (m.created_at or "", m.id),
        )
        delta = args.count - len(machines)
        if delta == 0:
            out.say(f"App '{app}' already has {args.count} machines in group '{PROCESS_GROUP}'")
            return
        if delta > 0 and not machines:
            raise _Failure(
                f"there are no machines in group '{PROCESS_GROUP}' to copy; deploy first"
            )
        region = (machines[-1].region if machines else None) or "iad"
        out.say(f"App '{app}' is going to be scaled according to this plan:")
        out.say(f"  {delta:+d} machines for group '{PROCESS_GROUP}' on region '{region}'")
        out.say("Executing scale plan")
        if delta > 0:
            template = machines[-1]
            for _ in range(delta):
                created = await fly.create_machine(app, dict(template.config), region)
                out.say(f"  Created {created.id} group:{PROCESS_GROUP} region:{region}")
                await _wait_ready(out, fly, app, created, template.config, wait)
        else:
            for machine in reversed(machines[delta:]):
                await fly.delete_machine(app, machine.id, force=True)
                out.say(f"  Destroyed {machine.id} group:{PROCESS_GROUP} region:{machine.region}")


async def _find_app(fly: FlyClient, app: str) -> None:
    try:
        found = await fly.get_app(app)
    except FlyUnauthorized:
        raise _Failure("You must be authenticated to view this.") from None
    except FlyForbidden:
        # The token is not for this app (a deploy token of another one).
        raise _Failure(f"failed to retrieve app {app}: unauthorized") from None
    if found is None:
        raise _Failure(f'Could not find App "{app}"')


async def _release(
    out: _Console,
    fly: FlyClient,
    app: str,
    doc: Mapping[str, Any],
    fly_toml: str,
    image: str,
    *,
    ha: bool,
    wait: float,
) -> None:
    machines = [m for m in await fly.list_machines(app) if _in_group(m)]
    version = 1 + max((_int(m.metadata.get("fly_release_version")) for m in machines), default=0)
    metadata = {
        "fly_release_id": secrets.token_hex(6),
        "fly_release_version": str(version),
        "fly_flyctl_version": VERSION,
    }
    try:
        config = machine_config(fly_toml, image=image, metadata=metadata)
    except FlyTomlError as exc:
        raise _Failure(str(exc)) from None
    region = str(doc.get("primary_region") or "iad")
    out.say()
    out.say(f"Watch your deployment at https://fly.io/apps/{app}/monitoring")
    out.say()
    if not machines:
        count = 2 if ha and config.get("services") else 1
        out.say("This deployment will:")
        out.say(f' * create {count} "{PROCESS_GROUP}" machine{"s" if count > 1 else ""}')
        out.say()
        out.say(f"No machines in group {PROCESS_GROUP}, launching a new machine")
        for index in range(count):
            if index == 1:
                out.say("Creating a second machine to increase service availability")
            machine = await fly.create_machine(app, config, region)
            out.say(f"Machine {machine.id} [{PROCESS_GROUP}] was created")
            await _wait_ready(out, fly, app, machine, config, wait)
        out.say("Finished launching new machines")
    else:
        out.say(f"Updating existing machines in '{app}' with rolling strategy")
        for index, machine in enumerate(machines, start=1):
            await _update(out, fly, app, machine, config, wait)
            out.say(
                f"[{index}/{len(machines)}] Machine {machine.id} [{PROCESS_GROUP}] "
                "update finished: success"
            )
    out.say(f"Visit your newly deployed app at https://{app}.fly.dev/")


async def _update(
    out: _Console,
    fly: FlyClient,
    app: str,
    machine: Machine,
    config: Mapping[str, Any],
    wait: float,
) -> None:
    ttl = int(wait) + 60
    lease = await fly.acquire_lease(app, machine.id, ttl, description="flyctl deploy")
    try:
        asleep = machine.state in _ASLEEP
        updated = await fly.update_machine(
            app,
            machine.id,
            overlay_managed(machine.config, config),
            machine.region,
            nonce=lease.nonce,
            skip_launch=asleep,
        )
        out.say(f"Updating machine {machine.id} [{PROCESS_GROUP}]")
        if not asleep:
            await _wait_ready(out, fly, app, updated, config, wait)
    finally:
        await asyncio.shield(fly.release_lease(app, machine.id, lease.nonce))


async def _wait_ready(
    out: _Console,
    fly: FlyClient,
    app: str,
    machine: Machine,
    config: Mapping[str, Any],
    wait: float,
) -> None:
    deadline = time.monotonic() + wait
    while not await fly.wait_machine(
        app,
        machine.id,
        "started",
        instance_id=machine.instance_id,
        timeout=max(1.0, deadline - time.monotonic()),
    ):
        if time.monotonic() >= deadline:
            raise _Failure(
                f"timeout reached waiting for machine {machine.id} to start: "
                f"failed to wait for VM {machine.id} in started state"
            )
    if not _has_checks(config):
        return
    out.say(f"Waiting for {machine.id} to become healthy")
    while True:
        current = await fly.get_machine(app, machine.id)
        if current.checks and all(c.passing for c in current.checks):
            out.say(f"Machine {machine.id} is now in a good state")
            return
        if time.monotonic() >= deadline:
            raise _Failure(
                f"timeout reached waiting for health checks to pass for machine {machine.id}"
            )
        await asyncio.sleep(_POLL_SECONDS)


def _in_group(machine: Machine) -> bool:
    meta = machine.metadata
    return (
        not machine.gone
        and meta.get("fly_platform_version") == "v2"
        and meta.get("fly_process_group", PROCESS_GROUP) == PROCESS_GROUP
    )


def _has_checks(config: Mapping[str, Any]) -> bool:
    services = config.get("services") or []
    return bool(config.get("checks")) or any(
        isinstance(s, dict) and s.get("checks") for s in services
    )


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


# --------------------------------------------------------------------------------- main


def token_fingerprint(token: str) -> str:
    """What the log records of a token: its SHA-256, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _log_record(record: Mapping[str, Any]) -> None:
    target = os.environ.get(ARGV_LOG_ENV)
    if not target:
        return
    with open(target, "a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")


def _log_invocation(argv: Sequence[str]) -> None:
    token = _token()
    _log_record(
        {
            "pid": os.getpid(),
            "argv": list(argv),
            "cwd": os.getcwd(),
            "env": sorted(os.environ),
            "token_sha256": token_fingerprint(token) if token else None,
        }
    )


async def _probe(token: str, base_url: str) -> None:
    """Read the app named by FLYCTL_STANDIN_PROBE_APP with our token; log the status."""
    app = os.environ.get(PROBE_APP_ENV, "").strip()
    if not app:
        return
    async with FlyClient(base_url, token, user_agent=f"fly-cli/{VERSION}") as fly:
        try:
            status = 200 if await fly.get_app(app) is not None else 404
        except FlyAPIError as exc:
            status = exc.status_code
    _log_record({"pid": os.getpid(), "probe": app, "status": status})


async def _run(out: _Console, args: argparse.Namespace, token: str, base_url: str) -> int:
    task = asyncio.current_task()
    assert task is not None
    interrupted: list[int] = []
    loop = asyncio.get_running_loop()

    def interrupt(signum: int) -> None:
        interrupted.append(signum)
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt, signum)
    try:
        await _probe(token, base_url)
        if args.command == "scale":
            await _scale_count(out, args, token, base_url)
        else:
            await _deploy(out, args, token, base_url)
    except asyncio.CancelledError:
        if not interrupted:
            raise
        task.uncancel()
        out.error("interrupted")
        return EXIT_INTERRUPTED
    except _Failure as exc:
        out.error(str(exc))
        return EXIT_FAILED
    except FlyError as exc:
        out.error(str(exc))
        return EXIT_FAILED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _log_invocation(argv)
    # Until the event loop takes over, SIGTERM interrupts like SIGINT does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


def _main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(_go_bools(argv))
    except _Failure as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "version":
        print(f"flyctl v{VERSION} (a stand-in for tests and the offline demo)", flush=True)
        return 0
    token = _token()
    out = _Console([token] if token else [])
    if token is None:
        out.error("No access token available. Please login with 'flyctl auth login'")
        return EXIT_FAILED
    root = os.environ.get("FLY_FLAPS_BASE_URL", "").strip().rstrip("/")
    if not root:
        out.error(
            "FLY_FLAPS_BASE_URL is not set: this flyctl stand-in only talks to a local "
            "Machines API (e.g. `turbodeploy flysim`)"
        )
        return EXIT_FAILED
    return asyncio.run(_run(out, args, token, root + "/v1"))


if __name__ == "__main__":
    sys.exit(main())
