"""Sweeps over many devices: engine-config groups spread over Ray actors, one device each (docs/design.md, "Scale-out").

The driver (the `profile sweep --ray` process) plans the sweep, starts one `SweepWorker` actor per device and
hands each an engine-config group at a time. A worker runs `harness.drivers.measure.measure_group` on its device and
sends every write (a finished point's tables, a failure, an engine start) and its progress events through a Ray
queue to the driver, which keeps the run folder's `RunStore`: every point is written once, on the driver, through
the same atomic store as a single-device sweep. Workers read only the model folders and the prompts file; the
results folder needs to be on the driver only (checked at the start, with the versions on every node).

Ray is imported only here and only when a Ray sweep runs (the `ray` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from harness import __version__
from harness.drivers.measure import measure_group
from harness.drivers.plan import Plan, Reporter, SweepOptions, plan_sweep, prompt_sources
from harness.drivers.session import StopFlag, environment, stop_on_signals
from harness.drivers.sweep import SweepResult, finish_sweep, open_store
from harness.engine.device import cpu_model
from harness.engine.vllm_engine import engine_environment
from harness.rundata.spec import Point, SpecError, SweepSpec
from harness.rundata.store import RunStore, check_writable, utc_now
from harness.telemetry.sources import open_source

TAGGED_TABLES = ("samples", "telemetry", "iterations", "requests")  # tables whose rows get node/device tags
VERSION_KEYS = ("vllm", "torch")  # a node whose versions differ from the driver's is refused
START_TIMEOUT_S = 300.0  # workers that Ray cannot place (or that do not come up) within this fail the start
STOP_WAIT_S = 120.0  # after a stop, how long workers get to finish the request in flight and close their engine
POLL_S = 0.2

# Kills what an actor process leaves behind (its vLLM engine core and workers) when the actor dies: Ray's
# ray.kill and a lost worker end it with SIGKILL, and vLLM's engine core does not notice its parent going.
_REAPER = """
import os, sys, time, psutil
parent = psutil.Process(int(sys.argv[1]))
me, kids = os.getpid(), []
while True:
    try:
        kids = [k for k in parent.children(recursive=True) if k.pid != me] or kids
    except psutil.NoSuchProcess:
        break
    if not parent.is_running():
        break
    time.sleep(0.5)
for k in kids:
    try:
        k.kill()
    except psutil.Error:
        pass
