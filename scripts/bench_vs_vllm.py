"""Benchmark: the harness's request latency against vLLM's own latency benchmark (prints figures; not a test).

    python scripts/bench_vs_vllm.py                      # both points, 15 harness requests, 15 vLLM iterations
    python scripts/bench_vs_vllm.py --points seqs8 --requests 30 --iters 30
    python scripts/bench_vs_vllm.py --points defaults --rounds 3   # 3 interleaved starts of each, ratio ± interval
    python scripts/bench_vs_vllm.py --smoke              # seconds-long check that it runs; figures mean nothing

Same model folder (a temporary copy of harness/presets/cpu-tiny with a 10,240-token vocabulary: vLLM's benchmark
draws token ids below 10,000), same engine arguments, batch 1, 512 prompt tokens, 32 new tokens, block size 128,
at two points: `defaults` (vLLM's serving defaults, as the harness runs) and `seqs8` (max_num_seqs = 8).

Order per point: the harness runs first (`profile sweep` on the folder; CPU pinning off, so that both engines bind
threads the same way); its engine's effective config (token budget, max_num_seqs, KV-cache size, ...) is then
passed explicitly to `vllm.benchmarks.latency` (run without the console script, docs/vllm-notes.md), which would
otherwise use the LLM class's defaults. Prefix caching is off in both (vLLM's benchmark reuses one prompt).

Printed per point: vLLM's median request latency, the harness's median request latency (first step() to the
last token, as vLLM times llm.generate, less add_request), their ratio (target 0.9-1.1), and where a difference
goes: the engine core's own iteration times (a stat logger is attached to vLLM's benchmark too) for prefill
and decode in each, and the caller's share (request time minus the engine core's own time) in each. If the
engine core's own times differ, the engines ran differently (config, threads, placement); if they agree and the
totals do not, the difference is on the caller's side (the harness's loop vs LLM.generate).

With `--rounds N` each point runs harness, vLLM, harness, vLLM, ... (N starts of each, interleaved, so a drift of
the machine's level falls on both): the ratio per round, their geometric mean and its 95% t-interval over rounds.

Run it on a quiet machine (nothing else running). It takes a few minutes per point on 2 cores (two engine
starts each). Output also goes to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 512
NEW_TOKENS = 32
BLOCK_SIZE = 128
VOCAB = 10_240
POINTS: dict[str, int | None] = {"defaults": None, "seqs8": 8}  # point -> max_num_seqs (None: vLLM's default)
# engine arguments passed to vLLM's benchmark from the harness engine's effective config
SAME_ARGS = ("max_num_seqs", "max_num_batched_tokens", "kv_cache_memory_bytes", "max_model_len", "block_size")
COMPARED = (*SAME_ARGS, "enable_prefix_caching", "enable_chunked_prefill", "async_scheduling", "compilation_mode",
            "enforce_eager", "dtype", "num_gpu_blocks")

# Runs in a subprocess (vLLM spawns its engine core: the __main__ guard is needed). A stat logger collects the
# engine core's own time per iteration; the effective config is dumped beside the benchmark's JSON.
VLLM_BENCH = textwrap.dedent(
    """
    import json, sys

    def run(argv, out):
        from vllm.benchmarks.latency import add_cli_args, main
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.metrics.loggers import StatLoggerBase
        import vllm.entrypoints.llm as llm_mod

        iters, engines = [], []

        class Logger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index=0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                d = getattr(scheduler_stats, "iteration_details", None)
                if d is not None and not d.is_dummy and (d.num_ctx_tokens or d.num_generation_tokens):
                    iters.append([float(d.elapsed_ms), int(d.num_ctx_tokens or 0), int(d.num_generation_tokens or 0)])

            def log_engine_initialized(self):
                pass

        original = llm_mod.LLMEngine.from_engine_args

        def with_logger(*a, **k):
            k["stat_loggers"] = [*(k.get("stat_loggers") or []), Logger]
            engine = original(*a, **k)
            engines.append(engine)
            return engine

        llm_mod.LLMEngine.from_engine_args = with_logger
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        main(parser.parse_args(argv))
        cfg = engines[0].vllm_config
        cache, sched, model = cfg.cache_config, cfg.scheduler_config, cfg.model_config
        comp = cfg.compilation_config
        effective = {
            "block_size": cache.block_size, "num_gpu_blocks": cache.num_gpu_blocks,
            "kv_cache_memory_bytes": cache.kv_cache_memory_bytes, "enable_prefix_caching": cache.enable_prefix_caching,
            "max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens,
            "enable_chunked_prefill": sched.enable_chunked_prefill, "async_scheduling": sched.async_scheduling,
            "compilation_mode": getattr(comp.mode, "name", str(comp.mode)), "enforce_eager": model.enforce_eager,
            "dtype": str(model.dtype).removeprefix("torch."), "max_model_len": model.max_model_len,
        }
        with open(out, "w") as f:
            json.dump({"iterations": iters, "effective": effective}, f)

    if __name__ == "__main__":
        run(json.loads(sys.argv[1]), sys.argv[2])
    """
)


def model_folder(where: Path) -> Path:
    """A config-only copy of cpu-tiny with a 10,240-token vocabulary."""
    cfg = json.loads((ROOT / "harness" / "presets" / "cpu-tiny" / "config.json").read_text())
    cfg["vocab_size"] = VOCAB
    folder = where / "cpu-tiny-vocab10240"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def run_harness(model: Path, max_num_seqs: int | None, requests: int, out: Path, name: str) -> Path:
    """One `profile sweep` point: `requests` requests (a third of them repeats of one prompt)."""
    repeats = requests // 3
    spec = textwrap.dedent(
        f"""
        ladder = ["{model}"]
        reps = {requests - repeats}
        same_prompt_repeats = {repeats}
        max_new_tokens = {NEW_TOKENS}
        warmup_requests = 3
        cpu_pinning = false
        {f"max_num_seqs = {max_num_seqs}" if max_num_seqs else ""}
        [axes]
        tier = [0]
        text_tokens = [{PROMPT_TOKENS}]
        top_k = [0]
        blocks = [{BLOCK_SIZE}]
        """
    )
    spec_file = out / f"{name}.toml"
    spec_file.write_text(spec)
    cmd = [sys.executable, "-m", "harness.cli", "sweep", "--spec", str(spec_file), "--out", str(out), "--name", name,
           "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"harness sweep failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return out / name


def harness_figures(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(figures, the engine's effective config) of a harness run; times in ms, medians over requests."""
    manifest = json.loads((run / "manifest.json").read_text())
    s = pd.read_parquet(run / "samples")
    req = s.groupby(["point_id", "rep"]).agg(
        start=("t_start_s", "min"), end=("t_end_s", "max"), steps_ms=("latency_ms", "sum"),
        engine_ms=("engine_elapsed_ms", "sum"),
    )
    request_ms = (req.end - req.start) * 1e3
    pre, dec = s[s.phase == "prefill"], s[s.phase == "decode"]
    figures = {
        "request_ms": float(request_ms.median()),
        "request_ms_p10_p90": [float(request_ms.quantile(0.1)), float(request_ms.quantile(0.9))],
        "sum_of_steps_ms": float(req.steps_ms.median()),
        "engine_core_ms": float(req.engine_ms.median()),
        "caller_ms": float((request_ms - req.engine_ms).median()),
        "prefill_step_ms": float(pre.latency_ms.median()),
        "decode_step_ms": float(dec.latency_ms.median()),
        "engine_prefill_ms": float(pre.engine_elapsed_ms.median()),
        "engine_decode_ms": float(dec.engine_elapsed_ms.median()),
        "requests": int(len(req)),
        "client_lagged_rows": int(s.client_lagged.sum()),
    }
    return figures, manifest["engine_starts"][-1]["effective"]


