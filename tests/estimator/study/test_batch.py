"""Batch level: the feature-set comparison and the iteration model on synthetic continuous batching."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from estimator import LatencyEstimator
from estimator.cli import app
from estimator.data.iterations import load_iteration_runs, with_derived
from estimator.model.iteration import fit_iteration_model, train_iteration_estimator
from estimator.study.batch import compare_feature_sets, noise_floor, validate_iterations
from tests.estimator.conftest import write_batch_run

runner = CliRunner()


def _totals_only_mape(train: Path, test: Path) -> float:
    """A linear fit on the totals alone (prefill tokens, decode count) per config: the baseline to beat."""
    tr, te = with_derived(load_iteration_runs([train])), with_derived(load_iteration_runs([test]))
    out = []
    for tier in sorted(tr["tier"].unique()):
        a, b = tr[tr["tier"] == tier], te[te["tier"] == tier]
        x = np.column_stack([np.ones(len(a)), a["prefill_tokens"], a["num_decode_seqs"]])
        coef, *_ = np.linalg.lstsq(x, a["latency_ms"], rcond=None)
        xb = np.column_stack([np.ones(len(b)), b["prefill_tokens"], b["num_decode_seqs"]])
        out.append(np.abs(xb @ coef - b["latency_ms"]) / b["latency_ms"])
    return float(np.mean(np.concatenate(out)) * 100)


@pytest.mark.parametrize(("skew", "beats"), [(4.0, True), (0.0, False)])
def test_iteration_model_beats_totals_only_exactly_when_the_mix_matters(
    tmp_path: Path, skew: float, beats: bool
) -> None:
    mix = {"skew": skew, "ctx_coef": 0.0, "sq_coef": 0.0}  # without skew, latency depends on the totals alone
    train = write_batch_run(tmp_path / "train", seed=1, **mix)
    test = write_batch_run(tmp_path / "test", seed=2, run_id="20250103-000000-test", **mix)
    train_iteration_estimator([train], tmp_path / "model")
    model = validate_iterations(tmp_path / "model", [test])[0].iteration_mape_pct
    baseline = _totals_only_mape(train, test)
    if beats:
        assert model < 0.6 * baseline, (model, baseline)
    else:
        assert model > 0.85 * baseline, (model, baseline)  # nothing to gain where only the totals matter


def test_feature_set_verdicts_follow_the_data(tmp_path: Path) -> None:
    skewed = compare_feature_sets([write_batch_run(tmp_path / "a", skew=4.0, ctx_coef=0.0, sq_coef=0.0)], k=4, seeds=2)
    flat = compare_feature_sets([write_batch_run(tmp_path / "b", skew=0.0, ctx_coef=0.0, sq_coef=0.0)], k=4, seeds=2)
    pick = {(s.feature_set, s.learner): s for s in skewed.scores}
    assert pick[("skew", "linear")].decision == "worth it"
    for s in flat.scores:
        assert s.decision in (None, "not worth it", "undecided"), s
        assert s.mape_pct.low is not None and s.mape_pct.low <= s.mape_pct.mean <= s.mape_pct.high


def test_noise_floor_recovers_the_noise(tmp_path: Path) -> None:
    run = write_batch_run(tmp_path / "n", noise=0.05, requests=4, rate=1.0, segments=10)  # mostly lone requests
    itset = load_iteration_runs([run])
    floor, groups = noise_floor(with_derived(itset), itset.config_columns)
    assert groups > 20 and floor is not None
    assert 0.05 * 100 * 0.8 * np.sqrt(2 / np.pi) < floor < 0.05 * 100 * 1.2 * np.sqrt(2 / np.pi)  # E|N(0,σ)|


def test_predict_iteration_from_a_composition(batch_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(batch_run), "--target", "iteration", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "held-out MAPE (by segment)" in result.stdout
    est = LatencyEstimator.__new__(LatencyEstimator)  # an iteration model alone: IterationEstimator via the facade
    from estimator.model.iteration import IterationEstimator

    est.iteration = IterationEstimator.load(tmp_path / "m")
    cfg = {"tier": 2, "model": "tiny-2"}
    lists = est.predict_iteration(cfg, {"prefill_chunks": [200, 100], "decode_contexts": [300, 500, 400]})
    sums = est.predict_iteration(
        cfg,
        {
            "prefill_tokens": 300,
            "prefill_sq_sum": 50_000,
            "num_decode_seqs": 3,
            "decode_ctx_sum": 1200,
            "decode_ctx_max": 500,
        },
    )
    assert lists == pytest.approx(sums) and lists > 0
    truth = 2 * (0.5 + 0.002 * 300 + 2e-6 * 50_000 + 0.05 * 3 + 4e-4 * 1200)
    assert lists == pytest.approx(truth, rel=0.1)
    with pytest.raises(Exception, match="has no iteration model"):
        est.predict_iteration({"tier": 7, "model": "x"}, {"prefill_tokens": 10})


def test_cli_batch_and_validate(batch_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["batch", str(batch_run), "--out", str(tmp_path / "b"), "--folds", "3", "--seeds", "1"])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "b" / "batch.json").read_text())
    assert {s["feature_set"] for s in payload["scores"]} == {"totals", "context", "skew", "detail"}
    train_iteration_estimator([batch_run], tmp_path / "m")
    unseen = write_batch_run(tmp_path / "unseen", seed=7, run_id="20250104-000000-unseen")
    result = runner.invoke(app, ["validate", str(unseen), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    assert "by iteration kind: prefill-only" in result.output
    v = json.loads((tmp_path / "v" / "validation.json").read_text())
    assert v["iteration_mape_pct"] < 10 and v["ttft_mape_pct"] is not None and v["e2e_mape_pct"] < 10
    kinds = v["by_kind"]
    assert set(kinds) <= {"prefill-only", "mixed", "decode-only"} and "decode-only" in kinds
    assert sum(k["iterations"] for k in kinds.values()) == v["iterations"]
    assert all(abs(k["signed_pct"]) <= k["mape_pct"] + 1e-9 for k in kinds.values())
    iv = v["intervals"]
    assert set(iv) == {"iteration_mape_pct", "ttft_mape_pct", "e2e_mape_pct", "decode_only_signed_pct"}
    for key in ("iteration_mape_pct", "ttft_mape_pct", "e2e_mape_pct"):
        assert iv[key][0] < v[key] < iv[key][1], key
    assert iv["decode_only_signed_pct"][0] < kinds["decode-only"]["signed_pct"] < iv["decode_only_signed_pct"][1]
    assert "95% bootstrap intervals" in result.output


def test_validation_refuses_a_training_run_or_its_workload(tmp_path: Path) -> None:
    """The held-out rule: no validation run may have been used in training, nor replay a training workload."""
    train = write_batch_run(tmp_path / "train", seed=2)
    (train / "workload.jsonl").write_text('{"arrival_s": 0, "text_tokens": 5, "new_tokens": 2}\n')
    train_iteration_estimator([train], tmp_path / "m")
    result = runner.invoke(app, ["validate", str(train), "--model", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "was used to train this model" in result.output
    copy = write_batch_run(tmp_path / "copy", seed=3, run_id="20250105-000000-again")
    (copy / "workload.jsonl").write_text((train / "workload.jsonl").read_text())
    result = runner.invoke(app, ["validate", str(copy), "--model", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "replays the same workload as a training run" in result.output
    (copy / "workload.jsonl").write_text('{"arrival_s": 1, "text_tokens": 5, "new_tokens": 2}\n')
    assert runner.invoke(app, ["validate", str(copy), "--model", str(tmp_path / "m")]).exit_code == 0


def test_fit_recovers_known_coefficients(batch_run: Path) -> None:
    itset = load_iteration_runs([batch_run])
    est = fit_iteration_model(with_derived(itset), itset.config_columns, ["r"], "now")
    coef = {f.config["tier"]: f.coef_ms for f in est.meta.configs}
    np.testing.assert_allclose(coef[1][:5], [0.5, 0.002, 2e-6, 0.05, 4e-4], rtol=0.15, atol=1e-7)
