"""`python -m flysim`: the emulator as a standalone server.

Tokens come from `FLYSIM_TOKENS` (comma-separated `token=org` pairs, or a bare token for
the `personal` org), never from the command line, where other users could read them.

Every option but `--host` and `--port` sets the configuration field of the same name that
`POST /_sim/config` sets: `config_patch(args)` builds that endpoint's JSON body from them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from flysim.config import Faults, SimConfig, SimTiming
from flysim.server import FlySim

TOKENS_ENV = "FLYSIM_TOKENS"
_MACAROON_PART = re.compile(r"^f[a-z]\d_")
_ORG_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*$")


def parse_tokens(value: str) -> dict[str, str]:
    """`token=org` or bare tokens, comma-separated.

    Fly macaroon tokens themselves contain commas (`FlyV1 fm2_...,fm2_...`): a piece
    that starts like a macaroon continues the token before it.
    """
    items: list[str] = []
    for piece in (p.strip() for p in value.split(",")):
        if not piece:
            continue
        if items and _MACAROON_PART.match(piece):
            items[-1] += "," + piece
        else:
            items.append(piece)
    tokens: dict[str, str] = {}
    for item in items:
        token, sep, org = item.rpartition("=")
        if sep and token and _ORG_SLUG.match(org):
            tokens[token.strip()] = org
        else:
            tokens[item] = "personal"
    return tokens


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"not a finite number: {value!r}")
    return number


def seconds(value: str) -> float:
    """A duration in seconds, zero or more."""
    number = _number(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more seconds, got {value}")
    return number


def positive_seconds(value: str) -> float:
    number = _number(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero seconds, got {value}")
    return number


def probability(value: str) -> float:
    """A fraction of requests, from 0 to 1."""
    number = _number(value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return number


def positive_rate(value: str) -> float:
    number = _number(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero requests per second, got {value}")
    return number


def whole_seconds(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more seconds, got {value}")
    return number


def seed(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None


def boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def error_codes(value: str) -> tuple[int, ...]:
    """Comma-separated HTTP error statuses (400 to 599)."""
    codes: list[int] = []
    for piece in (p.strip() for p in value.split(",")):
        if not piece.isdigit() or not 400 <= int(piece) <= 599:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated HTTP error statuses (400-599), got {value!r}"
            )
        codes.append(int(piece))
    return tuple(codes)


class _Knob(NamedTuple):
    flag: str
    section: str | None  # "timing", "faults", or None for a top-level field
    field: str
    type: Callable[[str], Any]
    metavar: str
    help: str


_KNOBS = (
    _Knob("--api-latency", "timing", "api_latency", seconds, "SECONDS",
          "delay added to every /v1 API request, in seconds"),
    _Knob("--create-delay", "timing", "create_delay", seconds, "SECONDS",
          "seconds a new machine stays 'created' before it starts"),
    _Knob("--start-delay", "timing", "start_delay", seconds, "SECONDS",
          "seconds a machine spends 'starting' before it is 'started'"),
    _Knob("--stop-delay", "timing", "stop_delay", seconds, "SECONDS",
          "seconds a machine spends stopping or suspending before it is stopped or suspended"),
    _Knob("--healthy-after", "timing", "healthy_after", seconds, "SECONDS",
          "seconds after a start before a machine's checks pass"),
    _Knob("--autostop-after", "timing", "autostop_after", seconds, "SECONDS",
          "seconds without proxied traffic after which a machine with autostop stops "
          "(default: never)"),
    _Knob("--lease-default-ttl", "timing", "lease_default_ttl", positive_seconds, "SECONDS",
          "lease lifetime, in seconds, when a lease request gives no ttl"),
    _Knob("--proxy-wait-limit", "timing", "proxy_wait_limit", seconds, "SECONDS",
          "seconds an app URL request waits for a machine to wake before answering 503"),
    _Knob("--crash-after", "timing", "crash_after", seconds, "SECONDS",
          "seconds a machine of a --crashing-image runs before it crashes"),
    _Knob("--error-rate", "faults", "error_rate", probability, "FRACTION",
          "fraction (0-1) of /v1 requests answered with an injected server error"),
    _Knob("--error-codes", "faults", "error_codes", error_codes, "CODES",
          "comma-separated HTTP statuses the injected errors pick from"),
    _Knob("--rate-limit-rate", "faults", "rate_limit_rate", probability, "FRACTION",
          "fraction (0-1) of /v1 requests answered 429 Too Many Requests"),
    _Knob("--retry-after", "faults", "retry_after", whole_seconds, "SECONDS",
          "Retry-After header of 429 answers, in whole seconds"),
    _Knob("--latency-spike-rate", "faults", "latency_spike_rate", probability, "FRACTION",
          "fraction (0-1) of /v1 requests delayed by --latency-spike"),
    _Knob("--latency-spike", "faults", "latency_spike", seconds, "SECONDS",
          "extra delay of a latency spike, in seconds"),
    _Knob("--drop-rate", "faults", "drop_rate", probability, "FRACTION",
          "fraction (0-1) of /v1 requests whose connection is closed without an answer"),
    _Knob("--stale-secrets", "faults", "stale_secrets", boolean, "yes|no",
          "machines created or updated without min_secrets_version boot with the "
          "secrets of before their last change"),
    _Knob("--fault-seed", "faults", "seed", seed, "N",
          "random seed of the fault draws, for a repeatable sequence (default: unseeded)"),
    _Knob("--rate-limit-rps", None, "rate_limit_rps", positive_rate, "RPS",
          "most /v1 requests per second (token bucket); more are answered 429 "
          "(default: no limit)"),
)  # fmt: skip

# Repeatable options that add to a set of the configuration:
# (flag, field, option group, metavar, help).
_SETS = (
    ("--unhealthy-image", "unhealthy_images", "health", "IMAGE",
     "image whose machines start but never pass their checks (repeatable)"),
    ("--failing-image", "failing_images", "faults", "IMAGE",
     "image whose machines fail to launch: launch_failed, then failed (repeatable)"),
    ("--crashing-image", "crashing_images", "faults", "IMAGE",
     "image whose machines start, then crash after --crash-after seconds (repeatable)"),
    ("--full-region", "full_regions", "faults", "REGION",
     "region without capacity: creates and starts there answer 503 insufficient_capacity "
     "(repeatable)"),
)  # fmt: skip

_MODELS: dict[str | None, type[SimTiming] | type[Faults] | type[SimConfig]] = {
    "timing": SimTiming,
    "faults": Faults,
    None: SimConfig,
}


def _default_text(knob: _Knob) -> str:
    if "(default:" in knob.help:
        return knob.help
    default = _MODELS[knob.section].model_fields[knob.field].default
    if isinstance(default, tuple):
        default = ",".join(str(d) for d in default)
    return f"{knob.help} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flysim",
        description=(
            f"Local Fly Machines API emulator. Accepted tokens come from ${TOKENS_ENV}. "
            "Every option below can also be changed while it runs, through POST /_sim/config."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=4280, help="port to listen on")
    parser.add_argument(
        "--state-file",
        default=None,
        metavar="PATH",
        help="keep the apps, machines and app secrets in this file: loaded at start, "
        "written on change and at stop (default: kept in memory only)",
    )
    timing = parser.add_argument_group("timings")
    faults = parser.add_argument_group(
        "fault injection",
        "Failures of /v1 API requests, decided before the request changes anything.",
    )
    health = parser.add_argument_group("health checks")
    for knob in _KNOBS:
        group = timing if knob.section == "timing" else faults
        group.add_argument(
            knob.flag,
            dest=knob.field,
            type=knob.type,
            default=None,
            metavar=knob.metavar,
            help=_default_text(knob),
        )
    for flag, dest, section, metavar, text in _SETS:
        (health if section == "health" else faults).add_argument(
            flag, dest=dest, action="append", default=None, metavar=metavar, help=text
        )
    parser.add_argument(
        "--validate-spec",
        metavar="OPENAPI",
        default=None,
        help="check every /v1 exchange against this OpenAPI document and log what does not "
        "conform (also $FLYSIM_VALIDATE_SPEC; needs openapi-core)",
    )
    return parser


def config_patch(args: argparse.Namespace) -> dict[str, Any]:
    """The options given, as the JSON body `POST /_sim/config` accepts."""
    patch: dict[str, Any] = {}
    for knob in _KNOBS:
        value = getattr(args, knob.field)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = list(value)
        if knob.section is None:
            patch[knob.field] = value
        else:
            patch.setdefault(knob.section, {})[knob.field] = value
    for _, dest, *_ in _SETS:
        values = getattr(args, dest)
        if values:
            patch[dest] = sorted(set(values))
    return patch


def build_config(args: argparse.Namespace, tokens: dict[str, str]) -> SimConfig:
    config = SimConfig(tokens=tokens)
    config.apply(config_patch(args))
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    tokens = parse_tokens(os.environ.get(TOKENS_ENV, ""))
    if not tokens:
        print(
            f"flysim: set {TOKENS_ENV} to the accepted tokens ('token=org,...' or a bare token)",
            file=sys.stderr,
        )
        return 2
    try:
        config = build_config(args, tokens)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        sim = FlySim(config, spec_check=args.validate_spec)
    except (OSError, ImportError) as exc:
        parser.error(f"--validate-spec: {exc}")
    state = None
    if args.state_file:
        from flysim.persist import StateFile

        state = StateFile(sim, Path(args.state_file))
        try:
            restored = state.load()
        except ValueError as exc:
            print(f"flysim: {exc}", file=sys.stderr)
            return 1
        print(f"flysim: {restored} apps restored from {args.state_file}", file=sys.stderr)

    async def serve() -> None:
        await sim.start(args.host, args.port)
        keeper = asyncio.create_task(state.run()) if state else None
        print(
            f"flysim: API {sim.base_url}, apps {sim.app_url_template}, "
            f"control http://{args.host}:{sim.port}/_sim",
            file=sys.stderr,
            flush=True,
        )
        try:
            await sim.wait_closed()
        finally:
            if keeper is not None:
                keeper.cancel()

    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(serve())
        except RuntimeError as exc:
            print(f"flysim: {exc}", file=sys.stderr)
            return 1
        finally:
            if state is not None:
                state.save()
    return 0
