"""Change points over the nightly history (estimator/study/changepoints.py): a persistent step is found where it
starts, with its size; noise and a single odd night are not change points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from estimator.study.changepoints import change_points, history_change_points, noise_sigma

ROOT = Path(__file__).resolve().parents[3]


def test_a_step_is_found_where_it_starts_with_its_size() -> None:
    rng = np.random.default_rng(3)
    values = 5.0 * np.exp(rng.normal(0, 0.05, 14))
    values[8:] *= 1.5
    assert change_points(values) == [8]
    history = [{"run_id": f"n{i}", "medians": [{"label": "tier=0", "phase": "decode", "median_ms": v}]}
               for i, v in enumerate(values)]
    (cp,) = history_change_points(history)
    assert cp.run_id == "n8" and cp.index == 8 and cp.ratio == pytest.approx(1.5, rel=0.08)


def test_noise_and_a_single_odd_last_night_are_not_change_points() -> None:
    rng = np.random.default_rng(4)
    flat = 5.0 * np.exp(rng.normal(0, 0.15, 20))  # this machine's night-to-night spread
    assert change_points(flat) == []
    odd = list(5.0 * np.exp(rng.normal(0, 0.05, 10))) + [10.0]  # tonight alone: the control chart's to judge
    assert change_points(odd) == []
    assert change_points([5.0, 6.0, 5.5]) == []  # too short for two segments of two nights
    assert noise_sigma(np.log([5.0, 5.0, 5.0])) == 0.01  # the floor


def test_false_changes_on_unchanged_nights_are_rare() -> None:
    rng = np.random.default_rng(5)
    found = sum(bool(change_points(5.0 * np.exp(rng.normal(0, 0.1, 20)))) for _ in range(200))
    assert found / 200 <= 0.10, found


def test_the_recorded_nights() -> None:
    lines = [json.loads(x) for x in (ROOT / "docs" / "nightly-history" / "history.jsonl").read_text().splitlines()]
    # nights 1-5 unchanged; nights 7 (enforce_eager, x1.39) and 8 (a bigger model under the tier-0 label, x2-4.5)
    # each changed the engine differently, for one night: no level is confirmed by a second night
    assert history_change_points(lines) == []
    # had night 8's engine stayed for a ninth night, its level is a change point from night 8 on
    again = {**lines[-1], "run_id": "night-9"}
    found = {(c.label, c.phase): c for c in history_change_points([*lines, again])}
    tier0 = found[("tier=0 top_k=0 blocks=32", "prefill")]
    assert tier0.run_id == lines[-1]["run_id"] and tier0.ratio > 1.5


def test_a_step_of_the_machine_leaves_the_canary_normalized_series() -> None:
    """From night 8 on the machine is 1.5x slower, engine and canary alike: a raw change point, no normalized one;
    a night without a canary is left out of the normalized series."""
    rng = np.random.default_rng(5)
    machine = np.exp(rng.normal(0, 0.05, 14))
    machine[8:] *= 1.5
    own = np.exp(rng.normal(0, 0.03, 14))  # the canary's own noise
    history = [
        {
            "run_id": f"n{i}",
            "medians": [{"label": "tier=0", "phase": "decode", "median_ms": 5.0 * m,
                         "canary_ms": None if i == 3 else 1.6 * m * c}],
        }
        for i, (m, c) in enumerate(zip(machine, own, strict=True))
    ]
    (raw,) = history_change_points(history)
    assert raw.run_id == "n8"
    assert history_change_points(history, normalized=True) == []
    for line, c in zip(history[8:], own[8:], strict=True):  # now the engine, not the machine: the canary stays
        line["medians"][0]["canary_ms"] = 1.6 * c
    (engine,) = history_change_points(history, normalized=True)
    assert engine.run_id == "n8" and engine.ratio == pytest.approx(1.5, rel=0.1)