def run_vllm_bench(model: Path, effective: dict[str, Any], iters: int, warmup: int, out: Path, name: str) -> Path:
    """vLLM's latency benchmark with the harness engine's effective arguments; returns its JSON results file."""
    argv = [
        "--model", str(model), "--load-format", "dummy", "--skip-tokenizer-init", "--disable-detokenize",
        "--input-len", str(PROMPT_TOKENS), "--output-len", str(NEW_TOKENS), "--batch-size", "1",
        "--num-iters", str(iters), "--num-iters-warmup", str(warmup), "--no-enable-prefix-caching",
        "--enable-logging-iteration-details", "--output-json", str(out / f"{name}.vllm.json"),
    ]
    for key in SAME_ARGS:
        if effective.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(effective[key])]
    script = out / "vllm_bench_driver.py"
    script.write_text(VLLM_BENCH)
    env = {**os.environ, "VLLM_USE_AOT_COMPILE": "0"}  # as the harness runs it (harness/engine/vllm_engine.py)
    proc = subprocess.run([sys.executable, str(script), json.dumps(argv), str(out / f"{name}.vllm-iters.json")],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"vLLM's latency benchmark failed:\n{proc.stderr[-3000:]}")
    return out / f"{name}.vllm.json"


def vllm_figures(results: Path, iters: int) -> tuple[dict[str, Any], dict[str, Any]]:
    bench = json.loads(results.read_text())
    extra = json.loads(results.with_name(results.name.replace(".vllm.json", ".vllm-iters.json")).read_text())
    lat_ms = np.array(bench["latencies"]) * 1e3
    it = np.array(extra["iterations"], dtype=float).reshape(-1, 3)
    timed = it[-iters * NEW_TOKENS:]  # the last `iters` requests: 1 prefill + 31 decode iterations each
    per_request = timed[:, 0].reshape(iters, NEW_TOKENS).sum(axis=1) if len(timed) == iters * NEW_TOKENS else None
    figures = {
        "request_ms": float(np.median(lat_ms)),
        "request_ms_p10_p90": [float(np.percentile(lat_ms, 10)), float(np.percentile(lat_ms, 90))],
        "engine_core_ms": float(np.median(per_request)) if per_request is not None else None,
        "caller_ms": float(np.median(lat_ms - per_request)) if per_request is not None else None,
        "engine_prefill_ms": float(np.median(timed[timed[:, 1] > 0, 0])) if len(timed) else None,
        "engine_decode_ms": float(np.median(timed[timed[:, 1] == 0, 0])) if len(timed) else None,
        "requests": int(len(lat_ms)),
    }
    return figures, extra["effective"]


