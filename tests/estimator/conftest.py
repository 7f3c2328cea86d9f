"""Fixtures for the estimator's unit tests: small synthetic run folders in the results-schema shape.

The synthetic data only exercises code paths (loading, features, splits, save/load); the end-to-end tests
use the real `small_run` fixture from tests/conftest.py instead.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

WORDS = [
    *("the", "engine", "schedules", "each", "request", "and", "the", "cache", "grows", "by", "one", "block"),
    *("as", "tokens", "arrive", "while", "the", "scheduler", "batches", "prefill", "and", "decode", "steps"),
    *("def", "return", "import", "class", "for", "while", "print", "value", "index"),
]


def _point_id(axes: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(axes, sort_keys=True).encode()).hexdigest()[:12]


def write_run(
    root: Path,
    *,
    run_id: str = "20250101-000000-abcdef",
    schema_version: Any = 1,
    tiers: Sequence[int] = (1, 2),
    top_ks: Sequence[int] = (0, 40),
    blocks: Sequence[int] = (32,),
    lengths: Sequence[int] = (16, 32, 64, 128, 256, 512),
    reps: int = 4,
    same_repeats: int = 3,
    new_tokens: int = 8,
    seed: int = 0,
    noise: float = 0.02,
    axes_in_manifest: bool = True,
) -> Path:
    """Write a synthetic run folder (manifest, samples/, prompts/, an unfinished *.tmp) and return it.

    Prefill ms = tier·(0.5 + 0.01·n + 2e-5·n²), decode ms = tier·(1.5 + 0.002·p), times (1 + noise·N(0,1)).
    """
    rng = np.random.default_rng(seed)
    run = root / run_id
    (run / "samples").mkdir(parents=True)
    (run / "prompts").mkdir()
    spec: dict[str, Any] = {"reps": reps, "same_prompt_repeats": same_repeats, "max_new_tokens": new_tokens}
    if axes_in_manifest:
        spec["axes"] = {"tier": list(tiers), "top_k": list(top_ks), "blocks": list(blocks)}
    manifest = {
        "schema_version": schema_version,
        "tool_version": "0.1.0",
        "run_id": run_id,
        "spec": spec,
        "environment": {"device": {"name": "synthetic CPU"}},
        "status": "complete",
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    for tier in tiers:
        for top_k in top_ks:
            for blk in blocks:
                for n in lengths:
                    axes = {"tier": tier, "top_k": top_k, "blocks": blk, "text_tokens": n}
                    pid = _point_id(axes)
                    rows: list[dict[str, Any]] = []
                    prompts: list[dict[str, Any]] = []
                    same_text = " ".join(rng.choice(WORDS, size=n))
                    same_id = f"p-{pid}-same"
                    for rep in range(reps + same_repeats):
                        kind = "distinct" if rep < reps else "same"
                        if kind == "distinct":
                            text = " ".join(rng.choice(WORDS, size=n))
                            prompt_id = f"p-{pid}-{rep}"
                        else:
                            text, prompt_id = same_text, same_id
                        if kind == "distinct" or rep == reps:
                            prompts.append(
                                {
                                    "prompt_id": prompt_id,
                                    "text": text,
                                    "text_tokens": n,
                                    "token_ids": list(range(n)),
                                    "source": "synthetic",
                                    "content_class": "prose",
                                    "prompt_kind": kind,
                                    "point_id": pid,
                                }
                            )
                        for step in range(new_tokens):
                            phase = "prefill" if step == 0 else "decode"
                            pos = n + step
                            if phase == "prefill":
                                base = tier * (0.5 + 0.01 * n + 2e-5 * n * n)
                            else:
                                base = tier * (1.5 + 0.002 * pos)
                            lat = base * (1.0 + noise * rng.standard_normal())
                            rows.append(
                                {
                                    "run_id": run_id,
                                    "point_id": pid,
                                    "engine_config_id": f"e{tier}-{blk}",
                                    "rep": rep,
                                    "prompt_kind": kind,
                                    "prompt_id": prompt_id,
                                    "tier": tier,
                                    "model": f"tiny-{tier}",
                                    "top_k": top_k,
                                    "blocks": blk,
                                    "phase": phase,
                                    "text_tokens": n,
                                    "position": pos,
                                    "step_index": step,
                                    "latency_ms": lat,
                                    "engine_elapsed_ms": lat * 0.95,
                                    "max_new_tokens": new_tokens,
                                    "batch_size": 1,
                                    "engine_mode": "multiprocess",
                                    "device": "synthetic CPU",
                                    "tel_cpu_freq_mhz": 2000.0 + 10 * rng.standard_normal(),
                                    "tel_cpu_util_pct": 50.0 + rng.standard_normal(),
                                    "throttled": False,
                                }
                            )
                    pd.DataFrame(rows).to_parquet(run / "samples" / f"{pid}.parquet", index=False)
                    pd.DataFrame(prompts).to_parquet(run / "prompts" / f"{pid}.parquet", index=False)
    (run / "samples" / "unfinished.parquet.tmp").write_bytes(b"not parquet")
    return run


@pytest.fixture(scope="session")
def run_writer() -> Callable[..., Path]:
    """The synthetic run writer, for tests that need a variation of the default run."""
    return write_run


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic run folder (2 tiers × 2 top_k × 6 lengths, 4 distinct + 3 same-prompt requests each)."""
    return write_run(tmp_path_factory.mktemp("results"))


