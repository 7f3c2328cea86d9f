"""Test doubles for the estimator tests."""

from __future__ import annotations

import hashlib

import numpy as np

from estimator.model.embedding import EMBED_DIM


def fake_encoder(texts: list[str]) -> np.ndarray:
    """Deterministic 384-d vectors from a hash of each text (stands in for the sentence model)."""
    out = []
    for t in texts:
        seed = int.from_bytes(hashlib.sha1(t.encode()).digest()[:4], "little")
        out.append(np.random.default_rng(seed).standard_normal(EMBED_DIM))
    return np.asarray(out)
