"""The study's reference model beside the closed form (a random forest) and the timing of one prediction."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def median_call_us(fn: Callable[[], object], calls: int = 200, warmup: int = 3) -> float:
    """Median wall time of `fn()` over `calls` single calls, in µs."""
    for _ in range(warmup):
        fn()
    times = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - t0
    return float(np.median(times) * 1e6)


def fit_random_forest(x: np.ndarray, y_ms: np.ndarray, seed: int = 0, n_jobs: int = 2) -> Any:
    """The random-forest reference (sklearn) on the `tokens` features (100 trees, leaves of >= 2 rows)."""
    from sklearn.ensemble import RandomForestRegressor

    forest = RandomForestRegressor(
        n_estimators=100, min_samples_leaf=2, max_features=1.0, n_jobs=n_jobs, random_state=seed
    )
    forest.fit(x, y_ms)
    return forest
