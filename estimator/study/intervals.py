"""Confidence intervals for repeated held-out evaluation and the notes' 2% / 5% rule applied to an interval.

Two interval methods (docs/noise-floor.md gives the formulas):
- several folds (k folds × r seeds, or one fold per held-out length): the mean of the per-fold figures with the
  Nadeau–Bengio corrected resampled t interval, variance s²·(1/J + n_test/n_train) on J − 1 degrees of freedom
  (folds share training rows, so the plain 1/J would be too narrow);
- one or two folds: a percentile bootstrap over prompts (whole prompts resampled, every model scored on the same
  draw so that differences stay paired).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

WORTH_IT_PCT = 5.0
NOT_WORTH_PCT = 2.0
CONFIDENCE = 0.95
MIN_FOLDS_FOR_T = 3
MAX_DATA_FACTOR = 100.0  # beyond this many times the data, "how much more would decide it" is not useful


@dataclass(frozen=True)
class Interval:
    """A point estimate and its 95% interval, with how it was computed (`t` or `bootstrap`) and over how many
    folds or resamples."""

    mean: float
    low: float
    high: float
    method: str
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def as_dict(self) -> dict[str, float | str | int | None]:
        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {"mean": num(self.mean), "low": num(self.low), "high": num(self.high), "method": self.method,
                "n": self.n}


NAN_INTERVAL = Interval(float("nan"), float("nan"), float("nan"), "none", 0)


def corrected_t_interval(values: Sequence[float], test_train_ratio: float, confidence: float = CONFIDENCE) -> Interval:
    """Mean of per-fold `values` with the Nadeau–Bengio corrected resampled t interval.

    `test_train_ratio` is n_test / n_train of one fold (e.g. 1/(k−1) for k folds).
    """
    from scipy.stats import t as student_t

    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return NAN_INTERVAL
    m = float(v.mean())
    if len(v) < 2:
        return Interval(m, float("nan"), float("nan"), "t", len(v))
    var = float(v.var(ddof=1)) * (1.0 / len(v) + max(test_train_ratio, 0.0))
    q = float(student_t.ppf(0.5 + confidence / 2.0, df=len(v) - 1))
    h = q * math.sqrt(var)
    return Interval(m, m - h, m + h, "t", len(v))


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    groups: np.ndarray,
    n_boot: int = 400,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Interval:
    """Percentile bootstrap of `statistic(row_indices)` resampling whole groups (prompts) with replacement."""
    codes, uniq = _codes(groups)
    if len(uniq) == 0:
        return NAN_INTERVAL
    members = [np.flatnonzero(codes == g) for g in range(len(uniq))]
    point = statistic(np.arange(len(groups)))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, len(uniq), size=len(uniq))
        stats[b] = statistic(np.concatenate([members[g] for g in pick]))
    stats = stats[np.isfinite(stats)]
    if len(stats) < 10:
        return Interval(point, float("nan"), float("nan"), "bootstrap", len(stats))
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(float(point), float(lo), float(hi), "bootstrap", n_boot)


def _codes(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniq, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return codes, uniq


@dataclass(frozen=True)
class Decision:
    """The rule on a relative improvement's interval, and how many prompts per point would decide it."""

    decision: str  # "worth it" | "not worth it" | "undecided" | "no data"
    prompts_per_point_needed: float | None
    note: str


def decide(improvement: Interval, by_construction: bool, prompts_per_point: float) -> Decision:
    """'worth it' when the interval's lower end clears 5%, 'not worth it' when its upper end is below 2%,
    otherwise 'undecided' with the prompts per point that would shrink the interval enough (width ∝ 1/√n)."""
    if by_construction:
        return Decision("not worth it", None, "identical to tokens by construction")
    lo, hi, m, h = improvement.low, improvement.high, improvement.mean, improvement.half_width
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Decision("no data" if not math.isfinite(m) else "undecided", None, "no interval (too few folds)")
    if lo > WORTH_IT_PCT:
        return Decision("worth it", None, f"interval lower end {lo:.1f}% > {WORTH_IT_PCT:.0f}%")
    if hi < NOT_WORTH_PCT:
        return Decision("not worth it", None, f"interval upper end {hi:.1f}% < {NOT_WORTH_PCT:.0f}%")
    # The half-width that would decide it if the estimate stayed where it is.
    need_h = max(m - WORTH_IT_PCT, NOT_WORTH_PCT - m)
    if need_h <= 0 or h <= 0:
        return Decision(
            "undecided",
            None,
            f"estimate {m:.1f}% lies between {NOT_WORTH_PCT:.0f}% and {WORTH_IT_PCT:.0f}%: more data alone would "
            "not decide it unless the estimate moves",
        )
    factor = (h / need_h) ** 2
    if factor > MAX_DATA_FACTOR:
        return Decision(
            "undecided",
            None,
            f"interval {lo:.1f}%..{hi:.1f}%: the estimate sits so close to a threshold that over "
            f"{MAX_DATA_FACTOR:.0f}× the prompts per point would be needed",
        )
    needed = prompts_per_point * factor
    return Decision(
        "undecided",
        float(needed),
        f"interval {lo:.1f}%..{hi:.1f}% straddles a threshold; about {needed:.0f} prompts per point "
        f"(×{factor:.1f}) would decide it if the estimate held",
    )
