"""Service-level objectives and goodput: one definition for everything that reports them (`estimate simulate
--rates`, the scheduler experiment, the report).

A request meets its SLO when it was served, its TTFT is within the TTFT objective and its TPOT (vLLM's benchmark's:
end-to-end minus TTFT over the tokens after the first) within the TPOT objective; a one-token request has no TPOT
and meets that one. SLO attainment at a rate is the share of its requests that meet it.

Goodput (DistServe): the highest arrival rate at which at least `target` (90%) of requests meet their SLO, every
lower rate meeting it too. Measured on a grid of rates, it is the rate where attainment falls through the target,
linear between the two grid rates around the fall (the grid's own rates would round it down to a grid point);
0 when even the lowest rate misses; and, when even the highest rate meets the target, that rate, marked
`censored` (the goodput is at least this). Standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

GOODPUT_TARGET = 0.9


@dataclass(frozen=True)
class Goodput:
    """`rate_rps`: requests per second (0.0 when the lowest rate misses the target); `censored`: the highest rate
    measured still met it, so the goodput is at least `rate_rps`."""

    rate_rps: float
    censored: bool = False


def meets_slo(ttft_ms: float, tpot_ms: float | None, ttft_slo_ms: float, tpot_slo_ms: float,
              served: bool = True) -> bool:
    """One request against its objectives (a one-token request's TPOT is None or NaN, and meets its objective)."""
    if not served or not ttft_ms <= ttft_slo_ms:
        return False
    return tpot_ms is None or math.isnan(tpot_ms) or tpot_ms <= tpot_slo_ms


def goodput(rates_rps: Sequence[float], attainment: Sequence[float], target: float = GOODPUT_TARGET) -> Goodput:
    """Goodput from SLO attainment (a share, 0-1) at each rate (see the module docstring). NaN attainment counts
    as a miss."""
    if len(rates_rps) != len(attainment):
        raise ValueError(f"{len(rates_rps)} rates but {len(attainment)} attainment values")
    pts = sorted(zip(rates_rps, attainment, strict=True))
    if not pts or not pts[0][1] >= target:
        return Goodput(0.0)
    for (r0, a0), (r1, a1) in zip(pts, pts[1:], strict=False):
        if not a1 >= target:
            if math.isnan(a1):
                return Goodput(r0)
            return Goodput(r0 + (r1 - r0) * (a0 - target) / (a0 - a1))
    return Goodput(pts[-1][0], censored=True)


def next_search_rate(lo: float, hi: float, steps: int, tried: Sequence[tuple[float, bool]]) -> float | None:
    """The rate search's next rate (profile serve-bench --search, and its prediction): LO first, then the middle of
    the highest rate that met the SLO and the lowest above it that missed (HI counts as missed until served), for
    `steps` loads after the first; None when done, or when LO itself missed. `tried`: (rate, met) so far."""
    if not tried:
        return lo
    if len(tried) > steps or not tried[0][1]:
        return None
    met = max(r for r, ok in tried if ok)
    missed = min([r for r, ok in tried if not ok and r > met] + [hi])
    return (met + missed) / 2
