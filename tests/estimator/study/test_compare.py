"""Experiment 2 on a synthetic run (fake embeddings): outputs, splits used, and the verdict's rules."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

import estimator.model.embedding
from estimator.study.compare import CompareSpec, Comparison, compare
from estimator.study.verdict import sufficiency
from tests.estimator.fakes import fake_encoder


@pytest.fixture(scope="module")
def comparison(
    synthetic_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Comparison, Path]]:
    out = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(estimator.model.embedding, "load_encoder", lambda: fake_encoder)
        spec = CompareSpec(
            runs=[synthetic_run], out=out, cost_calls=5, embedding_cost_calls=2, folds=3, seeds=1,
            learners=["lightgbm", "ridge"],  # type: ignore[list-item]
        )
        yield compare(spec), out


def test_outputs_and_models(comparison: tuple[Comparison, Path]) -> None:
    comp, out = comparison
    assert {p.name for p in comp.written} == {"compare.json", "compare.csv", "predictions.parquet"}
    scores = pd.read_csv(out / "compare.csv")
    expected = {"tokens", "buckets", "poly", "embedding", "residual", "blocks", "closed_form", "random_forest"}
    for (split, phase), sub in scores.groupby(["split", "phase"]):
        assert set(sub["model"]) == expected, (split, phase)
    by_prompt = scores[scores["split"] == "by_prompt"]
    assert by_prompt["cost_us"].notna().all() and (by_prompt["cost_us"] > 0).all()
    assert (scores["mape_vs_noise_floor"] > 0).all()
    payload = json.loads((out / "compare.json").read_text())
    assert payload["noise_floor"]["prefill"]["mape_pct"] > 0
    assert payload["latency_scale_ms"]["prefill"]["median_ms"] > 0
    assert any(line.startswith("Answer (prefill)") for line in payload["verdict"]["lines"])
    assert payload["error_analysis"]["prefill"]["per_config"]
    assert (out / "embedding_cache.parquet").is_file()
    rep = payload["repeated"]
    assert rep["folds"]["by_prompt"] == 3 and set(rep["folds"]) == {"by_prompt", "by_length", "longer"}
    models = {c["model"] for c in rep["cells"]}
    assert {"lightgbm:poly", "ridge:poly", "physics", "physics_trees", "closed_form", "random_forest"} <= models
    assert {f["question"] for f in rep["noise_floor"]} == {"by_prompt", "by_length", "longer"}
    for f in rep["noise_floor"]:
        assert f["corrected_mape_pct"]["mean"] < f["raw_mape_pct"]["mean"]
    assert payload["verdict"]["rule"].startswith("relative MAPE reduction vs tokens (same learner), 95% interval")


def test_test_rows_are_held_out(comparison: tuple[Comparison, Path]) -> None:
    comp, out = comparison
    preds = pd.read_parquet(out / "predictions.parquet")
    tok = preds[(preds["predictor"] == "tokens") & (preds["phase"] == "prefill")]
    by_len = tok[tok["split"] == "by_length"]
    assert by_len["text_tokens"].min() == 256  # the longest quarter of the lengths
    n_prompts = comp.scores.query("split == 'by_prompt' and phase == 'prefill' and model == 'tokens'")[
        "n_test"
    ]
    assert int(n_prompts.iloc[0]) == len(tok[tok["split"] == "by_prompt"])


def test_trees_cannot_extrapolate_but_closed_form_can(comparison: tuple[Comparison, Path]) -> None:
    comp, _ = comparison
    s = comp.scores.set_index(["split", "phase", "model"])["mape_pct"]
    assert s[("by_length", "prefill", "closed_form")] < s[("by_length", "prefill", "tokens")] / 5
    assert s[("by_length", "prefill", "residual")] < s[("by_length", "prefill", "tokens")] / 5


def test_improvement_readings(comparison: tuple[Comparison, Path]) -> None:
    comp, _ = comparison
    for imp in comp.verdict["improvements"]:
        rel = imp["improvement_pct"]
        expected = (
            "worse than tokens"
            if rel < 0
            else "not worth"
            if rel < 2
            else "marginal"
            if rel <= 5
            else "worth considering"
        )
        assert expected in imp["reading"]


def test_sufficiency_bars() -> None:
    assert sufficiency(0.95, 4.0) == "enough"
    assert sufficiency(0.95, 7.0) == "in between"
    assert sufficiency(0.85, 2.0) == "in between"
    assert sufficiency(0.75, 2.0) == "not enough"
    assert sufficiency(0.95, 11.0) == "not enough"


def test_spec_always_includes_the_baseline(synthetic_run: Path) -> None:
    spec = CompareSpec(runs=[synthetic_run], variants=["poly"])
    assert spec.variants == ["tokens", "poly"]
    assert spec.out_dir() == synthetic_run / "compare"
