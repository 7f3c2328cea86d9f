"""Control limits from the history: flag a config only when tonight lies beyond the spread seen across accepted
nights, not just beyond one run's own repeat spread.

The bootstrap CI (stats.py) covers the requests *within* a run; a busy machine shifts a whole night, which that CI
does not cover. Per config and phase, the accepted nights' median latencies give a centre (their median) and a
between-night spread s (standard deviation of log medians). Tonight is beyond the limit when
log(tonight / centre) > k · s · sqrt(1 + 1/m) (m nights: a prediction limit for one new night), with s at least
the spread pooled over all configs (drift is mostly machine-wide) and at least `min_spread`. While fewer than
`min_nights` accepted nights exist, s falls back to the pooled spread (when there are two or more nights) or to
`default_spread` (5%), whichever is larger: the limit is then x1.236 after one night, x1.202 after two and x1.189
after three, so a 20% slowdown (x1.200) is flagged only from the third night, a 10% busy night is not. Once the
nights' own spread is learned it sets the limit; on the recorded nights of a shared 2-core VM that was x1.4-1.9,
where a 20% slowdown cannot be told from drift (docs/nightly-history/README.md).

The estimator's held-out MAPE gets the same treatment per phase (`apply_mape_history`): on a few prompts per point
it moves by about 15-20% between unchanged nights (five real nights on a 2-core CPU: prefill 6.4-10.0%), so a
fixed growth threshold alone flags ordinary nights; a growth flag stands only beyond the nights' limit, with
`DEFAULT_MAPE_SPREAD` while the history is short.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from estimator.data.runs import read_jsonl_dicts

CONTROL_K = 3.0
MIN_NIGHTS = 4
DEFAULT_SPREAD = 0.05
DEFAULT_MAPE_SPREAD = 0.15  # held-out MAPE between unchanged nights (log units), while fewer than MIN_NIGHTS
MIN_SPREAD = 0.01


@dataclass(frozen=True)
class ControlLimit:
    """For one config and phase: the accepted nights' centre (ms), the spread used (log units, ≈ relative), the
    limit as a ratio to the centre, how many nights it rests on and where the spread came from."""

    label: str
    phase: str
    nights: int
    center_ms: float | None
    spread: float
    limit_ratio: float
    source: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_history_lines(path: Path) -> list[dict[str, Any]]:
    """history.jsonl as dicts; damaged lines are skipped."""
    return read_jsonl_dicts(path)


def accepted_nights(history: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The history lines the control limits learn from: its line's `control` field (promoted, or not flagged and
    not disturbed: no flag dropped by a re-run), else promoted or not flagged (older lines). A run checked twice
    counts once (its last line)."""
    last: dict[str, Mapping[str, Any]] = {}
    for rec in history:
        last[str(rec.get("run_id"))] = rec
    return [r for r in last.values() if r.get("control", bool(r.get("accepted")) or not r.get("regression"))]


def accepted_medians(history: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[float]]:
    """Median latency per (config label, phase) of every accepted night (`accepted_nights`)."""
    out: dict[tuple[str, str], list[float]] = {}
    for rec in accepted_nights(history):
        for m in rec.get("medians") or []:
            v = m.get("median_ms")
            if isinstance(v, int | float) and v > 0:
                out.setdefault((str(m.get("label")), str(m.get("phase"))), []).append(float(v))
    return out


def _pooled_spread(series: Mapping[tuple[str, str], Sequence[float]]) -> tuple[float, int]:
    """Standard deviation of log medians around each config's own mean, pooled over configs; and its df."""
    ss, df = 0.0, 0
    for values in series.values():
        if len(values) >= 2:
            logs = np.log(np.asarray(values))
            ss += float(np.sum((logs - logs.mean()) ** 2))
            df += len(values) - 1
    return (math.sqrt(ss / df), df) if df else (float("nan"), 0)


