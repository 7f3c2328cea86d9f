"""The history rule of the nightly job: control limits from the spread across accepted nights, on synthetic history
lines and through `run_nightly` on synthetic nights whose whole machine drifts a few percent from night to night."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from estimator.nightly.control import accepted_medians, beyond_limit, control_limits
from estimator.nightly.job import run_nightly
from estimator.nightly.spec import EXIT_OK, EXIT_REGRESSION, NightlySpec

CONFIGS = ("tier=1 top_k=0 blocks=32", "tier=2 top_k=0 blocks=32")


def _line(run_id: str, drift: float, regression: bool = False, accepted: bool = False) -> dict[str, Any]:
    medians = [
        {"label": label, "phase": phase, "median_ms": base * drift}
        for label, base in zip(CONFIGS, (5.0, 12.0), strict=True)
        for phase in ("prefill", "decode")
    ]
    return {"run_id": run_id, "regression": regression, "accepted": accepted, "medians": medians}


def test_between_night_noise_is_not_flagged_and_a_slowdown_is() -> None:
    rng = np.random.default_rng(0)
    drifts = np.exp(0.04 * rng.standard_normal(6))  # a busy machine: ~4% between nights
    history = [_line(f"n{i}", float(d)) for i, d in enumerate(drifts)]
    limits = control_limits(history)
    assert all(lim.nights == 6 and lim.source.startswith("history") for lim in limits.values())
    for d in np.exp(0.04 * np.random.default_rng(1).standard_normal(20)):  # more nights like those
        assert not beyond_limit(5.0 * float(d), limits[(CONFIGS[0], "prefill")])[0]
    center = limits[(CONFIGS[0], "prefill")].center_ms
    assert beyond_limit(1.2 * center, limits[(CONFIGS[0], "prefill")])[0]  # +20%


def test_short_history_falls_back_to_a_default_spread() -> None:
    limits = control_limits([_line("n0", 1.0)])
    lim = limits[(CONFIGS[1], "decode")]
    assert lim.nights == 1 and "short history" in lim.source and lim.spread == pytest.approx(0.05)
    assert not beyond_limit(1.10 * lim.center_ms, lim)[0]  # a 10% busy night
    assert beyond_limit(1.25 * lim.center_ms, lim)[0]


def test_flagged_nights_do_not_widen_the_limits() -> None:
    history = [_line("n0", 1.0), _line("n1", 1.02), _line("slow", 1.4, regression=True), _line("n2", 0.99)]
    assert all(len(v) == 3 for v in accepted_medians(history).values())
    promoted = [*history[:2], _line("slow", 1.4, regression=True, accepted=True)]
    assert all(len(v) == 3 for v in accepted_medians(promoted).values())
    disturbed = [*history[:2], {**_line("odd", 1.4), "control": False}]  # a flag the re-run dropped
    assert all(len(v) == 2 for v in accepted_medians(disturbed).values())


def _drifted(run: Path, root: Path, run_id: str, factor: float) -> Path:
    dest = root / run_id
    shutil.copytree(run, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["run_id"] = run_id
    (dest / "manifest.json").write_text(json.dumps(manifest))
    for f in (dest / "samples").glob("*.parquet"):
        frame = pd.read_parquet(f)
        frame["latency_ms"] *= factor
        frame["run_id"] = run_id
        frame.to_parquet(f, index=False)
    return dest


def test_nightly_does_not_cry_wolf_over_drifting_nights(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    """Five unchanged nights on a machine that drifts by up to 8% (each night's own CI is narrow: the old rule
    flagged the 8% night) → no flag; then a 20% slower engine → flagged."""
    root = tmp_path / "runs"
    state = tmp_path / "state"
    kw: dict[str, Any] = {"tiers": (1, 2), "top_ks": (0,), "lengths": (32, 128, 512), "reps": 6, "noise": 0.01}
    drifts = (1.0, 1.08, 0.97, 1.04, 1.02)
    codes, flags = [], []
    for i, drift in enumerate(drifts):
        raw = run_writer(root / "raw", run_id=f"raw-{i}", seed=i, **kw)
        night = _drifted(raw, root, f"night-{i}", drift)
        result = run_nightly(NightlySpec(state_dir=state, run=night, bootstrap=200, report=False, confirm=False))
        codes.append(result.exit_code)
        flags += result.summary["flagged"]
        if i == 1:  # the old rule alone would have flagged it: the bootstrap CI lies above 1.05
            assert any(c["history"]["bootstrap_flagged"] for c in result.summary["comparisons"])
            assert any("within the drift" in w for w in result.summary["warnings"])
    assert codes == [EXIT_OK] * len(drifts) and flags == []
    raw = run_writer(root / "raw", run_id="raw-slow", seed=99, **kw)
    slow = _drifted(raw, root, "night-slow", 1.2 * 1.02)
    result = run_nightly(NightlySpec(state_dir=state, run=slow, bootstrap=200, report=False, confirm=False))
    assert result.exit_code == EXIT_REGRESSION
    flagged = [c for c in result.summary["comparisons"] if c["flagged"]]
    assert {c["label"] for c in flagged} == set(CONFIGS)
    assert all(c["history"]["nights"] >= 4 and c["history"]["source"].startswith("history") for c in flagged)


def _mape_night(run_id: str, prefill: float, **kw: object) -> dict[str, object]:
    return {"run_id": run_id, "accepted": False, "regression": False, "control": True,
            "held_out_mape_pct": {"prefill": prefill, "decode": 20.0}, "medians": [], **kw}


def test_held_out_mape_growth_is_kept_only_beyond_the_nights_limit() -> None:
    """The five real nights' prefill MAPE (docs/nightly-history/): an unchanged night at +28% over the baseline is
    within the nights' spread; a doubled MAPE is not."""
    from estimator.nightly.control import DEFAULT_MAPE_SPREAD, apply_mape_history
    from estimator.nightly.stats import compare_mape

    nights = [_mape_night(f"n{i}", v) for i, v in enumerate((7.86, 9.62, 10.03, 9.17, 6.35))]
    baseline = {"prefill": 7.86, "decode": 20.0}
    ordinary, = [c for c in compare_mape(baseline, {"prefill": 10.03, "decode": 20.0}) if c.phase == "prefill"]
    assert ordinary.flagged  # the growth rule alone: +28% and +2.2 points
    apply_mape_history([ordinary], nights)
    assert not ordinary.flagged and ordinary.history is not None
    assert ordinary.history["growth_flagged"] and not ordinary.history["beyond_limit"]
    assert ordinary.history["nights"] == 5
    worse, = [c for c in compare_mape(baseline, {"prefill": 20.0, "decode": 20.0}) if c.phase == "prefill"]
    apply_mape_history([worse], nights)
    assert worse.flagged and worse.history is not None and worse.history["beyond_limit"]
    # one accepted night: the fallback spread; a flagged night (control false) does not count
    short, = [c for c in compare_mape(baseline, {"prefill": 10.03, "decode": 20.0}) if c.phase == "prefill"]
    apply_mape_history([short], [nights[0], _mape_night("bad", 30.0, control=False, regression=True)])
    assert short.history is not None and short.history["nights"] == 1
    assert short.history["spread"] == DEFAULT_MAPE_SPREAD and not short.flagged
    none, = [c for c in compare_mape(baseline, {"prefill": 30.0, "decode": 20.0}) if c.phase == "prefill"]
    apply_mape_history([none], [])
    assert none.flagged and none.history == {"source": "no accepted nights with this phase's MAPE", "nights": 0,
                                             "growth_flagged": True}
