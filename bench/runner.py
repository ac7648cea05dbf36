"""The measurements, in one run against one Temporal server and one worker configuration.

Every ratio compares the deploy with something measured in the same run: the no-op
baseline workflow (same number of activities, same worker options, same server) or the
waits the emulator imposes (the critical path).
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import shutil
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle

from bench.report import Report
from bench.stack import CPU_PARTS, Stack, big_repository, cpu_split, machine_cpu, sampled_peak
from core.models import DeployRequest, DeployTimings, Strategy, app_name_for
from turbodeploy.client import start_deploy

IMAGE = "registry.fly.io/turbobackend-bench:deployment-1"
REDEPLOY_IMAGE = "registry.fly.io/turbobackend-bench:deployment-2"
# How many deploys or baselines are started at once: enough to fill the worker, few enough
# that the driver itself does not queue thousands of RPCs on the server.
_START_CONCURRENCY = 50


@dataclass(frozen=True)
class Options:
    single_runs: int = 5
    concurrent: int = 200
    in_flight: int = 1000
    machines: int = 10
    share_deploys: int = 100
    # The realistic emulator: API latency, machine start, health checks passing after start.
    api_latency: float = 0.05
    start_delay: float = 2.0
    healthy_after: float = 3.0
    max_unavailable: float = 0.33
    crash_machines: int = 3
    # The big repository of the git phase: small files, and large blobs of `big_blob_mb`.
    big_files: int = 20_000
    big_blobs: int = 6
    big_blob_mb: int = 25
    git_runs: int = 3
    # Redeployed at once under the request budget (the limiter at its default).
    mass: int = 100
    fly_api_rate: float = 10.0  # the worker's default budget, and the emulator's limit


@dataclass
class Timed:
    seconds: float
    ok: bool
    handle: WorkflowHandle[Any, Any] | None = None
    error: str | None = None


@dataclass
class _Run:
    """Names that keep this run's projects and queues apart from any other run's."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    count: int = 0

    def project(self) -> str:
        self.count += 1
        return f"b{self.tag}-{self.count}"