"""


@dataclass
class RayOptions:
    """How to spread a sweep over Ray (`profile sweep --ray ...`)."""

    address: str | None = None  # None: start a local Ray; "auto", "HOST:PORT" or "ray://...": join that cluster
    workers: int | None = None  # None: one per GPU (cuda) or per node (cpu), at most one per engine-config group
    cpus_per_worker: int | None = None  # CPU: cores each worker's engine owns (None: a whole node's)
    share_device: bool = False  # allow two engines on one device (tests); the manifest marks the run shared_device
    max_retries: int = 1  # a group whose worker died is retried on another worker at most this many times
    local_cpus: int | None = None  # CPUs a local Ray may use (None: Ray's default, all cores)


class WorkerLost(RuntimeError):
    """A worker died (process killed, node lost) while it measured a group."""


def _file_digest(path: str) -> str | None:
    p = Path(path)
    target = p / "config.json" if p.is_dir() else p
    try:
        return hashlib.sha256(target.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def node_info(paths: list[str]) -> dict[str, Any]:
    """What this process runs on: host, versions, CPU, and a digest of each path the sweep reads (None: not seen)."""
    env = engine_environment()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "harness": __version__,
        **{k: env.get(k) for k in (*VERSION_KEYS, "vllm_build")},
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "paths": {p: _file_digest(p) for p in paths},
    }


def check_workers(driver: dict[str, Any], workers: list[dict[str, Any]], share_device: bool) -> None:
    """Refuse, in one line naming the node, a worker whose versions differ from the driver's, one that does not
    see a model folder or prompts file as the driver does, or (without share_device) two workers on one device."""
    for w in workers:
        where = f"node {w['host']} ({w.get('ip', '?')}, worker {w['worker']})"
        for key in VERSION_KEYS:
            if w.get(key) != driver.get(key):
                raise SpecError(
                    f"{where} has {key} {w.get(key)}, the driver has {driver.get(key)}; install the same "
                    "versions on every node"
                )
        for path, digest in driver["paths"].items():
            seen = w["paths"].get(path)
            if seen != digest:
                what = "does not see" if seen is None else "sees another file at"
                raise SpecError(
                    f"{where} {what} {path}: model folders and the prompts file must be on a path every node "
                    "shares (or copied to the same place on each); the results folder lives on the driver"
                )
    if not share_device:
        seen_devices: dict[tuple[str, str], str] = {}
        for w in workers:
            device = (str(w["host"]), str(w["device_id"]))
            if device in seen_devices:
                raise SpecError(
                    f"workers {seen_devices[device]} and {w['worker']} share one device on node {w['host']} "
                    f"({w['device_id']}); pass --ray-share-device to allow it (their timings interfere)"
                )
            seen_devices[device] = w["worker"]


def _tag(table: pa.Table, tags: dict[str, str]) -> pa.Table:
    for name, value in tags.items():
        if name not in table.column_names:
            table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
    return table


class _QueueStore:
    """A worker's stand-in for the run folder's RunStore: every write goes to the driver through the queue."""

    def __init__(self, queue: Any, worker: str, run_id: str, tags: dict[str, str]) -> None:
        self.queue, self.worker, self.tags = queue, worker, tags
        self.run_dir = Path(tempfile.gettempdir()) / "harness-ray-worker" / run_id  # never written: .name only

    def write_point(self, point_id: str, tables: dict[str, pa.Table]) -> None:
        tagged = {k: _tag(t, self.tags) if k in TAGGED_TABLES else t for k, t in tables.items()}
        self.queue.put(("write", self.worker, point_id, tagged))

    def record_failure(self, record: dict[str, Any]) -> None:
        self.queue.put(("failure", self.worker, {**record, "worker": self.worker, "node": self.tags["node"]}))

    def add_engine_start(self, entry: dict[str, Any], exceptions: list[dict[str, Any]]) -> None:
        entry = {**entry, "worker": self.worker, "node": self.tags["node"], "device_id": self.tags["device_id"]}
        self.queue.put(("engine_start", self.worker, entry, exceptions))

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        return {}  # counts are the driver's

    def read_manifest(self) -> dict[str, Any]:
        return {}


class SweepWorker:
    """A Ray actor holding one device: it measures the engine-config groups the driver hands it."""

    def __init__(self, worker: str, device: str) -> None:
        self.worker, self.device = worker, device
        self.gpu = 0 if device == "cuda" else None  # Ray's CUDA_VISIBLE_DEVICES leaves this actor one GPU
        self.stop_flag = StopFlag()
        self.sources: dict[str, Any] | None = None
        subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid())], start_new_session=True)

    def info(self, paths: list[str]) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        with open_source(self.gpu) as source:
            device_id = source.info.get("uuid") or cpu_model()
            device_name = source.info.get("device_name") or cpu_model()
            telemetry = {"source": source.name, "reason": source.reason, "power_field": source.info.get("power_field")}
        node_id = ctx.get_node_id()
        ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), None)
        return {
            "worker": self.worker,
            **node_info(paths),
            "ip": ip,
            "node_id": node_id,
            "device": device_name,
            "device_id": device_id,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "telemetry": telemetry,
        }

    def stop(self) -> None:
        self.stop_flag.signal = 2  # SIGINT: finish the request in flight, close the engine, return

    def run_group(self, plan: Plan, group: list[Point], options: SweepOptions, queue: Any, run_id: str) -> Any:
        if self.sources is None:
            self.sources = prompt_sources(plan)
        with open_source(self.gpu) as source:
            tags = {
                "node": socket.gethostname(),
                "device_id": source.info.get("uuid") or cpu_model(),
                "worker": self.worker,
            }
            store = _QueueStore(queue, self.worker, run_id, tags)

            def report(event: str, data: dict[str, Any]) -> None:
                if event in ("engine", "point", "failure", "log"):
                    queue.put(("report", self.worker, event, data))

            return measure_group(plan, group, options, source, self.sources, store, set(), self.stop_flag, report)  # type: ignore[arg-type]


@dataclass
class _Worker:
    name: str
    actor: Any
    info: dict[str, Any]
    points_done: int = 0
    engine_starts: int = 0
    alive: bool = True


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SpecError("--ray needs Ray: install the ray extra (pip install -e '.[ray]')") from None
    return ray


def _paths_read_by_workers(spec: SweepSpec, plan: Plan) -> list[str]:
    paths = sorted({m.path for m in plan.models.values()})
    return [*paths, spec.prompts] if spec.prompts else paths


class _Cluster:
    """The driver's side: the actors, the queue, and the store they all write through."""

    def __init__(self, ray: Any, plan: Plan, options: SweepOptions, ropts: RayOptions, report: Reporter) -> None:
        self.ray, self.plan, self.options, self.ropts, self.report = ray, plan, options, ropts, report
        self.workers: list[_Worker] = []
        self.paths = _paths_read_by_workers(plan.spec, plan)
        self.driver = node_info(self.paths)
        from ray.util.queue import Queue

        self.queue = Queue()
        self.next_id = 0

    def _resources(self) -> dict[str, Any]:
        if self.plan.spec.device == "cuda":
            return {"num_gpus": 0.5 if self.ropts.share_device else 1, "num_cpus": self.ropts.cpus_per_worker or 1}
        cpus = self.ropts.cpus_per_worker
        if cpus is None:  # a whole node: the smallest node's cores
            cpus = int(min(n["Resources"].get("CPU", 1) for n in self.ray.nodes() if n["Alive"]))
        return {"num_cpus": cpus}

    def default_workers(self) -> int:
        total = self.ray.cluster_resources()
        if self.plan.spec.device == "cuda":
            n = int(total.get("GPU", 0) * (2 if self.ropts.share_device else 1))
        else:
            n = int(total.get("CPU", 1) // self._resources()["num_cpus"])
        return max(1, n)

    def start_workers(self, n: int) -> list[_Worker]:
        """Start n actors and check them (versions, paths, devices) before any engine starts."""
        actor_cls = self.ray.remote(max_concurrency=2, max_restarts=0)(SweepWorker)
        res = self._resources()
        new = []
        for _ in range(n):
            name = f"w{self.next_id}"
            self.next_id += 1
            new.append((name, actor_cls.options(**res).remote(name, self.plan.spec.device)))
        try:
            infos = self.ray.get([a.info.remote(self.paths) for _, a in new], timeout=START_TIMEOUT_S)
        except self.ray.exceptions.GetTimeoutError:
            for _, a in new:
                self.ray.kill(a)
            raise SpecError(
                f"Ray could not start {n} worker(s) with {res} each within {START_TIMEOUT_S:.0f} s "
                f"(cluster resources: {self.ray.cluster_resources()}); ask for fewer workers"
            ) from None
        workers = [_Worker(name, a, {**i, "resources": res}) for (name, a), i in zip(new, infos, strict=True)]
        try:
            check_workers(self.driver, [w.info for w in self.workers if w.alive] + [w.info for w in workers],
                          self.ropts.share_device)
        except SpecError:
            for w in workers:
                self.ray.kill(w.actor)
            raise
        self.workers += workers
        return workers

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "ray_address": self.ropts.address or "local",
            "store": {
                "where": "driver",
                "host": self.driver["host"],
                "note": "workers send every finished point to the driver, which writes it through the run "
                "folder's atomic store; the results folder need not be shared",
            },
            "shared_device": self.ropts.share_device,
            "max_retries": self.ropts.max_retries,
            "driver": {k: self.driver[k] for k in ("host", "python", "harness", *VERSION_KEYS, "vllm_build")},
            "workers": [w.info for w in self.workers],
            "started_at": utc_now(),
        }

    def kill_all(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                self.ray.kill(w.actor)
            w.alive = False


def run_cluster_sweep(spec: SweepSpec, options: SweepOptions, ropts: RayOptions, report: Reporter) -> SweepResult:
    """Run (or resume) a sweep with its engine-config groups spread over Ray workers.

    Everything `run_sweep` checks is checked here too, plus the workers (versions, paths, devices), before a run
    folder is written or an engine started.
    """
    if options.lock_clocks_mhz is not None:
        raise SpecError("--lock-clocks is not supported with --ray (lock the clocks on each node beforehand)")
    plan = plan_sweep(spec)
    prompt_sources(plan)  # the prompt checks, before Ray starts
    if options.resume_dir is None:
        check_writable(options.out_root)
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        init: dict[str, Any] = {"address": ropts.address, "include_dashboard": False, "log_to_driver": options.verbose}
        if ropts.address is None and ropts.local_cpus is not None:
            init["num_cpus"] = ropts.local_cpus
        ray.init(**init)
    cluster = _Cluster(ray, plan, options, ropts, report)
    store: RunStore | None = None
    try:
        with stop_on_signals() as stop:
            try:
                n = ropts.workers or cluster.default_workers()
                cluster.start_workers(max(1, min(n, len(plan.groups))))
                entry = cluster.manifest_entry()
                first = cluster.workers[0].info
                telemetry = {**first["telemetry"], "interval_ms": spec.telemetry_interval_ms, "clocks_locked_mhz": None}
                extra: dict[str, Any] = {"cluster": entry}
                if options.resume_dir is not None:
                    old = RunStore.open(options.resume_dir).read_manifest()
                    extra["cluster_attempts"] = [*old.get("cluster_attempts", []), entry]
                else:
                    extra["cluster_attempts"] = [entry]
                env = {
                    **environment({"device_name": first["device"]}, plan.spec.device),
                    "shared_device": ropts.share_device,
                }
                store = open_store(plan, options, env, telemetry, report, extra)
                status = _schedule(cluster, store, stop)
            except KeyboardInterrupt:  # a second Ctrl-C: stop now
                status = "interrupted"
            finally:
                cluster.kill_all()
    finally:
        if started_here:
            ray.shutdown()
    if store is None:
        raise SpecError("interrupted before the run folder was made")
    return finish_sweep(store, plan, status, report)


def _schedule(cluster: _Cluster, store: RunStore, stop: StopFlag) -> str:
    """Hand out groups to idle workers until every group is measured (or retried out), writing what comes back."""
    ray, plan, report, ropts = cluster.ray, cluster.plan, cluster.report, cluster.ropts
    done = store.done_points()
    pending: deque[tuple[list[Point], int]] = deque()
    for g in plan.groups:
        left = [p for p in g if p.point_id not in done]
        if left:
            pending.append((left, 0))
    report("start", {"run_dir": store.run_dir, "points_total": len(plan.points), "points_done": len(done),
                     "engine_starts": len(pending), "workers": [w.info for w in cluster.workers]})
    worker_options = replace(cluster.options, engine_output=None, resume_dir=None, gpu=None, command=[])
    running: dict[Any, tuple[_Worker, list[Point], int]] = {}
    failed = 0
    stopping = False
    t_stop = 0.0
    by_name = {w.name: w for w in cluster.workers}

    def drain() -> None:
        while True:
            try:
                items = cluster.queue.get_nowait_batch(max(cluster.queue.qsize(), 1))
            except Exception:  # ray.util.queue.Empty
                return
            if not items:
                return
            for item in items:
                _handle(item, store, done, by_name, plan, report)

    while pending or running:
        if stop.signal is not None and not stopping:
            stopping, t_stop = True, time.monotonic()
            report("log", {"message": "stopping: each worker finishes its request in flight and closes its engine"})
            for w, _, _ in running.values():
                w.actor.stop.remote()
            pending.clear()
        if stopping and time.monotonic() - t_stop > STOP_WAIT_S:
            break
        idle = [w for w in cluster.workers if w.alive and all(w is not r[0] for r in running.values())]
        while idle and pending and not stopping:
            w = idle.pop(0)
            group, attempt = pending.popleft()
            ref = w.actor.run_group.remote(plan, group, worker_options, cluster.queue, store.run_dir.name)
            running[ref] = (w, group, attempt)
        if not running:
            if pending and not stopping:  # every worker is gone: start one more, or give up on the rest
                try:
                    for w in cluster.start_workers(1):
                        by_name[w.name] = w
                    store.update_manifest(cluster={**cluster.manifest_entry()})
                    continue
                except SpecError as e:
                    report("log", {"message": f"no worker left and none could be started: {e}"})
                    for group, _ in pending:
                        for p in group:
                            _record(store, p, WorkerLost(str(e)), "-", report)
                    failed += sum(len(g) for g, _ in pending)
                    pending.clear()
            break
        ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S)
        drain()
        for ref in ready:
            w, group, attempt = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayTaskError:  # an error in the harness itself, not a lost worker
                raise
            except ray.exceptions.RayError as e:  # the actor's process was killed, or its node lost
                drain()  # whatever it sent before it died is kept
                w.alive = False
                left = [p for p in group if p.point_id not in done]
                why = WorkerLost(f"worker {w.name} on node {w.info['host']} died mid-group: {type(e).__name__}")
                for p in left:
                    _record(store, p, why, w.name, report)
                if stopping or not left:
                    continue
                if attempt < ropts.max_retries:
                    report("log", {"message": f"retrying {len(left)} point(s) of {group[0].engine_config_id} on "
                                              f"another worker (attempt {attempt + 2})"})
                    pending.append((left, attempt + 1))
                else:
                    failed += len(left)
                continue
            failed += outcome.failed
            if outcome.status == "failed":  # --fail-fast
                stop.signal = stop.signal or 2
                return "failed"
            if outcome.status == "interrupted":
                stopping = True
    drain()
    store.update_manifest(cluster_progress=_progress(cluster))
    if stopping and len(done) < len(plan.points):
        return "interrupted"
    return "complete" if failed == 0 and len(done) == len(plan.points) else "failed"


