"""Feature builders: bucket edges, polynomial terms, names per variant, encoding and missing inputs."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.errors import EstimatorError
from estimator.model.features import (
    FeatureSpec,
    as_columns,
    config_key,
    embedding_names,
    feature_axes,
    log_bucket,
    short_bucket,
)


def test_short_bucket_edges() -> None:
    tokens = [0, 1, 30, 31, 50, 51, 70, 71, 100, 101, 5000]
    assert short_bucket(tokens).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_log_bucket_edges() -> None:
    tokens = [1, 127, 128, 255, 256, 511, 512, 1023, 1024, 2048, 4095, 4096, 100_000]
    assert log_bucket(tokens).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 10]


def _cols(**kw: object) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in kw.items()}


def test_names_per_variant_and_phase() -> None:
    axes = ("tier", "top_k", "blocks")
    assert FeatureSpec("prefill", "tokens", axes).names() == [*axes, "text_tokens"]
    assert FeatureSpec("decode", "tokens", axes).names() == [*axes, "text_tokens", "position"]
    assert FeatureSpec("decode", "residual", axes).names() == [*axes, "text_tokens", "position"]
    assert FeatureSpec("prefill", "buckets", axes).names()[-2:] == ["bucket_short", "bucket_log"]
    assert FeatureSpec("prefill", "poly", axes).names()[-2:] == ["text_tokens_sqrt", "text_tokens_sq"]
    assert FeatureSpec("decode", "poly", axes).names()[-2:] == ["position_sqrt", "position_sq"]
    emb = FeatureSpec("prefill", "embedding", axes).names()
    assert len(emb) == 4 + 32 and emb[4:] == embedding_names(32)


def test_poly_and_bucket_values() -> None:
    cols = _cols(tier=[1, 2], top_k=[0, 40], blocks=[32, 32], text_tokens=[16, 100], position=[20, 130])
    x = FeatureSpec("decode", "poly", ("tier", "top_k", "blocks")).matrix(cols, 2)
    np.testing.assert_allclose(
        x[:, 5:], [[4.0, 256.0, np.sqrt(20), 400.0], [10.0, 10_000.0, np.sqrt(130), 16_900.0]]
    )
    xb = FeatureSpec("prefill", "buckets", ("tier", "top_k", "blocks")).matrix(cols, 2)
    assert xb[:, -2:].tolist() == [[0.0, 0.0], [3.0, 0.0]]


def test_embedding_columns_and_shape_check() -> None:
    cols = _cols(tier=[1], text_tokens=[8])
    spec = FeatureSpec("prefill", "embedding", ("tier",), embedding_dim=3)
    x = spec.matrix(cols, 1, np.array([[0.1, 0.2, 0.3]]))
    assert x.tolist() == [[1.0, 8.0, 0.1, 0.2, 0.3]]
    with pytest.raises(EstimatorError, match="embeddings"):
        spec.matrix(cols, 1, np.zeros((1, 4)))


def test_missing_feature_and_unknown_category() -> None:
    spec = FeatureSpec("decode", "tokens", ("tier", "dtype"), {"dtype": ("bf16", "fp32")})
    with pytest.raises(EstimatorError, match="missing feature 'position'"):
        spec.matrix(_cols(tier=[1], dtype=["bf16"], text_tokens=[4]), 1)
    x = spec.matrix(_cols(tier=[1], dtype=["fp32"], text_tokens=[4], position=[5]), 1)
    assert x.tolist() == [[1.0, 1.0, 4.0, 5.0]]
    with pytest.raises(EstimatorError, match="unknown value 'int8'"):
        spec.matrix(_cols(tier=[1], dtype=["int8"], text_tokens=[4], position=[5]), 1)


def test_as_columns_broadcasts_scalars() -> None:
    cols, n = as_columns({"tier": 1, "text_tokens": [1, 2, 3]})
    assert n == 3 and cols["tier"].tolist() == [1, 1, 1]
    with pytest.raises(EstimatorError, match="different lengths"):
        as_columns({"a": [1, 2], "b": [1, 2, 3]})


def test_feature_axes_and_config_key() -> None:
    assert feature_axes(["tier", "model", "top_k"]) == ["tier", "top_k"]
    assert feature_axes(["model", "top_k"]) == ["model", "top_k"]
    assert config_key({"tier": np.int64(1), "top_k": 2.0}, ["tier", "top_k"]) == ("1", "2")


def test_blocks_variant_exposes_the_kv_cache_block_structure() -> None:
    dec = FeatureSpec("decode", "blocks", ("tier", "blocks"))
    assert dec.names()[-2:] == ["block_index", "block_offset"]
    cols = {"tier": np.array([1, 1, 1]), "blocks": np.array([32, 32, 128]), "text_tokens": np.array([30, 30, 30]),
            "position": np.array([31, 64, 130])}
    x = dec.matrix(cols, 3)
    assert x[:, -2].tolist() == [0, 2, 1] and x[:, -1].tolist() == [31, 0, 2]
    pre = FeatureSpec("prefill", "blocks", ("tier", "blocks"))
    assert pre.matrix({k: v for k, v in cols.items() if k != "position"}, 3)[:, -1].tolist() == [1, 1, 1]
    with pytest.raises(EstimatorError, match="numeric `blocks` axis"):
        FeatureSpec("decode", "blocks", ("tier",)).matrix(cols, 3)
