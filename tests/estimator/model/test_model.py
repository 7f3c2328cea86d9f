"""LatencyEstimator: save/load round trip, predict_request vs per-step sums, and bad inputs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import estimator.model.embedding
from estimator import EstimatorError, LatencyEstimator
from estimator.data.runs import RunSet, load_runs
from estimator.model.estimator import PhaseModel
from estimator.model.train import train_estimator
from tests.estimator.fakes import fake_encoder

CONFIG = {"tier": 2, "top_k": 40, "blocks": 32}


@pytest.fixture(scope="module")
def fake_embeddings() -> Iterator[None]:
    """Swap the real sentence model for a hash-based 384-d encoder (fast, deterministic)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(estimator.model.embedding, "load_encoder", lambda: fake_encoder)
        yield


@pytest.fixture(scope="module")
def runset(synthetic_run: Path) -> RunSet:
    return load_runs([synthetic_run])


@pytest.fixture(scope="module")
def saved_models(
    runset: RunSet, tmp_path_factory: pytest.TempPathFactory, fake_embeddings: None
) -> dict[str, Path]:
    """Every variant trained on the synthetic run and saved (held-out fit skipped for the slower ones)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for variant in ("tokens", "buckets", "poly", "embedding", "residual"):
        est = train_estimator(runset, variant, held_out=variant == "tokens")  # type: ignore[arg-type]
        out[variant] = est.save(root / variant)
        est_check = LatencyEstimator.load(out[variant])
        assert est_check.variant == variant
    return out


@pytest.mark.parametrize("variant", ["tokens", "buckets", "poly", "embedding", "residual"])
def test_round_trip_predictions_identical(
    variant: str, saved_models: dict[str, Path], runset: RunSet, fake_embeddings: None
) -> None:
    path = saved_models[variant]
    loaded = LatencyEstimator.load(path)
    resaved = loaded.save(path.parent / f"{variant}-again")
    again = LatencyEstimator.load(resaved)
    pre = runset.with_text(runset.phase("prefill"))
    dec = runset.with_text(runset.phase("decode")).iloc[::7]
    p1, p2 = loaded.predict_prefill(pre), again.predict_prefill(pre)
    d1, d2 = loaded.predict_decode(dec), again.predict_decode(dec)
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(d1, d2)
    assert (p1 > 0).all() and (d1 > 0).all()
    assert "pickle" not in {f.suffix for f in path.iterdir()}
    files = ["decode.txt", "meta.json", "prefill.txt"] + ([] if variant == "embedding" else ["tables.npz"])
    assert sorted(f.name for f in path.iterdir()) == files
    meta = json.loads((path / "meta.json").read_text())
    assert meta["variant"] == variant and meta["schema_version"] == 3
    assert (meta["embedding"] is not None) == (variant == "embedding")
    if variant == "embedding":
        assert np.asarray(meta["embedding"]["pca"]["components"]).shape == (32, 384)


def test_meta_records_training_summary(saved_models: dict[str, Path]) -> None:
    meta = LatencyEstimator.load(saved_models["tokens"]).meta
    t = meta.training
    assert (t.text_tokens_min, t.text_tokens_max) == (16, 512)
    assert t.position_max == 512 + 7 and t.decode_steps_max == 7
    assert len(t.configs) == 4 and t.rows["prefill"] == 2 * 2 * 6 * 7
    assert meta.held_out is not None and meta.held_out.metrics["prefill"]["mape_pct"] is not None
    assert len(meta.closed_form.prefill) == 4


def test_single_dict_matches_dataframe_row(saved_models: dict[str, Path], runset: RunSet) -> None:
    est = LatencyEstimator.load(saved_models["poly"])
    dec = runset.phase("decode")
    row = dec.iloc[5]
    one = est.predict_decode({k: row[k] for k in ("tier", "top_k", "blocks", "text_tokens", "position")})
    assert one.shape == (1,)
    assert one[0] == est.predict_decode(dec.iloc[5:6])[0]


@pytest.mark.parametrize("variant", ["tokens", "residual", "embedding"])
def test_predict_request_matches_per_step_sum(
    variant: str, saved_models: dict[str, Path], fake_embeddings: None
) -> None:
    est = LatencyEstimator.load(saved_models[variant])
    text = "the engine schedules each request"
    for n, new_tokens in ((100, 1), (100, 2), (100, 8), (100, 33), (300, 200), (300, 1024), (300, 4096)):
        req = est.predict_request(CONFIG, n, new_tokens, text=text, allow_unseen=True)
        steps = est.decode_positions(CONFIG, n, new_tokens, text=text, allow_unseen=True)
        assert req.decode_steps == new_tokens - 1 == len(steps)
        assert req.decode_ms_total == pytest.approx(steps.sum(), rel=1e-9, abs=1e-12)  # exact, not interpolated
        assert req.total_ms == pytest.approx(req.prefill_ms + req.decode_ms_total)
    prefill = est.predict_prefill({**CONFIG, "text_tokens": 300, "text": text})[0]
    assert req.prefill_ms == pytest.approx(prefill, rel=1e-12)


def test_tables_answer_without_the_booster(saved_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    est = LatencyEstimator.load(saved_models["tokens"])

    def no_booster(*_a: object, **_k: object) -> np.ndarray:
        raise AssertionError("the general path ran")

    monkeypatch.setattr(PhaseModel, "predict", no_booster)
    req = est.predict_request(CONFIG, 100, 100_000, allow_unseen=True)
    assert req.decode_steps == 99_999 and req.decode_ms_total > 0
    assert est.predict_prefill({**CONFIG, "text_tokens": 64})[0] > 0


def test_out_of_range_refused_impossible_raises(saved_models: dict[str, Path]) -> None:
    est = LatencyEstimator.load(saved_models["tokens"])
    with pytest.raises(EstimatorError, match=r"text_tokens=4000 \(trained 16\.\.512\).*cannot extrapolate"):
        est.predict_request(CONFIG, 4000, 4)
    req = est.predict_request(CONFIG, 4000, 1, allow_unseen=True)
    assert req.unseen == ("text_tokens=4000 (trained 16..512)",)
    past = est.predict_request(CONFIG, 500, 30, allow_unseen=True)
    assert past.unseen == ("decode position 529 (trained up to 519)",)
    with pytest.raises(EstimatorError, match=r"tier=7 was never trained \(trained values: 1, 2\)"):
        est.predict_request({**CONFIG, "tier": 7}, 100, 4)
    assert est.predict_request({**CONFIG, "top_k": 0}, 100, 4).unseen == ()
    residual = LatencyEstimator.load(saved_models["residual"])
    req = residual.predict_request(CONFIG, 4000, 4)  # the closed form extrapolates: answered, with a note
    assert req.unseen == () and any("extrapolated" in w for w in req.warnings)
    with pytest.raises(EstimatorError, match="text_tokens must be > 0"):
        est.predict_request(CONFIG, 0, 10)
    with pytest.raises(EstimatorError, match="new_tokens"):
        est.predict_request(CONFIG, 10, 0)
    with pytest.raises(EstimatorError, match="blocks"):
        est.predict_request({"tier": 1, "top_k": 0}, 10, 10)
    with pytest.raises(EstimatorError, match="missing feature 'position'"):
        est.predict_decode({**CONFIG, "text_tokens": 10})
    with pytest.raises(EstimatorError, match="greater than text_tokens"):
        est.predict_decode({**CONFIG, "text_tokens": 10, "position": 10})
    with pytest.raises(EstimatorError, match="positive"):
        est.predict_prefill({**CONFIG, "text_tokens": -3})


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_meta(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    meta = json.loads((path / "meta.json").read_text())
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def test_metadata_mismatches_are_one_line_errors(saved_models: dict[str, Path], tmp_path: Path) -> None:
    cases = {
        "features": (lambda m: m["phases"]["prefill"]["features"].pop(), "does not match"),
        "extra": (lambda m: m.update(surprise=1), "invalid metadata"),
        "schema": (lambda m: m.update(schema_version=4), "schema_version 4"),
        "variant": (lambda m: m.update(variant="embedding"), "embedding metadata disagree"),
        "axes": (lambda m: m.update(axes=["tier", "top_k"]), "does not match"),
        "file": (lambda m: m["phases"]["decode"].update(model_file="../decode.txt"), "missing model file"),
    }
    for name, (edit, message) in cases.items():
        path = _copy(saved_models["tokens"], tmp_path / name)
        _edit_meta(path, edit)
        with pytest.raises(EstimatorError, match=message) as info:
            LatencyEstimator.load(path)
        assert "\n" not in str(info.value)
    path = _copy(saved_models["tokens"], tmp_path / "booster")
    shutil.copy(saved_models["poly"] / "prefill.txt", path / "prefill.txt")
    with pytest.raises(EstimatorError, match="content does not match meta.json"):
        LatencyEstimator.load(path)
    _edit_meta(path, lambda m: m["phases"]["prefill"].update(sha256=None))  # a model saved without digests
    with pytest.raises(EstimatorError, match="differ"):
        LatencyEstimator.load(path)
    with pytest.raises(EstimatorError, match="no meta.json"):
        LatencyEstimator.load(tmp_path / "nowhere")