def explain(h: dict[str, Any], v: dict[str, Any]) -> list[str]:
    """Where a difference between the two request latencies goes."""
    lines = []
    diff = h["request_ms"] - v["request_ms"]
    lines.append(f"harness - vLLM request latency: {diff:+.2f} ms")
    if v.get("engine_core_ms") is None:
        return [*lines, "  (vLLM's iteration times could not be matched to its requests: no split)"]
    d_eng = h["engine_core_ms"] - v["engine_core_ms"]
    d_call = h["caller_ms"] - v["caller_ms"]
    lines.append(
        f"  engine core's own time per request: harness {h['engine_core_ms']:.2f} vs vLLM {v['engine_core_ms']:.2f} "
        f"ms ({d_eng:+.2f}); prefill iteration {h['engine_prefill_ms']:.3f} vs {v['engine_prefill_ms']:.3f} ms, "
        f"decode iteration {h['engine_decode_ms']:.3f} vs {v['engine_decode_ms']:.3f} ms"
    )
    lines.append(
        f"  caller's share (request - engine core): harness {h['caller_ms']:.2f} vs vLLM {v['caller_ms']:.2f} ms "
        f"({d_call:+.2f}); harness steps: prefill {h['prefill_step_ms']:.3f} ms, decode {h['decode_step_ms']:.3f} "
        f"ms, between-step loop {h['request_ms'] - h['sum_of_steps_ms']:.2f} ms per request"
    )
    where = "the engine itself (config, threads, placement)" if abs(d_eng) >= abs(d_call) else "the caller's side"
    lines.append(f"  most of the difference is in {where}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default=",".join(POINTS), help=f"comma-separated, of: {', '.join(POINTS)}")
    ap.add_argument("--requests", type=int, default=15, help="harness requests per point")
    ap.add_argument("--iters", type=int, default=15, help="vLLM benchmark iterations per point")
    ap.add_argument("--warmup-iters", type=int, default=5, help="vLLM benchmark warm-up iterations")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "bench-vs-vllm")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved engine starts of each per point")
    ap.add_argument("--smoke", action="store_true", help="3 requests and 2 iterations: checks that it runs")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.iters, args.warmup_iters = 3, 2, 1
        print("--smoke: a check that the benchmark runs; its figures mean nothing", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    model = model_folder(args.out)
    report: dict[str, Any] = {}
    for point in args.points.split(","):
        if point not in POINTS:
            sys.exit(f"unknown point {point!r}; expected {', '.join(POINTS)}")
        ratios = []
        for r in range(max(args.rounds, 1)):
            name = f"{point}-{os.getpid()}-r{r}"
            print(f"[{point}] round {r + 1}: harness, {args.requests} requests ...", file=sys.stderr, flush=True)
            h, h_eff = harness_figures(run_harness(model, POINTS[point], args.requests, args.out, name))
            print(f"[{point}] round {r + 1}: vLLM's latency benchmark, {args.iters} iterations ...", file=sys.stderr,
                  flush=True)
            v, v_eff = vllm_figures(
                run_vllm_bench(model, h_eff, args.iters, args.warmup_iters, args.out, name), args.iters
            )
            ratio = h["request_ms"] / v["request_ms"]
            ratios.append(ratio)
            mismatch = {k: (h_eff.get(k), v_eff.get(k)) for k in COMPARED if h_eff.get(k) != v_eff.get(k)}
            report.setdefault(point, {"rounds": []})["rounds"].append(
                {"ratio": ratio, "harness": h, "vllm": v, "config_mismatch": mismatch}
            )
            print(f"\n== {point} round {r + 1} (max_num_seqs {h_eff.get('max_num_seqs')}, token budget "
                  f"{h_eff.get('max_num_batched_tokens')}, block size {h_eff.get('block_size')}, dtype "
                  f"{h_eff.get('dtype')})")
            print(f"vLLM benchmark: {v['request_ms']:.2f} ms per request (median of {v['requests']})")
            print(f"harness:        {h['request_ms']:.2f} ms per request (median of {h['requests']}; "
                  f"{h['client_lagged_rows']} client-lagged rows)")
            print(f"ratio harness / vLLM: {ratio:.3f}")
            for k, (a, b) in mismatch.items():
                print(f"  effective config differs: {k}: harness {a!r}, vLLM benchmark {b!r}")
            for line in explain(h, v):
                print(line)
        logs = np.log(ratios)
        mean = float(np.exp(logs.mean()))
        if len(ratios) > 1:
            from scipy import stats

            half = float(stats.t.ppf(0.975, len(ratios) - 1) * logs.std(ddof=1) / np.sqrt(len(ratios)))
            ci = [float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))]
        else:
            ci = None
        report[point].update(ratio=mean, ratio_ci=ci, ratios=ratios)
        inside = ci is not None and ci[0] >= 0.95 and ci[1] <= 1.05
        print(f"\n[{point}] ratio harness / vLLM over {len(ratios)} round(s): {mean:.3f}"
              + (f" [{ci[0]:.3f}, {ci[1]:.3f}] (95% t-interval over rounds)" if ci else "")
              + f"; per round {', '.join(f'{x:.3f}' for x in ratios)}; "
              + ("inside" if inside else "not shown inside") + " the 0.95-1.05 target")
    (args.out / "bench_vs_vllm.json").write_text(json.dumps(report, indent=2))
    print(f"\nwritten: {args.out / 'bench_vs_vllm.json'}")


if __name__ == "__main__":
    main()