class Benchmark:
    def __init__(self, stack: Stack, options: Options, report: Report) -> None:
        self.stack = stack
        self.o = options
        self.report = report
        self.client: Client = stack.client
        self.names = _Run()
        self.queue = f"bench-{self.names.tag}"
        self.baseline_queue = f"bench-baseline-{self.names.tag}"
        self.activities = 0
        # Paces start requests only; the runs themselves all proceed at once.
        self._gate = asyncio.Semaphore(_START_CONCURRENCY)

    # -------------------------------------------------------------------- driving

    def _request(self, repo: str, **fields: Any) -> DeployRequest:
        values: dict[str, Any] = {
            "project_id": self.names.project(),
            "repo_url": repo,
            "image": IMAGE,
        }
        values.update(fields)
        return DeployRequest.model_validate(values)

    async def _deploy(self, request: DeployRequest, *, queue: str | None = None) -> Timed:
        started = time.perf_counter()
        async with self._gate:
            handle = await start_deploy(self.client, request, task_queue=queue or self.queue)
        # The run's own result, as the baseline's is read: no update round trip.
        workflow = handle.workflow
        try:
            await workflow.result()
        except Exception as exc:
            return Timed(time.perf_counter() - started, False, workflow, _cause(exc))
        return Timed(time.perf_counter() - started, True, workflow)

    async def _deploy_repo(self, repo: str) -> Timed:
        return await self._deploy(self._request(repo))

    async def _baseline(self) -> Timed:
        started = time.perf_counter()
        async with self._gate:
            handle = await self.client.start_workflow(
                "BenchBaselineWorkflow",
                self.activities,
                id=f"baseline-{uuid.uuid4().hex}",
                task_queue=self.baseline_queue,
            )
        try:
            await handle.result()
        except Exception as exc:
            return Timed(time.perf_counter() - started, False, handle, _cause(exc))
        return Timed(time.perf_counter() - started, True, handle)

    async def _all_at_once(
        self, runs: list[Callable[[], Awaitable[Timed]]]
    ) -> tuple[float, list[Timed]]:
        """Start every run (at most `_START_CONCURRENCY` start requests in the air), wait
        for all; the elapsed time from the first start to the last result."""
        started = time.perf_counter()
        results = await asyncio.gather(*(run() for run in runs))
        return time.perf_counter() - started, list(results)

    # -------------------------------------------------------------------- phases

    async def start(self) -> None:
        self.stack.emulator.set_timing(0, 0, 0)
        self.deploy_worker = self.stack.start_worker(self.queue, name="worker-1")
        self.baseline_worker = self.stack.start_worker(
            self.baseline_queue, baseline=True, name="baseline-worker"
        )
        await self.stack.wait_for_pollers(self.queue)
        await self.stack.wait_for_pollers(self.baseline_queue)

    async def single(self) -> None:
        """One deploy at a time against a zero-latency emulator, beside the baseline."""
        self.stack.emulator.set_timing(0, 0, 0)
        repos = self.stack.new_repos(self.o.single_runs + 1)
        warm = await self._deploy(self._request(repos.pop()))
        _require(warm, "the warm-up deploy")
        assert warm.handle is not None
        self.activities = await _activity_count(warm.handle)
        _require(await self._baseline(), "the warm-up baseline")
        deploys: list[Timed] = []
        baselines: list[Timed] = []
        for repo in repos:
            # Alternated, so drift (caches, the server's database) hits both alike.
            baselines.append(await self._baseline())
            deploys.append(await self._deploy(self._request(repo)))
        ok_deploys = [d for d in deploys if d.ok]
        base = statistics.median(b.seconds for b in baselines if b.ok)
        self.report.info(
            f"baseline: no-op workflow, {self.activities} activities (as a deploy)",
            f"{base * 1000:.0f} ms",
            f"median of {len(baselines)}",
        )
        if not ok_deploys:
            self.report.ratio("single deploy ÷ baseline", None, "≤ 1.25", 1.25, "no deploy")
            return
        median = _median_run(ok_deploys)
        steps = await _step_times(median.handle)
        git = steps.get("prepare_fly_config", 0.0)
        self.report.ratio(
            "single deploy (zero-latency emulator) ÷ baseline",
            median.seconds / base,
            "≤ 1.25",
            1.25,
            f"{median.seconds * 1000:.0f} ms vs {base * 1000:.0f} ms; "
            f"{len(ok_deploys)}/{len(deploys)} deployed",
        )
        self.report.info(
            "  of which git (clone, commit, push of fly.toml)",
            f"{git * 1000:.0f} ms",
            f"{git / median.seconds:.0%} of the deploy",
        )
        self.report.ratio(
            "  single deploy without git ÷ baseline",
            (median.seconds - git) / base,
            "(info)",
            None,
            "what the orchestration itself costs",
        )
        self.report.steps = steps
        self.report.single_ms = {"deploy": median.seconds * 1000, "baseline": base * 1000}

    async def concurrent(self) -> None:
        """`concurrent` deploys at once, against as many baselines at once."""
        n = self.o.concurrent
        self.stack.emulator.set_timing(0, 0, 0)
        machine, base_usage = machine_cpu(), self.baseline_worker.usage()
        base_split = cpu_split(self.baseline_worker.pid)
        base_elapsed, bases = await self._all_at_once([self._baseline for _ in range(n)])
        base_machine = machine_cpu() - machine
        base_worker = self.baseline_worker.usage().cpu - base_usage.cpu
        base_split = _minus(cpu_split(self.baseline_worker.pid), base_split)
        # Served by the git host: the worker's CPU is its own side of git, as with GitHub.
        repos = self.stack.new_repos(n, served=True)
        machine, usage = machine_cpu(), self.deploy_worker.usage()
        split = cpu_split(self.deploy_worker.pid)
        elapsed, deploys = await self._all_at_once(
            [functools.partial(self._deploy_repo, r) for r in repos]
        )
        deploy_machine = machine_cpu() - machine
        cpu = self.deploy_worker.usage().cpu - usage.cpu
        split = _minus(cpu_split(self.deploy_worker.pid), split)
        ok = sum(d.ok for d in deploys)
        base_rate = sum(b.ok for b in bases) / base_elapsed
        rate = ok / elapsed
        self.report.info(
            f"baseline: {n} no-op workflows at once",
            f"{base_rate:.1f} workflows/s",
            f"{base_elapsed:.1f} s",
        )
        self.report.ratio(
            f"{n} concurrent deploys: deploys/s ÷ baseline workflows/s",
            rate / base_rate if ok == n else None,
            "(info)",
            None,
            f"{rate:.1f} deploys/s, {ok}/{n} deployed in {elapsed:.1f} s; bounded by the "
            f"machine's {os.cpu_count()} CPUs (below)" + _first_error(deploys),
        )
        self.report.ratio(
            f"worker CPU per deploy ÷ baseline worker CPU per workflow, {n} at once",
            cpu / base_worker if ok == n and base_worker > 0 else None,
            "≤ 2.0",
            2.0,
            f"{cpu / n * 1000:.0f} ms vs {base_worker / n * 1000:.0f} ms "
            "(the deploy worker with its git processes; the baseline worker)",
        )

        # Where the CPU went: everything shares the machine's cores, so the work each side
        # costs the machine bounds the ratio above, whatever the worker does.
        def per_run(seconds: float) -> str:
            return f"{seconds / n * 1000:.0f} ms"

        for part in CPU_PARTS:
            self.report.info(
                f"  worker CPU per deploy: {part}",
                per_run(split[part]),
                f"baseline worker {per_run(base_split[part])} per workflow",
            )

        self.report.info(
            "  machine CPU per baseline workflow, all processes",
            per_run(base_machine),
            f"baseline worker {per_run(base_worker)}, the rest (Temporal server, driver) "
            f"{per_run(base_machine - base_worker)}; {base_machine / base_elapsed:.2f} "
            f"of {os.cpu_count()} CPUs busy",
        )
        self.report.info(
            "  machine CPU per deploy, all processes",
            per_run(deploy_machine),
            f"deploy worker and its git {per_run(cpu)}, the rest (Temporal server, "
            f"PostgreSQL, emulator, driver) {per_run(deploy_machine - cpu)}; "
            f"{deploy_machine / elapsed:.2f} of {os.cpu_count()} CPUs busy",
        )
        self.report.scaling.append(
            {"concurrent": n, "deploys_per_s": rate, "cpu_ms_per_deploy": cpu / n * 1000,
             "machine_cpu_ms_per_deploy": deploy_machine / n * 1000,
             "machine_cpu_ms_per_baseline": base_machine / n * 1000}
        )  # fmt: skip

    async def realistic(self) -> None:
        """Redeploys with realistic emulator delays: wall time ÷ the provider's waits."""
        o = self.o
        walls: dict[tuple[Strategy, int], float] = {}
        requests: dict[tuple[Strategy, int], int] = {}
        # The worker has deployed other projects under the same conditions, as a platform's
        # worker always has: what it saw of their checks is where a first deploy reads first.
        self.stack.emulator.set_timing(o.api_latency, o.start_delay, o.healthy_after)
        warm = self._request(self.stack.new_repos(1)[0], strategy=Strategy.ROLLING)
        _require(await self._deploy(warm), "the realistic warm-up deploy")
        for strategy in (Strategy.IMMEDIATE, Strategy.ROLLING):
            for machines in sorted({1, o.machines}):
                case = (strategy, machines)
                wall, made, by_route = await self._redeploy(strategy, machines)
                if wall is None:
                    self.report.ratio(
                        f"{strategy} redeploy, {machines} machine(s) ÷ critical path",
                        None,
                        "≤ 1.10",
                        1.10,
                        "deploy failed",
                    )
                    continue
                walls[case], requests[case] = wall, made
                path = self._critical_path(strategy, machines)
                self.report.ratio(
                    f"{strategy} redeploy, {machines} machine(s) ÷ critical path",
                    wall / path,
                    "≤ 1.10",
                    1.10,
                    f"{wall:.2f} s vs {path:.2f} s (+{wall - path:.2f} s); {made} API requests",
                )
                self.report.requests[f"{strategy}/{machines}"] = by_route
                self.report.scaling.append(
                    {"strategy": str(strategy), "machines": machines, "wall_s": wall,
                     "critical_path_s": path, "api_requests": made}
                )  # fmt: skip
        one, many = (Strategy.IMMEDIATE, 1), (Strategy.IMMEDIATE, o.machines)
        if o.machines > 1 and one in walls and many in walls:
            self.report.ratio(
                f"immediate: {o.machines} machines ÷ 1 machine",
                walls[many] / walls[one],
                "≤ 1.2",
                1.2,
                f"{walls[many]:.2f} s vs {walls[one]:.2f} s",
            )
        self._requests_rows(requests, walls)
        self._flyctl_rows()

    def _flyctl_rows(self) -> None:
        """Requests of each deploy against flyctl's for the same deploy (FLY-DEPLOY-NOTES.md),
        lease refreshes apart on both sides (their number follows the rollout's duration)."""
        for key, by_route in self.report.requests.items():
            kind, strategy, machines = _request_key(key)
            flyctl = _flyctl_requests(kind, strategy, machines)
            total = sum(by_route.values())
            refreshes = _refreshes(by_route, kind, machines)
            self.report.ratio(
                f"Fly API requests, {kind} {strategy}, {machines} machine(s) ÷ flyctl's",
                (total - refreshes) / flyctl,
                "≤ 1.0",
                1.0,
                f"{total - refreshes} requests ({refreshes} lease refreshes apart) vs "
                f"flyctl {flyctl}",
            )

    def _requests_rows(
        self,
        requests: dict[tuple[Strategy, int], int],
        walls: dict[tuple[Strategy, int], float],
    ) -> None:
        """Requests per machine against flyctl's count from FLY-DEPLOY-NOTES.md.

        Lease refreshes are set apart: their number follows the rollout's duration, not
        its machines (both tools refresh what they hold while it runs; flyctl about every
        4 s), so they are compared with what flyctl would send over the same time.
        """
        m = self.o.machines
        for strategy, per_machine in ((Strategy.ROLLING, 5), (Strategy.IMMEDIATE, 3)):
            one = requests.get((strategy, 1))
            if one is None:
                continue
            flyctl_one = 1 + per_machine
            self.report.info(
                f"Fly API requests per {strategy} redeploy (1 machine)",
                str(one),
                f"flyctl: {flyctl_one}",
            )
            many = requests.get((strategy, m))
            if many is None or m == 1:
                continue
            refreshes = {n: self._lease_refreshes(strategy, n) for n in (1, m)}
            marginal = (many - refreshes[m] - (one - refreshes[1])) / (m - 1)
            self.report.ratio(
                f"Fly API requests per machine, {strategy}, lease refreshes apart "
                f"(flyctl: {per_machine})",
                marginal,
                f"≤ {per_machine}",
                float(per_machine),
                f"({many} - {refreshes[m]} - ({one} - {refreshes[1]})) / {m - 1} machines",
                unit="",
            )
            if strategy is not Strategy.ROLLING:
                continue  # flyctl holds an immediate deploy's leases only for the update
            wall = walls[(strategy, m)]
            self.report.info(
                f"lease refreshes, {strategy} redeploy of {m} machines",
                str(refreshes[m]),
                f"flyctl: at least {math.floor(wall / 4)} (one lease held for the whole "
                f"{wall:.1f} s, refreshed every 4 s)",
            )

    def _lease_refreshes(self, strategy: Strategy, machines: int) -> int:
        """Lease requests beyond one per machine: the refreshes."""
        by_route = self.report.requests.get(f"{strategy}/{machines}", {})
        leases = by_route.get("POST /v1/apps/{app_name}/machines/{machine_id}/lease", 0)
        return max(leases - machines, 0)

    async def _redeploy(
        self, strategy: Strategy, machines: int
    ) -> tuple[float | None, int, dict[str, int]]:
        o, sim = self.o, self.stack.emulator
        # The release before behaves as the app always does (boot time included): what
        # the rollout learns from it is what it would learn in production.
        sim.set_timing(o.api_latency, o.start_delay, o.healthy_after)
        repo = self.stack.new_repos(1)[0]
        first = self._request(repo, machine_count=machines, strategy=strategy)
        before = sim.counters()
        _require(await self._deploy(first), f"the first {strategy} deploy")
        self.report.requests[f"first/{strategy}/{machines}"] = _routes(before, sim.counters())
        again = DeployRequest.model_validate(
            {
                **first.model_dump(exclude={"deployment_id"}),
                "image": REDEPLOY_IMAGE,
                "max_unavailable": o.max_unavailable,
            }
        )
        before = sim.counters()
        timed = await self._deploy(again)
        after = sim.counters()
        sim.set_timing(0, 0, 0)
        if not timed.ok:
            return None, 0, {}
        routes = _routes(before, after)
        return timed.seconds, after["total_requests"] - before["total_requests"], routes

    def _critical_path(self, strategy: Strategy, machines: int) -> float:
        """What the provider makes any client wait: the API round trips that must follow one
        another (read the app, list its machines, lease, release; per batch an update) and,
        per batch of machines, the start and the time until its checks pass."""
        o = self.o
        if strategy is Strategy.IMMEDIATE or machines == 1:
            batches = 1
        else:
            size = max(1, math.ceil(o.max_unavailable * machines))
            batches = 1 + math.ceil((machines - 1) / size)
        return 4 * o.api_latency + batches * (o.api_latency + o.start_delay + o.healthy_after)

    async def git(self) -> None:
        """A deploy's git time on a large generated repository against the example project's,
        both served through git's own transport (`file://`, upload-pack, as from GitHub)."""
        o = self.o
        self.stack.emulator.set_timing(0, 0, 0)
        repos = self.stack.state_dir / "repos"
        built = time.perf_counter()
        size = await asyncio.to_thread(
            big_repository,
            self.stack.template_repo,
            repos / "big-template.git",
            files=o.big_files,
            large=o.big_blobs,
            large_mb=o.big_blob_mb,
        )
        built = time.perf_counter() - built
        times: dict[str, list[float]] = {"example": [], "big": []}
        for _ in range(o.git_runs):
            # Alternated, fresh repositories each (a deploy commits fly.toml to its own).
            for kind, template in (
                ("example", self.stack.template_repo),
                ("big", repos / "big-template.git"),
            ):
                dest = repos / f"git-{kind}-{uuid.uuid4().hex[:6]}.git"
                await asyncio.to_thread(shutil.copytree, template, dest)
                run = await self._deploy(self._request(f"file://{dest}"))
                _require(run, f"the deploy of the {kind} repository")
                times[kind].append((await _step_times(run.handle))["prepare_fly_config"])
        example, big = (statistics.median(times[k]) for k in ("example", "big"))
        full = await _full_clone_seconds(repos / "big-template.git")
        self.report.ratio(
            "git time of a deploy: ~200 MB repository ÷ example project",
            big / example,
            "≤ 1.2",
            1.2,
            f"{big * 1000:.0f} ms vs {example * 1000:.0f} ms (medians of {o.git_runs}); "
            f"{size / 1e6:.0f} MB on disk, {o.big_files} files and {o.big_blobs} blobs of "
            f"{o.big_blob_mb} MiB (generated in {built:.0f} s); a full depth-1 clone of it "
            f"alone takes {full * 1000:.0f} ms",
        )

    async def wake(self) -> None:
        """A redeploy of a scaled-to-zero app (min 0, its machine stopped): the rollout
        updates the machine without starting it, and the health check's request wakes it
        through the proxy. Against the wake-up plus the rollout's critical path."""
        o, sim = self.o, self.stack.emulator
        sim.set_timing(o.api_latency, o.start_delay, o.healthy_after)
        first = self._request(self.stack.new_repos(1)[0])
        _require(await self._deploy(first), "the deploy before scaling to zero")
        app = app_name_for(first.project_id)
        sim.configure({"timing": {"autostop_after": 0.2}})
        deadline = time.monotonic() + 30
        while True:
            state = await sim.app_state(app)
            if state["machines"] and all(m["state"] == "stopped" for m in state["machines"]):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the machines of {app} did not stop when idle")
            await asyncio.sleep(0.05)
        sim.configure({"timing": {"autostop_after": None}})
        wakeups = sim.counters()["proxy_wakeups"]
        again = DeployRequest.model_validate(
            {**first.model_dump(exclude={"deployment_id"}), "image": REDEPLOY_IMAGE}
        )
        timed = await self._deploy(again)
        woken = sim.counters()["proxy_wakeups"] - wakeups
        sim.set_timing(0, 0, 0)
        wake = o.start_delay + o.healthy_after
        # Listing (the snapshot), lease, update (left stopped), release.
        path = 4 * o.api_latency
        self.report.ratio(
            "scale-to-zero redeploy (machine stopped) ÷ (wake-up + rollout critical path)",
            timed.seconds / (wake + path) if timed.ok else None,
            "≤ 1.10",
            1.10,
            f"{timed.seconds:.2f} s vs {wake:.2f} s + {path:.2f} s; the proxy woke "
            f"{woken} machine(s) for the health check" + ("" if timed.ok else f"; {timed.error}"),
        )

    async def mass(self) -> None:
        """`mass` projects redeployed at once by a worker with the request budget on (its
        default rate), against an emulator that answers 429 over the same rate."""
        o, n, sim = self.o, self.o.mass, self.stack.emulator
        rate = o.fly_api_rate
        sim.set_timing(0, 0, 0)
        repos = self.stack.new_repos(n)
        firsts = [self._request(r) for r in repos]
        _, done = await self._all_at_once([functools.partial(self._deploy, f) for f in firsts])
        for run in done:
            _require(run, "a deploy before the mass redeploy")
        queue = f"{self.queue}-budget"
        worker = self.stack.start_worker(
            queue, name="worker-budget", unset=("TURBODEPLOY_FLY_API_RATE",)
        )
        await self.stack.wait_for_pollers(queue)
        # Over the worker's budget, with a tenth of headroom: the limiter grants a token
        # before the request is written, and on a saturated CPU the event loop may hold
        # a few granted requests back and send them together.
        sim.configure({"rate_limit_rps": rate * 1.1})
        try:
            agains = [
                DeployRequest.model_validate(
                    {**f.model_dump(exclude={"deployment_id"}), "image": REDEPLOY_IMAGE}
                )
                for f in firsts
            ]
            before = sim.counters()
            began, began_at = time.perf_counter(), time.time()
            finished: list[float] = [math.inf] * n

            async def one(i: int) -> Timed:
                run = await self._deploy(agains[i], queue=queue)
                finished[i] = time.perf_counter() - began
                return run

            elapsed, runs = await self._all_at_once([functools.partial(one, i) for i in range(n)])
            after = sim.counters()
        finally:
            sim.configure({"rate_limit_rps": None})
            self.stack.stop_worker(worker)
        ok = sum(r.ok for r in runs)
        sent = after["total_requests"] - before["total_requests"]
        refused = after["rate_limited"] - before["rate_limited"]
        bound = sent / rate
        self.report.ratio(
            f"mass redeploy, {n} projects at once under the {rate:g} req/s budget: "
            "time ÷ (requests ÷ rate)",
            elapsed / bound if ok == n else None,
            "≤ 1.10",
            1.10,
            f"{ok}/{n} deployed in {elapsed:.1f} s; {sent} requests ({sent / n:.1f} per "
            f"redeploy) ÷ {rate:g}/s = {bound:.1f} s" + _first_error(runs),
        )
        self.report.ratio(
            "mass redeploy: 429 answers from the emulator",
            float(refused),
            "0",
            0.0,
            f"of {sent} requests; the emulator refuses over {rate * 1.1:g} req/s",
            unit="",
        )
        # The limiter serves the oldest deploy first: the k-th to begin its Fly work waits
        # for the budget the k - 1 before it spend, never for a later one. Its bound: its
        # share of the budget's time, plus what the first one took (it waited for no one's
        # budget: the rest of a deploy on a worker this busy).
        began_fly = [await _fly_work_began(r.handle) for r in runs]
        first_fly = min(began_fly)
        order = sorted(range(n), key=lambda i: began_fly[i])
        done_at = [began_at + finished[i] - first_fly for i in order]
        own = done_at[0]
        lateness = [
            done_at[rank] / (rank / n * bound + own) for rank, i in enumerate(order) if runs[i].ok
        ]
        ordered = sorted(f for f in finished if f < math.inf)
        median = statistics.median(ordered) if ordered else math.nan
        self.report.scaling.append(
            {"mass": n, "fly_began_s": [began_fly[i] - first_fly for i in order],
             "finished_s": done_at}
        )  # fmt: skip
        self.report.ratio(
            "mass redeploy: no project starved, slowest finish ÷ its first-come bound",
            max(lateness) if ok == n else None,
            "≤ 1.5",
            1.5,
            f"bound of the k-th to begin its Fly work: (k - 1)/{n} of {bound:.1f} s + "
            f"{own:.2f} s (the first one's time); slowest finish {ordered[-1]:.1f} s = "
            f"{ordered[-1] / median:.2f} times the median {median:.1f} s (first come, "
            "first served by deploy: BENCHMARKS.md)",
        )

    async def in_flight(self) -> None:
        """`in_flight` deploys open at once against the realistic emulator: worker memory
        and CPU per deploy."""
        o, n = self.o, self.o.in_flight
        sim = self.stack.emulator
        sim.set_timing(0, 0, 0)
        repos = self.stack.new_repos(n)
        sim.set_timing(o.api_latency, o.start_delay, o.healthy_after)
        open_now = peak_open = 0

        async def tracked(repo: str) -> Timed:
            nonlocal open_now, peak_open
            open_now += 1
            peak_open = max(peak_open, open_now)
            try:
                return await self._deploy(self._request(repo))
            finally:
                open_now -= 1

        usage = self.deploy_worker.usage()
        with sampled_peak(self.deploy_worker.pid) as samples:
            elapsed, deploys = await self._all_at_once(
                [functools.partial(tracked, r) for r in repos]
            )
        after = self.deploy_worker.usage()
        sim.set_timing(0, 0, 0)
        ok = sum(d.ok for d in deploys)
        peak = max(samples, default=after.rss_mb)
        cpu = after.cpu - usage.cpu
        self.report.ratio(
            f"worker peak RSS, {n} deploys in flight (MB)",
            peak if ok == n else None,
            "≤ 400",
            400.0,
            f"{ok}/{n} deployed in {elapsed:.0f} s, {peak_open} open at once; "
            f"RSS before {usage.rss_mb:.0f} MB, high-water mark {after.peak_rss_mb:.0f} MB"
            + _first_error(deploys),
            unit=" MB",
        )
        self.report.info(
            f"worker CPU per deploy, {n} in flight",
            f"{cpu / n * 1000:.0f} ms",
            f"{cpu:.0f} CPU-s in total, {n / elapsed:.1f} deploys/s",
        )
        self.report.scaling.append(
            {"concurrent": n, "deploys_per_s": n / elapsed, "cpu_ms_per_deploy": cpu / n * 1000,
             "peak_rss_mb": peak, "realistic_emulator": True}
        )  # fmt: skip

    async def two_workers(self) -> None:
        """A second `python worker.py` on the same task queue: who runs what."""
        n = self.o.share_deploys
        self.stack.emulator.set_timing(0, 0, 0)
        second = self.stack.start_worker(self.queue, name="worker-2")
        await self.stack.wait_for_pollers(self.queue, count=2)
        workers = {"worker 1": self.deploy_worker, "worker 2": second}
        pids = {str(w.pid): name for name, w in workers.items()}
        before = {name: w.usage().cpu for name, w in workers.items()}
        repos = self.stack.new_repos(n)
        elapsed, deploys = await self._all_at_once(
            [functools.partial(self._deploy_repo, r) for r in repos]
        )
        cpu = {name: w.usage().cpu - before[name] for name, w in workers.items()}
        # Gone again: the phases after this one measure one deploy worker.
        self.stack.stop_worker(second)
        ran: Counter[str] = Counter()
        for d in deploys:
            if d.handle is not None:
                for identity in await _activity_identities(d.handle):
                    ran[pids.get(identity.split("@", 1)[0], identity)] += 1
        total = sum(ran.values()) or 1
        shares = {name: ran[name] / total for name in workers}
        ok = sum(d.ok for d in deploys)
        self.report.ratio(
            "two workers on one task queue: smaller share of the activities",
            min(shares.values()),
            "≥ 0.25",
            0.25,
            ", ".join(
                f"{name} {ran[name]} activities ({shares[name]:.0%}), {cpu[name]:.1f} CPU-s"
                for name in workers
            )
            + f"; {ok}/{n} deployed, {ok / elapsed:.1f} deploys/s",
            higher_is_better=True,
            unit="",
        )

    async def crash(self) -> None:
        """SIGKILL of the deploy worker in the middle of a rolling redeploy, a new worker
        started at once: how long until the rollout makes progress again (the next machine
        updated), with the production `DeployTimings`.

        The kill lands just after a machine's update, while it starts; that machine is
        healthy again after start_delay + healthy_after, sooner than the retry can come,
        so what is measured is the crash, not the provider's waits.
        """
        o, sim, n = self.o, self.stack.emulator, max(2, self.o.crash_machines)
        sim.set_timing(0, 0, 0)
        repo = self.stack.new_repos(1)[0]
        # One machine at a time: there is always a next machine to make progress on.
        first = self._request(repo, machine_count=n, strategy=Strategy.ROLLING, max_unavailable=1)
        _require(await self._deploy(first), "the deploy before the crash")
        app = app_name_for(first.project_id)
        sim.set_timing(o.api_latency, o.start_delay, o.healthy_after)
        again = DeployRequest.model_validate(
            {**first.model_dump(exclude={"deployment_id"}), "image": REDEPLOY_IMAGE}
        )
        redeploy = asyncio.create_task(self._deploy(again))

        async def updated() -> tuple[int, dict[str, Any]]:
            state = await sim.app_state(app)
            images = [m["config"].get("image") for m in state["machines"]]
            return images.count(REDEPLOY_IMAGE), state

        while (await updated())[0] < 1:
            if redeploy.done():
                break
            await asyncio.sleep(0.02)
        at_kill, state = await updated()
        held = {x["machine_id"]: x["nonce"] for x in state["leases"]}
        leases_sent = _lease_requests(state)
        victim = self.deploy_worker
        self.stack.kill_worker(victim)
        killed = time.perf_counter()
        self.deploy_worker = self.stack.start_worker(self.queue, name="worker-1-after-kill")
        leased_at: float | None = None
        progress_at: float | None = None
        taken_over = 0
        while not redeploy.done():
            count, state = await updated()
            now = time.perf_counter()
            if leased_at is None and _lease_requests(state) > leases_sent:
                leased_at = now
            if leased_at is not None and not taken_over:
                taken_over = sum(held.get(x["machine_id"]) == x["nonce"] for x in state["leases"])
            if count > at_kill:
                progress_at = now
                break
            await asyncio.sleep(0.02)
        timed = await redeploy
        sim.set_timing(0, 0, 0)
        if progress_at is None or not timed.ok:
            self.report.ratio(
                "crash recovery: worker SIGKILLed mid-rollout → progress again (s)",
                None,
                "≤ 15 s",
                15.0,
                timed.error or "the rollout made no progress after the kill",
            )
            return
        defaults = DeployTimings()
        self.report.ratio(
            "crash recovery: worker SIGKILLed mid-rollout → progress again (s)",
            progress_at - killed,
            "≤ 15 s",
            15.0,
            f"kill after {at_kill}/{n} machines updated, next one updated "
            f"{progress_at - killed:.1f} s later"
            + (f"; leases held again after {leased_at - killed:.1f} s" if leased_at else "")
            + f" ({taken_over} of {len(held)} taken over by nonce)"
            + f"; heartbeat timeout {defaults.heartbeat_timeout.total_seconds():g} s, "
            f"lease TTL {defaults.lease_ttl.total_seconds():g} s; the redeploy "
            f"{'deployed' if timed.ok else 'failed'} in {timed.seconds:.1f} s",
            unit=" s",
        )


