"""`python -m flysim`: the emulator as a standalone server.

Tokens come from `FLYSIM_TOKENS` (comma-separated `token=org` pairs, or a bare token for
the `personal` org), never from the command line, where other users could read them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import sys

from flysim.config import SimConfig, SimTiming
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="flysim",
        description=f"Local Fly Machines API emulator. Accepted tokens come from ${TOKENS_ENV}.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4280)
    parser.add_argument("--start-delay", type=float, default=0.0, help="seconds starting→started")
    parser.add_argument("--stop-delay", type=float, default=0.0)
    parser.add_argument("--create-delay", type=float, default=0.0)
    parser.add_argument("--healthy-after", type=float, default=0.0)
    parser.add_argument("--api-latency", type=float, default=0.0)
    parser.add_argument("--autostop-after", type=float, default=None)
    args = parser.parse_args(argv)

    tokens = parse_tokens(os.environ.get(TOKENS_ENV, ""))
    if not tokens:
        print(
            f"flysim: set {TOKENS_ENV} to the accepted tokens ('token=org,...' or a bare token)",
            file=sys.stderr,
        )
        return 2
    timing = SimTiming(
        start_delay=args.start_delay,
        stop_delay=args.stop_delay,
        create_delay=args.create_delay,
        healthy_after=args.healthy_after,
        api_latency=args.api_latency,
        autostop_after=args.autostop_after,
    )
    sim = FlySim(SimConfig(tokens=tokens, timing=timing))

    async def serve() -> None:
        await sim.start(args.host, args.port)
        print(
            f"flysim: API {sim.base_url}, apps {sim.app_url_template}, "
            f"control http://{args.host}:{sim.port}/_sim",
            file=sys.stderr,
            flush=True,
        )
        await sim.wait_closed()

    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(serve())
        except RuntimeError as exc:
            print(f"flysim: {exc}", file=sys.stderr)
            return 1
    return 0