def _progress(cluster: _Cluster) -> dict[str, Any]:
    return {w.name: {"points_done": w.points_done, "engine_starts": w.engine_starts, "alive": w.alive}
            for w in cluster.workers}


def _record(store: RunStore, point: Point, error: Exception, worker: str, report: Reporter) -> None:
    store.record_failure({"point_id": point.point_id, "engine_config_id": point.engine_config_id,
                          "axes": point.axes, "error_type": type(error).__name__, "error": str(error),
                          "worker": worker})
    report("failure", {"point": point, "error": f"{type(error).__name__}: {error}", "engine_log": None,
                       "worker": worker})


def _handle(item: tuple[Any, ...], store: RunStore, done: set[str], by_name: dict[str, _Worker], plan: Plan,
            report: Reporter) -> None:
    kind, name = item[0], item[1]
    w = by_name.get(name)
    if kind == "write":
        _, _, point_id, tables = item
        if point_id in done:  # never twice (a retried group only gets points not written)
            return
        store.write_point(point_id, tables)
        done.add(point_id)
        store.update_manifest(points_done=len(done))
        if w is not None:
            w.points_done += 1
    elif kind == "failure":
        store.record_failure(item[2])
    elif kind == "engine_start":
        _, _, entry, exceptions = item
        starts = store.read_manifest().get("engine_starts", [])
        store.update_manifest(
            engine_defaults="vLLM's for `vllm serve` (UsageContext.OPENAI_API_SERVER) on this model "
            "and device, except engine_exceptions and the spec's own [engine] entries and axes",
            engine_exceptions=exceptions, engine_starts=[*starts, entry],
        )
        if w is not None:
            w.engine_starts += 1
    elif kind == "report":
        _, _, event, data = item
        data = {**data, "worker": name, "node": w.info["host"] if w else None}
        if event == "point":
            data.update(done=len(done), total=len(plan.points), workers=_progress_of(by_name))
        elif event == "engine":
            data.update(workers=_progress_of(by_name))
        report(event, data)


def _progress_of(by_name: dict[str, _Worker]) -> dict[str, dict[str, int]]:
    return {n: {"points_done": w.points_done, "engine_starts": w.engine_starts} for n, w in by_name.items()}
