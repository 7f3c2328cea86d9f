"""scripts/bench_harness.py's drift figure on synthetic samples (the script is not a package: loaded by path)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import ModuleType

import pandas as pd

from tests.conftest import load_script


def _bench() -> ModuleType:
    return load_script("bench_harness")


def _samples(order: list[tuple[int, int]]) -> pd.DataFrame:
    """One prefill row per request: (text_tokens, rep) in the order they ran."""
    return pd.DataFrame(
        [
            {"engine_config_id": "e", "point_id": f"p{n}", "rep": rep, "seq": seq, "text_tokens": n,
             "phase": "prefill", "latency_ms": n / 50 + 0.01 * seq}
            for seq, (n, rep) in enumerate(order)
        ]
    )


def test_drift_is_small_for_an_interleaved_order_and_large_for_a_sorted_one() -> None:
    bench = _bench()
    requests = [(n, rep) for n in (64, 256, 512, 1024) for rep in range(6)]
    sorted_fig = bench.drift(_samples(requests))
    assert sorted_fig["drift_seq_vs_text_tokens_abs_rho_max"] > 0.9
    assert sorted_fig["drift_seq_vs_text_tokens_ok"] is False
    shuffled = list(requests)
    random.Random(3).shuffle(shuffled)
    fig = bench.drift(_samples(shuffled))
    assert fig["drift_engine_starts"] == 1
    assert fig["drift_seq_vs_text_tokens_abs_rho_max"] < 0.2 and fig["drift_seq_vs_text_tokens_ok"] is True
    assert fig["drift_seq_vs_rel_prefill_rho_median"] > 0.5  # latency grows with seq: the machine drifted
    assert "no seq column" in bench.drift(_samples(shuffled).drop(columns="seq"))["drift"]


def _iterations(start: int, kind: str, scale: float, rng: random.Random) -> list[dict[str, object]]:
    """Decode-only iterations of 1 and 2 sequences: time = scale x n x (1 + context/1000) x noise. The grid's
    contexts sit low in their 128-token bin (as an episode's do), the replay's spread over the range; plus one
    prefill iteration (never compared)."""
    rows: list[dict[str, object]] = []
    for n, (lo, hi) in ((1, (256, 300)), (2, (640, 700))):
        for _ in range(30):
            ctx = rng.randint(lo, hi) if kind == "grid" else rng.randint(lo - 40, hi + 60)
            t = scale * n * (1 + ctx / 1000) * rng.uniform(0.97, 1.03)
            rows.append({"start": start, "kind": kind, "num_prefill_seqs": 0, "num_decode_seqs": n,
                         "decode_ctx_sum": ctx, "composition_mismatch": False, "engine_elapsed_ms": t,
                         "latency_ms": t + 0.5})
    rows.append({"start": start, "kind": kind, "num_prefill_seqs": 1, "num_decode_seqs": 0, "decode_ctx_sum": 0,
                 "composition_mismatch": False, "engine_elapsed_ms": 99.0, "latency_ms": 99.0})
    return rows


def test_grid_replay_ratio_separates_the_grid_from_the_engine_start(tmp_path: Path) -> None:
    """Start 0 runs at speed 1, start 1 at 1.3; in each the grid is 1.1x the replay at equal context: the
    same-start ratio finds 1.1, the cross-start ratios move with the starts' speeds."""
    from harness.experiments.grid_replay import analyze_grid_replay

    rng = random.Random(0)
    rows = [*_iterations(0, "grid", 1.1, rng), *_iterations(0, "replay", 1.0, rng),
            *_iterations(1, "grid", 1.43, rng), *_iterations(1, "replay", 1.3, rng)]
    pd.DataFrame(rows).to_parquet(tmp_path / "iterations.parquet")
    analyze_grid_replay(tmp_path, lambda line: None)
    res = json.loads((tmp_path / "results.json").read_text())
    for s in ("0", "1"):
        on = res["on"]["engine_elapsed_ms"][s]
        assert on["sequence_counts"] == 2 and on["ci95"][0] < 1.1 < on["ci95"][1] and abs(on["ratio"] - 1.1) < 0.02
        assert set(on["per_n"]) == {"1", "2"}
    off = res["off"]["engine_elapsed_ms"]
    assert abs(off["0/1"]["ratio"] - 1.1 / 1.3) < 0.03 and abs(off["1/0"]["ratio"] - 1.43) < 0.04
    assert res["level"]["1"]["replay"] > res["level"]["0"]["replay"] * 1.2


def test_grid_replay_segments_have_distinct_prompts_and_fixed_shapes() -> None:
    from harness.experiments.grid_replay import workloads

    segs = workloads(2, 3, 3.0, 10)
    indices = [r.index for episodes in segs.values() for reqs in episodes for r in reqs]
    assert len(indices) == len(set(indices))
    grid = segs[(1, 2, "grid")][5]  # B = 4, L = 384
    assert [(r.arrival_s, r.text_tokens, r.output_tokens) for r in grid] == [(0.0, 384, 32)] * 4
    (trace,) = segs[(0, 0, "replay")]
    assert len(trace) == 10 and all(b.arrival_s > a.arrival_s for a, b in zip(trace, trace[1:], strict=False))
    assert segs[(0, 0, "replay")] != segs[(1, 0, "replay")]
