"""`turbodeploy bench` / `python -m bench`: what orchestration costs beside the provider's work.

One run, one Temporal dev server, one worker configuration; every ratio is taken against a
baseline or a critical path measured in the same run. See BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.report import Report

__all__ = ["main"]

_PHASES = (
    "single",
    "concurrent",
    "realistic",
    "git",
    "wake",
    "mass",
    "in_flight",
    "two_workers",
    "crash",
)
# Phases that need nothing the single-deploy phase measures: `--only` runs them alone.
_STANDALONE = frozenset({"crash"})


def _parser() -> argparse.ArgumentParser:
    from bench.runner import Options

    d = Options()
    p = argparse.ArgumentParser(
        prog="turbodeploy bench",
        description="Measure deploys against a no-op baseline and the emulator's waits.",
    )
    p.add_argument("--single-runs", type=int, default=d.single_runs, help="sequential pairs")
    p.add_argument("--concurrent", type=int, default=d.concurrent, help="deploys at once")
    p.add_argument("--in-flight", type=int, default=d.in_flight, help="deploys in flight")
    p.add_argument("--machines", type=int, default=d.machines, help="machines of the big app")
    p.add_argument("--share-deploys", type=int, default=d.share_deploys, help="two-worker run")
    p.add_argument("--api-latency", type=float, default=d.api_latency, help="seconds")
    p.add_argument("--start-delay", type=float, default=d.start_delay, help="seconds")
    p.add_argument("--healthy-after", type=float, default=d.healthy_after, help="seconds")
    p.add_argument(
        "--crash-machines", type=int, default=d.crash_machines, help="machines, crash phase"
    )
    p.add_argument("--big-files", type=int, default=d.big_files, help="git phase: files")
    p.add_argument("--big-blobs", type=int, default=d.big_blobs, help="git phase: large blobs")
    p.add_argument("--big-blob-mb", type=int, default=d.big_blob_mb, help="git phase: MiB each")
    p.add_argument("--git-runs", type=int, default=d.git_runs, help="git phase: deploys each")
    p.add_argument("--mass", type=int, default=d.mass, help="projects redeployed at once")
    p.add_argument(
        "--only", action="append", choices=_PHASES, help="run only these phases (repeatable)"
    )
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="worker setting under test, e.g. TURBODEPLOY_MAX_CONCURRENT_ACTIVITIES=500",
    )
    p.add_argument("--temporal-address", help="use this Temporal server instead of a dev server")
    p.add_argument("--database-url", help="use this PostgreSQL instead of an embedded one")
    p.add_argument("--state-dir", type=Path, help="keep logs and repositories here")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the deploy worker with py-spy during each phase (pip install py-spy)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every target is met, 1 when one is not, 2 on error."""
    args = _parser().parse_args(argv)
    try:
        env = dict(pair.split("=", 1) for pair in args.worker_env)
    except ValueError:
        print("--worker-env takes NAME=VALUE", file=sys.stderr)
        return 2
    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="turbodeploy-bench-"))
    try:
        report = asyncio.run(_run(args, env, state_dir.resolve()))
    finally:
        if args.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)
    print(report.markdown(), flush=True)
    if args.json:
        args.json.write_text(report.to_json())
    return 0 if report.all_met else 1


async def _run(args: argparse.Namespace, env: dict[str, str], state_dir: Path) -> Report:
    from bench.report import Report
    from bench.runner import Benchmark, Options
    from bench.stack import profiled, running_stack

    options = Options(
        single_runs=args.single_runs,
        concurrent=args.concurrent,
        in_flight=args.in_flight,
        machines=args.machines,
        share_deploys=args.share_deploys,
        api_latency=args.api_latency,
        start_delay=args.start_delay,
        healthy_after=args.healthy_after,
        crash_machines=args.crash_machines,
        big_files=args.big_files,
        big_blobs=args.big_blobs,
        big_blob_mb=args.big_blob_mb,
        git_runs=args.git_runs,
        mass=args.mass,
    )
    phases = args.only or list(_PHASES)
    report = Report(machine=_machine())
    began = time.perf_counter()
    async with running_stack(
        state_dir,
        temporal_address=args.temporal_address,
        database_url=args.database_url,
        worker_env=env,
    ) as stack:
        bench = Benchmark(stack, options, report)
        await bench.start()
        # The single-deploy phase also counts a deploy's activities for the baselines.
        first = () if set(phases) <= _STANDALONE else ("single",)
        for phase in (*first, *(p for p in _PHASES if p in phases and p != "single")):
            _say(f"bench: {phase} …")
            phase_began = time.perf_counter()
            with profiled(bench.deploy_worker.pid, args.profile, phase):
                await getattr(bench, phase)()
            _say(f"bench: {phase} took {time.perf_counter() - phase_began:.0f} s")
    elapsed = time.perf_counter() - began
    report.ratio(
        "whole benchmark, services included (minutes)",
        elapsed / 60,
        "≤ 10",
        10.0,
        f"{len(phases)} phase(s)",
        unit=" min",
    )
    return report


def _machine() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        memory = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        mem = f"{int(memory) / 1024 / 1024:.1f} GiB"
    except OSError:
        mem = "unknown"
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model or platform.processor(),
        "memory": mem,
        "python": platform.python_version(),
        "system": platform.platform(),
    }


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
