"""The server's Prometheus `/metrics`, as the harness keeps it and the estimator reads it (standard library only).

A scrape is kept as a flat mapping `series -> value`, the series written as in the text exposition format
(`vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"}`). A load's figures are the deltas of
two scrapes: of each counter, and of each histogram's `_sum`, `_count` and cumulative `_bucket` counts (summed over
every label but `le`). `histogram_quantile` reads a quantile from the bucket deltas as Prometheus does: linear
interpolation inside the bucket that holds it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# the server's own per-request histograms a load is judged by (vllm/v1/metrics/loggers.py, vLLM 0.32)
HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_time_per_output_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_inference_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:iteration_tokens_total",  # tokens per engine iteration: its count is the load's number of iterations
)
COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
            "vllm:request_success_total")
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def parse_exposition(text: str) -> dict[str, float]:
    """Every sample line of a Prometheus text exposition as `series -> value` (comments and bad lines skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if not series:
            continue
        try:
            out[series.strip()] = float(value)
        except ValueError:
            continue
    return out


def _name_labels(series: str) -> tuple[str, dict[str, str]]:
    name, sep, rest = series.partition("{")
    labels: dict[str, str] = {}
    if sep:
        for part in rest.rstrip("}").split('",'):
            key, eq, value = part.partition("=")
            if eq:
                labels[key.strip()] = value.strip().strip('"')
    return name, labels


def totals(scrape: Mapping[str, float], name: str) -> float:
    """The sum over labels of one metric (a counter, a gauge, or a histogram's `_sum`/`_count`)."""
    return sum(v for s, v in scrape.items() if _name_labels(s)[0] == name)


def buckets(scrape: Mapping[str, float], histogram: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets `(le, count)`, summed over every label but `le`, by increasing `le`."""
    acc: dict[float, float] = {}
    for s, v in scrape.items():
        name, labels = _name_labels(s)
        if name == histogram + "_bucket" and "le" in labels:
            le = math.inf if labels["le"] in ("+Inf", "Inf") else float(labels["le"])
            acc[le] = acc.get(le, 0.0) + v
    return sorted(acc.items())


def histogram_quantile(cumulative: list[tuple[float, float]], q: float) -> float:
    """The q-quantile (0-1) of cumulative buckets, linear inside the bucket (Prometheus' `histogram_quantile`);
    NaN without observations; the highest finite bound when it falls in the +Inf bucket."""
    if not cumulative or cumulative[-1][1] <= 0:
        return math.nan
    rank = q * cumulative[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in cumulative:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return prev_le


def window(first: Mapping[str, float], last: Mapping[str, float]) -> dict[str, Any]:
    """A load's server-side figures from the scrapes at its start and end: per histogram the count, the mean (ms)
    and p50/p90/p99 (ms) of the observations made in between, with the bucket deltas; the counters' deltas."""
    hist: dict[str, Any] = {}
    for h in HISTOGRAMS:
        n = totals(last, h + "_count") - totals(first, h + "_count")
        s = totals(last, h + "_sum") - totals(first, h + "_sum")
        before = dict(buckets(first, h))
        cum = [(le, c - before.get(le, 0.0)) for le, c in buckets(last, h)]
        hist[h] = {
            "count": n,
            "sum_s": s,
            "mean_ms": s / n * 1e3 if n > 0 else None,
            **{f"p{p}_ms": _ms(histogram_quantile(cum, p / 100)) for p in (50, 90, 99)},
            "buckets": [[("+Inf" if math.isinf(le) else le), c] for le, c in cum],
        }
    counters = {c: totals(last, c) - totals(first, c) for c in COUNTERS}
    return {"histograms": hist, "counters": counters}


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else seconds * 1e3
