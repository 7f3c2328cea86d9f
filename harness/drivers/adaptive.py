"""Refinement within one engine start: where to measure next, from what this start has measured so far.

**The interval.** Per sampling config (every non-engine axis but `text_tokens`) and per target (a request's
prefill latency, and its mean decode-step latency), the curve y = a + b·n + c·n² over the prompt length n is fitted
by least squares, then refitted on `BOOTSTRAP` resamples of the requests. The interval at a length is the
half-width of the middle 95% of the refits' predictions there.

**The noise floor.** The standard deviation of the same-prompt repeats (Experiment 1's groups, one prompt run
several times) relative to their mean, pooled as the median over the coarse points, times the curve's prediction:
what one more request cannot beat. Without same-prompt repeats, the fit's residual scatter stands in.

**The choice.** Candidates are the axis lengths not yet measured and the geometric midpoints between measured
neighbours. Each round takes, per sampling config, the candidate with the largest interval ÷ floor above 1 whose
requests fit the time left, and measures it with the spec's distinct prompts. It stops when the time is spent or
every candidate's interval lies within its floor (ratio ≤ 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

BOOTSTRAP = 200
TARGETS = ("prefill", "decode")
MIN_FLOOR_REL = 0.005  # a floor never below 0.5% of the prediction (a perfectly repeatable machine is not one)


@dataclass(frozen=True)
class Candidate:
    """A length to measure next for one sampling config, and why: its widest target's interval ÷ floor."""

    config: tuple[tuple[str, Any], ...]
    length: int  # the text_tokens axis value to measure (a sweep point's, not a request's: contract/request.py)
    target: str
    halfwidth_ms: float
    floor_ms: float

    @property
    def ratio(self) -> float:
        return self.halfwidth_ms / self.floor_ms if self.floor_ms > 0 else math.inf

    def why(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "interval_halfwidth_ms": round(self.halfwidth_ms, 3),
            "floor_ms": round(self.floor_ms, 3),
            "ratio": round(self.ratio, 2),
        }


def per_request(samples: pd.DataFrame, config_axes: list[str]) -> pd.DataFrame:
    """One row per request: its config, point, prompt kind, length, prefill ms and mean decode-step ms."""
    keys = [*config_axes, "point_id", "rep", "prompt_kind"]
    pre = (
        samples[samples.phase == "prefill"]
        .groupby(keys, dropna=False)
        .agg(text_tokens=("text_tokens", "first"), prefill=("latency_ms", "sum"))
    )
    dec = samples[samples.phase == "decode"].groupby(keys, dropna=False).latency_ms.mean().rename("decode")
    return pre.join(dec).reset_index()


def _design(n: np.ndarray) -> np.ndarray:
    x = n / 1000.0
    return np.column_stack([np.ones_like(x), x, x * x])


def _fit(n: np.ndarray, y: np.ndarray) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(_design(n), y, rcond=None)
    return coef


def _floor_rel(rows: pd.DataFrame, target: str, coef: np.ndarray) -> float:
    same = rows[rows.prompt_kind == "same"]
    rel = [g[target].std(ddof=1) / g[target].mean() for _, g in same.groupby("point_id") if len(g) > 1]
    rel = [r for r in rel if math.isfinite(r)]
    if rel:
        return max(float(np.median(rel)), MIN_FLOOR_REL)
    fitted = _design(rows.text_tokens.to_numpy(float)) @ coef
    resid = rows[target].to_numpy(float) / np.maximum(fitted, 1e-9) - 1
    return max(float(np.std(resid, ddof=min(3, len(resid) - 1))), MIN_FLOOR_REL) if len(resid) > 3 else 1.0


def candidates(measured: list[int], axis: list[int], low: int, high: int) -> list[int]:
    """Lengths not yet measured: the axis's, and the geometric midpoints of measured neighbours (multiples of 8)."""
    done = sorted(set(measured))
    out = {n for n in axis if n not in done}
    for a, b in zip(done, done[1:], strict=False):
        mid = round_length(math.sqrt(a * b))
        if a < mid < b:
            out.add(mid)
    return sorted(n for n in out if low <= n <= high and n not in done)


def rank(
    requests: pd.DataFrame,
    config_axes: list[str],
    axis: list[int],
    seed: int = 0,
    tried: set[tuple[tuple[tuple[str, Any], ...], int]] | None = None,
) -> list[Candidate]:
    """Every (config, candidate length) with its widest target's interval and floor, widest ratio first; a
    (config, length) in `tried` (picked before, whatever came of it) is not offered again."""
    rng = np.random.default_rng(seed)
    low, high = min(axis), max(axis)
    out: list[Candidate] = []
    groups = requests.groupby(config_axes, dropna=False) if config_axes else [((), requests)]
    for key, rows in groups:
        config = tuple(zip(config_axes, key if isinstance(key, tuple) else (key,), strict=True))
        lengths = sorted(int(n) for n in rows.text_tokens.unique())
        todo = [n for n in candidates(lengths, axis, low, high) if (config, n) not in (tried or set())]
        if not todo or len(lengths) < 3:
            continue
        at = np.array(todo, dtype=float)
        best: dict[int, Candidate] = {}
        for target in TARGETS:
            data = rows[[target, "text_tokens", "prompt_kind", "point_id"]].dropna()
            n, y = data.text_tokens.to_numpy(float), data[target].to_numpy(float)
            if len(y) < 4:
                continue
            coef = _fit(n, y)
            preds = np.empty((BOOTSTRAP, len(at)))
            for b in range(BOOTSTRAP):
                i = rng.integers(0, len(y), len(y))
                preds[b] = _design(at) @ _fit(n[i], y[i])
            lo, hi = np.percentile(preds, [2.5, 97.5], axis=0)
            centre = np.maximum(_design(at) @ coef, 1e-6)
            floor = _floor_rel(data, target, coef) * centre
            for j, length in enumerate(todo):
                c = Candidate(config, length, target, float((hi[j] - lo[j]) / 2), float(floor[j]))
                if length not in best or c.ratio > best[length].ratio:
                    best[length] = c
        out += best.values()
    return sorted(out, key=lambda c: -c.ratio)


def choose(ranked: list[Candidate], fits: Any) -> list[Candidate]:
    """This round's lengths: per config, the widest candidate above its floor that `fits(candidate)` allows."""
    picked: dict[tuple[tuple[str, Any], ...], Candidate] = {}
    for c in ranked:
        if c.ratio <= 1 or c.config in picked:
            continue
        if fits(c):
            picked[c.config] = c
    return list(picked.values())


def round_length(n: float) -> int:
    """A refinement length: a multiple of 8 tokens (at least 8)."""
    return max(8, int(8 * math.floor(n / 8 + 0.5)))
