"""Change points over the nightly history, beside the control chart (issue 35 item 3; the report marks them).

The control chart (estimator/nightly/control.py) asks whether tonight lies beyond the accepted nights' spread. A
change point asks whether the series of all nights, flagged or not, falls into segments at different levels. Two
nights at a new level are more than one night's noise, so a step change shows up even where no single night
crosses a limit.

Per (config, phase): ruptures' PELT on the log medians with the least-absolute-deviation cost (`l1`). A segment
holds at least MIN_SIZE nights, and under that cost a two-night segment costs |difference| of its two nights: a
new level is found once its second night agrees with its first, while a single odd night (tonight alone, or one
disturbed night) lowers no cost and is left to the control chart. (With least squares, one odd last night made a
change point in 80% of simulated series.) The penalty is PENALTY_K · σ · ln(n), where σ is the series' own
night-to-night noise, estimated robustly: the median absolute first difference / (0.6745 · √2), at least MIN_SIGMA.

PENALTY_K = 2 was set on simulated series of 20 nights with 10% log-normal noise, 300 each (Clopper-Pearson 95%):
- any change point found in unchanged series: 8/300 = 2.7% [1.2, 5.2];
- a ×1.3 step from night 13 on, found at that night: 208/300 = 69% [64, 75];
- one last night ×2 after 12 ordinary ones: 9/300 = 3.0% [1.4, 5.6].
K = 3 halves the false changes and detects 50%; K = 1 detects 78% with 21% false.

Library, chosen from the three the issue names. Checked with `pip install --dry-run` against this project's
environment:
- apache-otava 0.8.0 pins numpy 2.2.0: pip would replace this project's numpy 2.3.5 and scipy 1.17.1 with 2.2.0
  and 1.16.3, and would add the BigQuery, Postgres and Slack clients;
- signal-processing-algorithms 2.1.6 (MongoDB's E-Divisive means) would install numpy 1.26.4, setuptools 70.3 and
  gevent;
- ruptures 1.1.10 needs only numpy and scipy, as a 1.3 MB wheel, and its PELT solves the penalised segmentation
  exactly.

Only ruptures installs beside vLLM's numpy. How many injected slowdowns each method catches is the issue's
detection study, which is not run yet.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PENALTY_K = 2.0
MIN_SIZE = 2
MIN_SIGMA = 0.01  # log units: below 1% night-to-night noise the series is treated as that noisy


@dataclass(frozen=True)
class ChangePoint:
    """A new level from night `index` (0-based in the series) on: the segments' geometric means (ms), after / before."""

    label: str
    phase: str
    index: int
    run_id: str
    before_ms: float
    after_ms: float

    @property
    def ratio(self) -> float:
        return self.after_ms / self.before_ms


def noise_sigma(logs: np.ndarray) -> float:
    """Night-to-night noise of a log series: median |first difference| / (0.6745 · √2), robust to a level shift."""
    if len(logs) < 2:
        return MIN_SIGMA
    return max(float(np.median(np.abs(np.diff(logs)))) / (0.6745 * math.sqrt(2.0)), MIN_SIGMA)


def change_points(values: Sequence[float], penalty_k: float = PENALTY_K, min_size: int = MIN_SIZE) -> list[int]:
    """Indices where a new segment starts in a series of positive values (nightly medians), oldest first."""
    import ruptures as rpt

    logs = np.log(np.asarray(values, dtype=float))
    n = len(logs)
    if n < 2 * min_size:
        return []
    sigma = noise_sigma(logs)
    algo = rpt.Pelt(model="l1", min_size=min_size, jump=1).fit(logs.reshape(-1, 1))
    ends = algo.predict(pen=penalty_k * sigma * math.log(n))
    return [int(e) for e in ends[:-1]]  # ruptures ends every segment; the last end is n


def history_change_points(history: Iterable[Any], normalized: bool = False) -> list[ChangePoint]:
    """Change points per (config label, phase) over every night of `history` (HistoryLine objects or dicts with
    `run_id` and `medians`), in the history's order. `normalized`: over median / the night's CPU canary (nights
    without a canary left out; `before_ms` and `after_ms` are then levels in canary passes, not ms)."""
    series: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for h in history:
        run_id = _get(h, "run_id")
        for m in _get(h, "medians") or []:
            v = _get(m, "median_ms")
            if normalized:
                canary = _get(m, "canary_ms")
                ok = isinstance(v, int | float) and isinstance(canary, int | float) and canary > 0
                v = v / canary if ok else None
            if isinstance(v, int | float) and v > 0:
                series.setdefault((str(_get(m, "label")), str(_get(m, "phase"))), []).append((str(run_id), float(v)))
    out = []
    for (label, phase), pts in sorted(series.items()):
        values = [v for _, v in pts]
        starts = [0, *change_points(values), len(values)]
        for k in range(1, len(starts) - 1):
            before = values[starts[k - 1]:starts[k]]
            after = values[starts[k]:starts[k + 1]]
            out.append(ChangePoint(label, phase, starts[k], pts[starts[k]][0], _gmean(before), _gmean(after)))
    return out


def _gmean(values: Sequence[float]) -> float:
    return float(np.exp(np.mean(np.log(values))))


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, Mapping) else getattr(obj, key, None)
