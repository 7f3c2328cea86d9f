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
