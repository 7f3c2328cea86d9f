"""`estimate experiment budget-accuracy`'s figures (estimator/study/budget_accuracy.py) on synthetic runs: the raw
ratio, the level-removed one, and the verdict readings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from estimator.errors import EstimatorError
from estimator.model.train import TrainSpec, train
from estimator.study.budget_accuracy import compare_on_heldout, verdict_readings


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, run_writer: Callable[..., Path]) -> dict[str, Path]:
    """A model trained on every length, one on the axis' two ends only, and a held-out run at other lengths
    whose level is 25% above the training runs' (another start, another minute)."""
    root = tmp_path_factory.mktemp("budget-accuracy")
    out: dict[str, Path] = {}
    for name, lengths in (("full", (16, 32, 64, 128, 256, 512)), ("ends", (16, 512))):
        run = run_writer(root / name, run_id=f"20250101-000000-{name}", lengths=lengths, seed=1)
        out[name] = root / f"m-{name}"
        train(TrainSpec(runs=[run], out=out[name], variant="tokens"))
    held = run_writer(root / "held", run_id="20250101-000000-held", lengths=(48, 200, 400), seed=2, same_repeats=0)
    for f in (held / "samples").glob("*.parquet"):
        frame = pd.read_parquet(f)
        frame["latency_ms"] *= 1.25
        frame.to_parquet(f, index=False)
    out["held"] = held
    return out


def test_a_model_against_itself_is_a_ratio_of_one(models: dict[str, Path]) -> None:
    r = compare_on_heldout(models["full"], models["full"], [models["held"]])
    assert r["ratio"] == 1.0 and r["ratio_ci"] == [1.0, 1.0]
    assert {"adaptive_mape", "full_mape", "ratio", "ratio_ci"} <= r.keys()


def test_the_level_is_scored_apart_from_the_shape(models: dict[str, Path]) -> None:
    """Raw, both models miss the held-out run's 25% higher level; with each model's level removed per held-out
    start, what is left is the curve's shape: the full model's error drops, and the two-length model's curve is
    the worse one."""
    r = compare_on_heldout(models["ends"], models["full"], [models["held"]])
    shape = r["level_removed"]
    assert shape["starts"] == 2  # one per tier: the synthetic run's engine configs
    assert shape["full_mape"] < r["full_mape"] - 4
    assert shape["ratio"] > 1 and shape["ratio_ci"][0] <= shape["ratio"] <= shape["ratio_ci"][1]


def test_a_file_that_is_not_a_compare_result_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "compare.json"
    bad.write_text("{}")
    with pytest.raises(EstimatorError, match="not an `estimate compare` result"):
        verdict_readings(bad)
