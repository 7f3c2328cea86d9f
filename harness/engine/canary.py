"""The canary: a fixed CPU workload without vLLM, shaped like the engine's kernels, that measures the machine itself
(issue 35 item 1, docs/nightly.md).

It runs a Llama-shaped forward pass in plain torch with random weights: per layer the QKV projection, scaled-dot-
product attention, the output projection, the gated MLP (SiLU), then the LM head on the last token. The shapes come
from a model's `config.json` (default: the embedded `cpu-tiny` preset), the dtype is the one the harness runs a
bfloat16 model in on this CPU (`harness/engine/cpu_dtype.py`), and it uses one compute thread, as the engine does
on a 2-core machine (vLLM's OMP binding reserves a core for the engine process). Two shapes:

- `prefill`: `context` prompt tokens at once, causal attention;
- `decode`: one new token against a `context`-token cache.

Each shape is timed for `seconds` after a warm-up; the result is the median milliseconds per pass and the
interquartile range. It runs in its own process (`python -m harness.engine.canary`), so its thread setting and
allocations never touch the harness's or the engine's. A sweep given `--canary` runs it before its first engine
start and after its last point and records both in the manifest (`canary.before`, `canary.after`).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CANARY_SCHEMA = "canary/1"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "presets" / "cpu-tiny"


def _timed(fn: Any, seconds: float, warmup: int = 10) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    q = statistics.quantiles(times, n=4)
    return {"median_ms": statistics.median(times), "iqr_ms": q[2] - q[0], "passes": float(len(times))}


def measure(
    model: Path = DEFAULT_MODEL, context: int = 256, seconds: float = 0.75, threads: int = 1, dtype: str | None = None
) -> dict[str, Any]:
    """Time the canary's two shapes in this process; returns the record a manifest keeps."""
    import torch

    cfg = json.loads((model / "config.json").read_text())
    if dtype is None:
        from harness.engine.cpu_dtype import machine_dtype_choice

        dtype = machine_dtype_choice().dtype
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    hd = h // heads
    vocab = cfg["vocab_size"]

    def w(*shape: int) -> Any:
        return (torch.randn(*shape) * 0.02).to(dt)

    weights = [
        (w(h, (heads + 2 * kv_heads) * hd), w(heads * hd, h), w(h, 2 * inter), w(inter, h)) for _ in range(layers)
    ]
    lm_head = w(h, vocab)
    cache = [(w(1, kv_heads, context, hd), w(1, kv_heads, context, hd)) for _ in range(layers)]

    def forward(n: int) -> None:
        x = w(n, h)
        with torch.inference_mode():
            for i, (wqkv, wo, wgu, wd) in enumerate(weights):
                qkv = x @ wqkv
                q = qkv[:, : heads * hd].view(1, n, heads, hd).transpose(1, 2)
                if n == 1:  # decode: attend to the cache
                    k, v = cache[i]
                else:
                    k = qkv[:, heads * hd : (heads + kv_heads) * hd].view(1, n, kv_heads, hd).transpose(1, 2)
                    v = qkv[:, (heads + kv_heads) * hd :].view(1, n, kv_heads, hd).transpose(1, 2)
                k = k.repeat_interleave(heads // kv_heads, dim=1)
                v = v.repeat_interleave(heads // kv_heads, dim=1)
                a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=n > 1)
                x = x + a.transpose(1, 2).reshape(n, heads * hd) @ wo
                gate, up = (x @ wgu).split(inter, dim=-1)
                x = x + (torch.nn.functional.silu(gate) * up) @ wd
            _ = x[-1:] @ lm_head

    return {
        "schema": CANARY_SCHEMA,
        "model": model.name,
        "dtype": dtype,
        "threads": threads,
        "context_tokens": context,
        "prefill": _timed(lambda: forward(context), seconds),
        "decode": _timed(lambda: forward(1), seconds),
    }


def run_canary(timeout_s: float = 120.0, **kwargs: Any) -> dict[str, Any]:
    """`measure` in a fresh process (its own thread count and allocator); `{"error": ...}` when it fails, so a
    sweep never stops for its canary."""
    args = [sys.executable, "-m", "harness.engine.canary"]
    for k, v in kwargs.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    t0 = time.time()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"the canary ran past {timeout_s:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the canary failed (exit {proc.returncode}): {tail}"}
    record: dict[str, Any] = json.loads(proc.stdout)
    record["at"] = round(t0, 3)
    return record


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="The CPU canary: median ms per Llama-shaped pass, prefill and decode.")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a folder with a config.json")
    p.add_argument("--context", type=int, default=256, help="prompt / cache tokens")
    p.add_argument("--seconds", type=float, default=0.75, help="timed seconds per shape")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: the harness's choice for this CPU)")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.model, a.context, a.seconds, a.threads, a.dtype)))


if __name__ == "__main__":
    main()
