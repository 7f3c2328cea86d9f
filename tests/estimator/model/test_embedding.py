"""Prompt embeddings: chunked mean, PCA 384 → 32, determinism, JSON round trip; one test on the real model."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.errors import EstimatorError
from estimator.model.embedding import EMBED_DIM, EmbeddingCache, Projection, chunk_text, embed_texts
from tests.estimator.fakes import fake_encoder


def test_chunk_text() -> None:
    assert chunk_text("a b c d e", words=2) == ["a b", "c d", "e"]
    assert chunk_text("") == [""]
    many = " ".join(str(i) for i in range(10))
    assert chunk_text(many, words=2, max_chunks=3) == ["0 1", "4 5", "8 9"]


def test_embed_texts_is_mean_of_chunks() -> None:
    text = " ".join(f"w{i}" for i in range(5))
    got = embed_texts([text, "x"], fake_encoder)
    chunks = chunk_text(text)
    assert got.shape == (2, EMBED_DIM)
    np.testing.assert_allclose(got[0], fake_encoder(chunks).mean(axis=0))
    long_text = " ".join(f"w{i}" for i in range(400))
    np.testing.assert_allclose(
        embed_texts([long_text], fake_encoder)[0], fake_encoder(chunk_text(long_text)).mean(axis=0)
    )


def test_projection_shape_and_determinism() -> None:
    vecs = fake_encoder([f"prompt {i}" for i in range(50)])
    a, b = Projection.fit(vecs, 32), Projection.fit(vecs.copy(), 32)
    z = a.transform(vecs[:7])
    assert z.shape == (7, 32)
    np.testing.assert_array_equal(z, b.transform(vecs[:7]))
    # centred training data projects to zero mean; components are orthonormal
    np.testing.assert_allclose(a.transform(vecs).mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(a.components @ a.components.T, np.eye(32), atol=1e-9)


def test_projection_pads_when_few_prompts_and_round_trips() -> None:
    vecs = fake_encoder([f"p{i}" for i in range(5)])
    proj = Projection.fit(vecs, 32)
    assert proj.transform(vecs).shape == (5, 32)
    assert np.all(proj.components[5:] == 0)
    again = Projection.from_dict(proj.to_dict())
    np.testing.assert_array_equal(again.transform(vecs), proj.transform(vecs))
    with pytest.raises(EstimatorError, match="at least 2"):
        Projection.fit(vecs[:1], 32)


def test_cache_embeds_each_prompt_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def counting(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return fake_encoder(texts)

    cache = EmbeddingCache(tmp_path / "cache.parquet", counting)
    first = cache.get(["a", "b", "a"], ["one", "two", "one"])
    assert first.shape == (3, EMBED_DIM) and calls == [2]
    np.testing.assert_array_equal(first[0], first[2])
    reloaded = EmbeddingCache(tmp_path / "cache.parquet", counting)
    np.testing.assert_array_equal(reloaded.get(["b"], ["two"])[0], first[1])
    assert calls == [2]


def test_real_model_shape_and_determinism() -> None:
    """The bundled all-MiniLM-L6-v2, loaded offline: 384-d, deterministic, 32-d after the projection."""
    texts = [
        "The scheduler batches requests.",
        "def f(x):\n    return x + 1",
        "The scheduler batches requests.",
    ]
    a = embed_texts(texts)
    b = embed_texts(texts)
    assert a.shape == (3, EMBED_DIM)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[0], a[2])
    assert not np.allclose(a[0], a[1])
    proj = Projection.fit(np.vstack([a, fake_encoder([f"x{i}" for i in range(40)]) / 20]), 32)
    assert proj.transform(a).shape == (3, 32)