_LEASE_ROUTE = "POST /v1/apps/{app_name}/machines/{machine_id}/lease"


def _routes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Fly API requests by route between two readings of the emulator's counters."""
    return {
        route: n - before["by_route"].get(route, 0)
        for route, n in after["by_route"].items()
        if n - before["by_route"].get(route, 0)
    }


def _request_key(key: str) -> tuple[str, Strategy, int]:
    """`first/rolling/10` or `rolling/10` (a redeploy) -> (kind, strategy, machines)."""
    parts = key.split("/")
    kind = "first deploy" if parts[0] == "first" else "redeploy"
    return kind, Strategy(parts[-2]), int(parts[-1])


def _flyctl_requests(kind: str, strategy: Strategy, machines: int) -> int:
    """flyctl's requests for the same deploy, from FLY-DEPLOY-NOTES.md (lower bounds: one
    wait and one health read per machine).

    First deploy: the app looked up, created and looked up again, the IPs listed and two
    allocated (6), then per machine a create (which leases), a wait, a health read and a
    release; immediate does not wait (a create and a release). Redeploy: one listing,
    then per machine a lease, an update, a wait, a health read and a release; immediate a
    lease, an update and a release.
    """
    rolling = strategy is not Strategy.IMMEDIATE
    if kind == "first deploy":
        return 6 + (4 if rolling else 2) * machines
    return 1 + (5 if rolling else 3) * machines


