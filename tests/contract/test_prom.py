"""contract/prom.py: a load's server-side figures are the deltas of vLLM's /metrics between two scrapes."""

from __future__ import annotations

import math

import pytest

from contract.prom import buckets, histogram_quantile, parse_exposition, totals, window

H = "vllm:time_to_first_token_seconds"


def scrape(count: float, total_s: float, le_counts: dict[str, float], tokens: float) -> dict[str, float]:
    lines = ["# HELP x y", "# TYPE vllm:time_to_first_token_seconds histogram"]
    for le, n in le_counts.items():
        lines.append(f'{H}_bucket{{engine="0",le="{le}",model_name="m"}} {n}')
    lines += [
        f'{H}_count{{engine="0",model_name="m"}} {count}',
        f'{H}_sum{{engine="0",model_name="m"}} {total_s}',
        f'vllm:prompt_tokens_total{{engine="0",model_name="m"}} {tokens}',
        "not a sample line",
    ]
    return parse_exposition("\n".join(lines) + "\n")


def test_exposition_lines_become_series_values() -> None:
    s = scrape(2, 0.3, {"0.1": 1, "0.5": 2, "+Inf": 2}, 100)
    assert s[f'{H}_count{{engine="0",model_name="m"}}'] == 2.0
    assert totals(s, "vllm:prompt_tokens_total") == 100.0
    assert buckets(s, H) == [(0.1, 1.0), (0.5, 2.0), (math.inf, 2.0)]


def test_quantiles_are_linear_in_the_bucket_as_prometheus_computes_them() -> None:
    cum = [(0.1, 10.0), (0.5, 30.0), (math.inf, 40.0)]
    assert histogram_quantile(cum, 0.25) == pytest.approx(0.1)  # rank 10: the first bucket's top
    assert histogram_quantile(cum, 0.125) == pytest.approx(0.05)
    assert histogram_quantile(cum, 0.5) == pytest.approx(0.1 + 0.4 * (20 - 10) / 20)
    assert histogram_quantile(cum, 0.99) == 0.5  # in +Inf: the highest finite bound
    assert math.isnan(histogram_quantile([(0.1, 0.0), (math.inf, 0.0)], 0.5))


def test_a_window_holds_only_what_happened_between_its_scrapes() -> None:
    first = scrape(10, 1.0, {"0.1": 8, "0.5": 10, "+Inf": 10}, 1000)
    last = scrape(14, 2.2, {"0.1": 8, "0.5": 13, "+Inf": 14}, 1800)
    w = window(first, last)
    h = w["histograms"][H]
    assert h["count"] == 4 and h["sum_s"] == pytest.approx(1.2) and h["mean_ms"] == pytest.approx(300.0)
    assert h["buckets"] == [[0.1, 0.0], [0.5, 3.0], ["+Inf", 4.0]]
    assert h["p50_ms"] == pytest.approx((0.1 + 0.4 * 2 / 3) * 1e3)
    assert w["counters"]["vllm:prompt_tokens_total"] == 800
    empty = w["histograms"]["vllm:e2e_request_latency_seconds"]  # not in the scrapes: no observations
    assert empty["count"] == 0 and empty["mean_ms"] is None and empty["p90_ms"] is None
