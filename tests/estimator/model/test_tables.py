"""Compiled tables: the booster's own outputs at every threshold ± 1 token, exact decode sums, safe loading."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from estimator import EstimatorError, LatencyEstimator
from estimator.data.runs import load_runs
from estimator.model.tables import floored_linear_sum, floored_linear_sum_many
from estimator.model.train import train_estimator

VARIANTS = ("tokens", "buckets", "poly", "residual")


@pytest.fixture(scope="module")
def models(synthetic_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runset = load_runs([synthetic_run])
    root = tmp_path_factory.mktemp("tables")
    return {v: train_estimator(runset, v, held_out=False).save(root / v) for v in VARIANTS}  # type: ignore[arg-type]


def _booster(est: LatencyEstimator, phase: str, cfg: dict, text_tokens: np.ndarray, positions=None) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The general path: the LightGBM booster on raw columns, as before the tables existed."""
    n = len(text_tokens)
    cols = {a: np.repeat(np.asarray([cfg[a]]), n) for a in est.meta.axes}
    cols["text_tokens"] = np.asarray(text_tokens)
    if positions is not None:
        cols["position"] = np.asarray(positions)
    return est.models[phase].predict(cols, n)  # type: ignore[index]


def _probe_lengths(breaks: np.ndarray, rng: np.random.Generator, hi: int) -> np.ndarray:
    near = np.concatenate([breaks - 1, breaks, breaks + 1, rng.integers(1, hi, 40)])
    return np.unique(near[(near >= 1) & (near <= hi)])


@pytest.mark.parametrize("variant", VARIANTS)
def test_tables_equal_the_booster(models: dict[str, Path], variant: str) -> None:
    est = LatencyEstimator.load(models[variant])
    t = est.tables
    assert t is not None and len(t.keys) == 4  # 2 tiers × 2 top_k
    rng = np.random.default_rng(0)
    for cfg in est.meta.training.configs:
        c = {a: cfg[a] for a in est.meta.axes}
        row = t.index[tuple(str(c[a]) for a in est.meta.axes)]
        n = _probe_lengths(t.prefill_t, rng, 2000)
        np.testing.assert_allclose(t.prefill_many(np.full(len(n), row), n), _booster(est, "prefill", c, n), rtol=1e-12)
        for tok in _probe_lengths(t.decode_t, rng, 1000)[::3]:
            p = _probe_lengths(t.decode_p, rng, 3000)
            p = p[p > tok]
            got = t.decode_steps(row, int(tok), p)
            np.testing.assert_allclose(got, _booster(est, "decode", c, np.full(len(p), tok), p), rtol=1e-12)


@pytest.mark.parametrize("variant", ["tokens", "residual"])
def test_decode_prefix_sums_equal_brute_force(models: dict[str, Path], variant: str) -> None:
    est = LatencyEstimator.load(models[variant])
    rng = np.random.default_rng(1)
    cfg = {"tier": 2, "top_k": 40, "blocks": 32}
    for _ in range(25):
        n, new = int(rng.integers(1, 600)), int(rng.integers(1, 3000))
        req = est.predict_request(cfg, n, new, allow_unseen=True)
        pos = n + np.arange(1, new)
        brute = _booster(est, "decode", cfg, np.full(len(pos), n), pos).sum() if new > 1 else 0.0
        assert abs(req.decode_ms_total - brute) <= 1e-9 * max(brute, 1e-9)
        assert req.prefill_ms == pytest.approx(_booster(est, "prefill", cfg, np.array([n]))[0], rel=1e-12)


def test_batch_equals_single_requests(models: dict[str, Path]) -> None:
    est = LatencyEstimator.load(models["tokens"])
    rng = np.random.default_rng(2)
    configs = [{"tier": int(t), "top_k": int(k), "blocks": 32} for t, k in rng.choice([[1, 0], [2, 40]], 200)]
    n, new = rng.integers(16, 512, 200), rng.integers(1, 8, 200)
    batch = est.predict_requests(configs, n, new)
    single = [est.predict_request(c, int(a), int(b)) for c, a, b in zip(configs, n, new, strict=True)]
    np.testing.assert_allclose(batch.total_ms, [r.total_ms for r in single], rtol=1e-12)
    assert not batch.unseen.any()
    with pytest.raises(EstimatorError, match="tier=5 was never trained"):
        est.predict_requests({"tier": 5, "top_k": 0, "blocks": 32}, [64], [4])
    flagged = est.predict_requests([{"tier": 5, "top_k": 0, "blocks": 32}, configs[0]], [64, 64], [4, 4],
                                   allow_unseen=True)
    assert flagged.unseen.tolist() == [True, False] and "tier=5" in flagged.unseen_values


def test_floored_linear_sum() -> None:
    cases = [(2.0, 0.01, 1e-3, 500), (0.0, 0.001, 0.5, 2000), (5.0, -0.01, 1.0, 900), (0.3, 0.0, 1.0, 7)]
    for a, b, floor, end in cases:
        q = np.arange(1, end)
        brute = float(np.maximum(a + b * q, floor).sum())
        assert floored_linear_sum(a, b, end, floor) == pytest.approx(brute, rel=1e-12)
        many = floored_linear_sum_many(np.array([a]), np.array([b]), np.array([end]), floor)[0]
        assert many == pytest.approx(brute, rel=1e-12)
    assert floored_linear_sum(1.0, 1.0, 1) == 0.0


def test_tampered_tables_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    path = Path(shutil.copytree(models["tokens"], tmp_path / "m"))
    data = bytearray((path / "tables.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / "tables.npz").write_bytes(bytes(data))
    with pytest.raises(EstimatorError, match="content does not match meta.json") as info:
        LatencyEstimator.load(path)
    assert "\n" not in str(info.value) and "tables" in str(info.value)


def test_model_without_tables_compiles_them_on_load(models: dict[str, Path], tmp_path: Path) -> None:
    path = Path(shutil.copytree(models["poly"], tmp_path / "old"))
    (path / "tables.npz").unlink()
    meta = json.loads((path / "meta.json").read_text())
    meta.pop("tables")
    (path / "meta.json").write_text(json.dumps(meta))
    old, new = LatencyEstimator.load(path), LatencyEstimator.load(models["poly"])
    cfg = {"tier": 1, "top_k": 0, "blocks": 32}
    assert old.predict_request(cfg, 100, 8).total_ms == new.predict_request(cfg, 100, 8).total_ms


def test_untrained_config_takes_the_booster_and_warns_once(models: dict[str, Path]) -> None:
    est = LatencyEstimator.load(models["tokens"])
    cfg = {"tier": 3, "top_k": 0, "blocks": 32}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = est.predict_request(cfg, 100, 8, allow_unseen=True)
        est.predict_request(cfg, 120, 8, allow_unseen=True)
        est.predict_prefill({**cfg, "text_tokens": 64}, allow_unseen=True)
    booster = [w for w in caught if "not in the compiled tables" in str(w.message)]
    assert len(booster) == 1
    assert first.unseen == ("tier=3",)
    assert first.prefill_ms == pytest.approx(_booster(est, "prefill", cfg, np.array([100]))[0], rel=1e-12)