def control_limits(
    history: Iterable[Mapping[str, Any]],
    k: float = CONTROL_K,
    min_nights: int = MIN_NIGHTS,
    default_spread: float = DEFAULT_SPREAD,
    min_spread: float = MIN_SPREAD,
) -> dict[tuple[str, str], ControlLimit]:
    """The limit per (config label, phase) seen in the accepted nights of `history`."""
    series = accepted_medians(history)
    pooled, pooled_df = _pooled_spread(series)
    nights = max((len(v) for v in series.values()), default=0)
    out = {}
    for key, values in series.items():
        m = len(values)
        logs = np.log(np.asarray(values))
        if m >= min_nights:
            own = float(logs.std(ddof=1))
            spread = max(own, pooled if pooled_df >= min_nights - 1 else 0.0, min_spread)
            source = f"history ({m} accepted nights)"
        else:
            spread = max(default_spread, pooled if pooled_df >= 1 and nights >= 2 else 0.0, min_spread)
            source = f"short history ({m} accepted night{'s' if m != 1 else ''}): fallback spread"
        factor = math.sqrt(1.0 + 1.0 / m)
        out[key] = ControlLimit(
            label=key[0],
            phase=key[1],
            nights=m,
            center_ms=float(np.exp(np.median(logs))),
            spread=spread,
            limit_ratio=float(math.exp(k * spread * factor)),
            source=source,
        )
    return out


def beyond_limit(tonight_ms: float, limit: ControlLimit | None, default_spread: float = DEFAULT_SPREAD,
                 k: float = CONTROL_K) -> tuple[bool, float | None]:
    """(beyond the upper control limit, tonight / centre). With no history for this config: the default limit
    around tonight's own comparison is left to the bootstrap rule (True, None)."""
    if limit is None or limit.center_ms is None or limit.center_ms <= 0:
        return True, None
    ratio = tonight_ms / limit.center_ms
    return ratio > limit.limit_ratio, ratio


def apply_history(checks: Sequence[Any], tonight_medians: Sequence[Mapping[str, Any]],
                  limits: Mapping[tuple[str, str], ControlLimit]) -> None:
    """Keep a bootstrap flag only where tonight's median also lies beyond the history's control limit; record
    the limit on every check (`check.history`)."""
    medians = {(str(m["label"]), str(m["phase"])): float(m["median_ms"]) for m in tonight_medians}
    for c in checks:
        limit = limits.get((c.label, c.phase))
        tonight = medians.get((c.label, c.phase), c.tonight_median_ms)
        beyond, ratio = beyond_limit(tonight, limit)
        c.history = {
            **(limit.as_dict() if limit else {"source": "no history for this config", "nights": 0}),
            "tonight_median_ms": tonight,
            "ratio_to_center": ratio,
            "beyond_limit": beyond,
            "bootstrap_flagged": c.flagged,
        }
        c.flagged = bool(c.flagged and beyond)


def apply_mape_history(
    checks: Sequence[Any],
    history: Iterable[Mapping[str, Any]],
    k: float = CONTROL_K,
    min_nights: int = MIN_NIGHTS,
    default_spread: float = DEFAULT_MAPE_SPREAD,
    min_spread: float = MIN_SPREAD,
) -> None:
    """Keep an estimator MAPE-growth flag (stats.compare_mape) only where tonight's held-out MAPE also lies beyond
    centre × exp(k · s · sqrt(1 + 1/m)) of the accepted nights' MAPE for that phase; s is their own spread from
    `min_nights` nights on, `default_spread` before. The limit is recorded on every check (`check.history`)."""
    series: dict[str, list[float]] = {}
    for rec in accepted_nights(history):
        for phase, v in (rec.get("held_out_mape_pct") or {}).items():
            if isinstance(v, int | float) and v > 0:
                series.setdefault(str(phase), []).append(float(v))
    for c in checks:
        values = series.get(c.phase, [])
        if not values or c.tonight_mape_pct is None:
            c.history = {"source": "no accepted nights with this phase's MAPE", "nights": 0,
                         "growth_flagged": c.flagged}
            continue
        m = len(values)
        logs = np.log(np.asarray(values))
        own = float(logs.std(ddof=1)) if m >= 2 else 0.0
        spread = max(own, min_spread) if m >= min_nights else max(default_spread, own, min_spread)
        centre = float(np.exp(np.median(logs)))
        limit = float(math.exp(k * spread * math.sqrt(1.0 + 1.0 / m)))
        ratio = c.tonight_mape_pct / centre
        c.history = {"nights": m, "center_mape_pct": centre, "spread": spread, "limit_ratio": limit,
                     "ratio_to_center": ratio, "beyond_limit": ratio > limit, "growth_flagged": c.flagged,
                     "source": f"history ({m} accepted nights)" if m >= min_nights else
                     f"short history ({m} accepted night{'s' if m != 1 else ''}): fallback spread"}
        c.flagged = bool(c.flagged and ratio > limit)
