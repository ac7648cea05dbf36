"""The benchmark in miniature: every phase runs against real services and the table holds a
row, with a measured value, for every ratio. Nothing here asserts a duration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from temporalio.client import Client

ROOT = Path(__file__).resolve().parent.parent

MEASURES = [
    "baseline: no-op workflow",
    "single deploy (zero-latency emulator) ÷ baseline",
    "of which git",
    "single deploy without git ÷ baseline",
    "baseline: 3 no-op workflows at once",
    "3 concurrent deploys: deploys/s ÷ baseline workflows/s",
    "worker CPU per deploy ÷ baseline worker CPU per workflow, 3 at once",
    *(
        f"worker CPU per deploy: {part}"
        for part in ("event loop", "Python threads", "Temporal core", "git")
    ),
    "machine CPU per baseline workflow, all processes",
    "machine CPU per deploy, all processes",
    "immediate redeploy, 1 machine(s) ÷ critical path",
    "immediate redeploy, 2 machine(s) ÷ critical path",
    "rolling redeploy, 1 machine(s) ÷ critical path",
    "rolling redeploy, 2 machine(s) ÷ critical path",
    "immediate: 2 machines ÷ 1 machine",
    "Fly API requests per rolling redeploy (1 machine)",
    "Fly API requests per machine, rolling",
    "lease refreshes, rolling redeploy of 2 machines",
    "Fly API requests per immediate redeploy (1 machine)",
    "Fly API requests per machine, immediate",
    *(
        f"Fly API requests, {kind} {strategy}, {machines} machine(s) ÷ flyctl's"
        for kind in ("first deploy", "redeploy")
        for strategy in ("immediate", "rolling")
        for machines in (1, 2)
    ),
    "git time of a deploy: ~200 MB repository ÷ example project",
    "scale-to-zero redeploy (machine stopped) ÷ (wake-up + rollout critical path)",
    "mass redeploy, 3 projects at once under the 10 req/s budget",
    "mass redeploy: 429 answers from the emulator",
    "mass redeploy: no project starved",
    "worker peak RSS, 3 deploys in flight (MB)",
    "worker CPU per deploy, 3 in flight",
    "two workers on one task queue",
    "crash recovery: worker SIGKILLed mid-rollout",
    "whole benchmark",
]


def test_tiny_benchmark_prints_every_row(
    temporal_client: Client, postgres_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    # Its own process, as `python -m bench` runs: moto keeps its state per process, and the
    # benchmark's SSM must not overwrite the test session's.
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench",
            "--single-runs", "1",
            "--concurrent", "3",
            "--in-flight", "3",
            "--machines", "2",
            "--share-deploys", "3",
            "--crash-machines", "2",
            "--api-latency", "0.005",
            "--start-delay", "0.05",
            "--healthy-after", "0.05",
            "--big-files", "50",
            "--big-blobs", "1",
            "--big-blob-mb", "1",
            "--git-runs", "1",
            "--mass", "3",
            "--temporal-address", temporal_client.service_client.config.target_host,
            "--database-url", postgres_url,
            "--state-dir", str(tmp_path / "state"),
            "--json", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    code = proc.returncode
    assert code in (0, 1), f"the benchmark itself failed: {proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["rows"]
    for measure in MEASURES:
        matching = [r for r in rows if measure in r["measure"]]
        assert matching, f"no row for {measure!r}"
        # A failed deploy shows as an em dash: every phase must have deployed.
        assert all(r["value"] != "—" for r in matching), matching
    targets = [r for r in rows if r["target"] and r["target"] != "(info)"]
    assert all(r["met"] in (True, False) for r in targets)
    assert (code == 0) == all(r["met"] for r in targets)
    table = proc.stdout[proc.stdout.index("| measure |") :]
    assert table.startswith("| measure | value | target | met | detail |")
    assert table.count("\n|") == len(rows) + 1


def test_crash_phase_alone(temporal_client: Client, postgres_url: str, tmp_path: Path) -> None:
    """`--only crash` runs that phase alone (no single-deploy phase first), with the
    production timings: one row with a measured recovery time, and the run's total."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench",
            "--only", "crash",
            "--crash-machines", "2",
            "--api-latency", "0.005",
            "--start-delay", "0.05",
            "--healthy-after", "0.05",
            "--temporal-address", temporal_client.service_client.config.target_host,
            "--database-url", postgres_url,
            "--state-dir", str(tmp_path / "state"),
            "--json", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode in (0, 1), f"the benchmark itself failed: {proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())["rows"]
    assert [r["measure"].split(":")[0] for r in rows] == [
        "crash recovery",
        "whole benchmark, services included (minutes)",
    ]
    crash = rows[0]
    assert crash["value"] != "—", crash
    assert crash["met"] in (True, False) and crash["target"] == "≤ 15 s"
    assert "taken over by nonce" in crash["detail"]