def simulate_iterations(
    rng: np.random.Generator,
    tier: int,
    arrivals: Sequence[float],
    lengths: Sequence[int],
    new_tokens: Sequence[int],
    skew: float = 0.0,
    noise: float = 0.02,
    ctx_coef: float = 4e-4,
    sq_coef: float = 2e-6,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Continuous batching in miniature: each iteration prefills every arrived request at once and decodes every
    running one. Latency (ms) = tier·(0.5 + 0.002·prefill_tokens + sq_coef·Σlen² + 0.05·decodes + ctx_coef·Σctx
    + skew·(max ctx − mean ctx)·1e-3·decodes)·(1 + noise·N(0,1)). Returns (iteration rows, request rows)."""
    order = np.argsort(arrivals)
    pending = [int(i) for i in order]
    running: dict[int, int] = {}  # request -> tokens generated so far
    ctx: dict[int, int] = {}
    first_it: dict[int, int] = {}
    token_times: dict[int, list[float]] = {}
    t = 0.0
    its: list[dict[str, Any]] = []
    k = 0
    while pending or running:
        if not running and pending and arrivals[pending[0]] > t:
            t = float(arrivals[pending[0]])
        joining = [r for r in pending if arrivals[r] <= t]
        pending = [r for r in pending if arrivals[r] > t]
        decoding = list(running)
        pre_tok = sum(int(lengths[r]) for r in joining)
        sq = sum(int(lengths[r]) ** 2 for r in joining)
        cx = [ctx[r] for r in decoding]
        base = 0.5 + 0.002 * pre_tok + sq_coef * sq + 0.05 * len(cx) + ctx_coef * sum(cx)
        if cx:
            base += skew * (max(cx) - float(np.mean(cx))) * 1e-3 * len(cx)
        lat = tier * base * (1.0 + noise * float(rng.standard_normal()))
        its.append(
            {
                "iteration": k,
                "t_start_s": t,
                "t_end_s": t + lat / 1e3,
                "latency_ms": lat,
                "num_prefill_seqs": len(joining),
                "prefill_tokens": pre_tok,
                "prefill_ctx_sum": 0,
                "num_decode_seqs": len(cx),
                "decode_ctx_sum": sum(cx),
                "decode_ctx_max": max(cx) if cx else 0,
                "decode_ctx_min": min(cx) if cx else 0,
                "batch_size": len(joining) + len(cx),
                "request_ids": ",".join(f"r{r}" for r in [*joining, *decoding]),
            }
        )
        t += lat / 1e3
        for r in joining:
            first_it[r] = k
            running[r], ctx[r] = 1, int(lengths[r])
            token_times[r] = [(t - arrivals[r]) * 1e3]
        for r in decoding:
            running[r] += 1
            ctx[r] += 1
            token_times[r].append((t - arrivals[r]) * 1e3)
        for r in [r for r in running if running[r] >= new_tokens[r]]:
            del running[r]
            token_times[r].append(float(k))  # last iteration index, popped below
        k += 1
    reqs = []
    for r in range(len(arrivals)):
        times = token_times[r]
        last = int(times.pop())
        reqs.append(
            {
                "request_id": f"r{r}",
                "arrival_s": float(arrivals[r]),
                "text_tokens": int(lengths[r]),
                "new_tokens": int(new_tokens[r]),
                "first_iteration": first_it[r],
                "last_iteration": last,
                "ttft_ms": times[0],
                "e2e_ms": times[-1],
                "token_times_ms": times,
            }
        )
    return its, reqs


def write_batch_run(
    root: Path,
    *,
    run_id: str = "20250102-000000-batch1",
    tiers: Sequence[int] = (1, 2),
    segments: int = 6,
    requests: int = 10,
    rate: float = 40.0,
    skew: float = 0.0,
    noise: float = 0.02,
    seed: int = 0,
    ctx_coef: float = 4e-4,
    sq_coef: float = 2e-6,
) -> Path:
    """A synthetic results-schema-2 run with iterations/ and requests/ (Poisson replays per tier)."""
    rng = np.random.default_rng(seed)
    run = root / run_id
    for sub in ("iterations", "requests", "samples", "prompts"):
        (run / sub).mkdir(parents=True)
    manifest = {"schema_version": 2, "run_id": run_id, "status": "complete", "spec": {"axes": {"tier": list(tiers)}}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    for tier in tiers:
        for s in range(segments):
            arrivals = np.cumsum(rng.exponential(1.0 / rate, requests))
            lengths = rng.integers(16, 600, requests)
            new = rng.integers(2, 40, requests)
            its, reqs = simulate_iterations(
                rng, tier, arrivals, lengths, new, skew=skew, noise=noise, ctx_coef=ctx_coef, sq_coef=sq_coef
            )
            seg = f"t{tier}-s{s}"
            extra = {"segment_id": seg, "tier": tier, "model": f"tiny-{tier}", "blocks": 32, "top_k": 0}
            pd.DataFrame([{**i, **extra} for i in its]).to_parquet(run / "iterations" / f"{seg}.parquet")
            pd.DataFrame([{**r, "segment_id": seg} for r in reqs]).to_parquet(run / "requests" / f"{seg}.parquet")
    return run


@pytest.fixture(scope="session")
def batch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_batch_run(tmp_path_factory.mktemp("batch"))