def _refreshes(by_route: dict[str, int], kind: str, machines: int) -> int:
    """Lease requests beyond the ones that take a lease: the refreshes (a create asks for
    its lease itself)."""
    taken = 0 if kind == "first deploy" else machines
    return max(by_route.get(_LEASE_ROUTE, 0) - taken, 0)


_FLY_ACTIVITIES = frozenset({"ensure_fly_app", "snapshot_release", "roll_out_release"})


async def _fly_work_began(handle: WorkflowHandle[Any, Any] | None) -> float:
    """When the run's first activity that talks to Fly started, in seconds since the epoch
    (the server's clock, on this machine)."""
    if handle is None:
        return math.inf
    history = await handle.fetch_history()
    scheduled: dict[int, str] = {}
    for e in history.events:
        if e.HasField("activity_task_scheduled_event_attributes"):
            scheduled[e.event_id] = e.activity_task_scheduled_event_attributes.activity_type.name
        elif e.HasField("activity_task_started_event_attributes"):
            name = scheduled.get(e.activity_task_started_event_attributes.scheduled_event_id)
            if name in _FLY_ACTIVITIES:
                return float(e.event_time.ToMicroseconds()) / 1e6
    return math.inf


async def _full_clone_seconds(repo: Path) -> float:
    """What a depth-1 clone with every blob (as deploys cloned before) takes of `repo`."""
    dest = repo.with_name(f"full-{uuid.uuid4().hex[:6]}.git")
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        "git", "clone", "--quiet", "--bare", "--depth=1", "--single-branch", "--no-tags",
        f"file://{repo}", str(dest),
    )  # fmt: skip
    await proc.wait()
    elapsed = time.perf_counter() - started
    await asyncio.to_thread(shutil.rmtree, dest, ignore_errors=True)
    return elapsed


