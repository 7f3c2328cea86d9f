"""scripts/bench_harness.py's drift figure on synthetic samples (the script is not a package: loaded by path)."""

from __future__ import annotations

import random
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