def _lease_requests(state: dict[str, Any]) -> int:
    by_route: dict[str, int] = state["counters"]["by_route"]
    return by_route.get("POST /v1/apps/{app_name}/machines/{machine_id}/lease", 0)


# -------------------------------------------------------------------------- histories


async def _activity_count(handle: WorkflowHandle[Any, Any]) -> int:
    history = await handle.fetch_history()
    return sum(1 for e in history.events if e.HasField("activity_task_scheduled_event_attributes"))


async def _activity_identities(handle: WorkflowHandle[Any, Any]) -> list[str]:
    history = await handle.fetch_history()
    return [
        e.activity_task_started_event_attributes.identity
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
    ]


async def _step_times(handle: WorkflowHandle[Any, Any] | None) -> dict[str, float]:
    """Seconds from schedule to completion of each activity type, summed."""
    if handle is None:
        return {}
    history = await handle.fetch_history()
    scheduled: dict[int, tuple[str, float]] = {}
    times: dict[str, float] = {}
    for e in history.events:
        at = e.event_time.ToDatetime().timestamp()
        if e.HasField("activity_task_scheduled_event_attributes"):
            name = e.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[e.event_id] = (name, at)
        elif e.HasField("activity_task_completed_event_attributes"):
            name, start = scheduled[e.activity_task_completed_event_attributes.scheduled_event_id]
            times[name] = times.get(name, 0.0) + at - start
    if history.events:
        first, last = history.events[0], history.events[-1]
        times["(whole run, server-side)"] = (
            last.event_time.ToDatetime() - first.event_time.ToDatetime()
        ) / timedelta(seconds=1)
    return times


def _median_run(runs: list[Timed]) -> Timed:
    ordered = sorted(runs, key=lambda r: r.seconds)
    return ordered[(len(ordered) - 1) // 2]


def _require(run: Timed, what: str) -> None:
    if not run.ok:
        raise RuntimeError(f"{what} failed: {run.error}")


def _cause(exc: BaseException) -> str:
    while getattr(exc, "cause", None) is not None:
        exc = exc.cause  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"[:300]


def _minus(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def _first_error(runs: list[Timed]) -> str:
    failed = [r for r in runs if not r.ok]
    return f"; first failure: {failed[0].error}" if failed else ""
