"""The batch tables of results schema 2: one row per engine iteration (`iterations/`) and per request
(`requests/`), from `profile replay` and sweeps with a `batch` axis (docs/results-schema.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from contract.manifest import COMPOSITION_COLUMNS as COMPOSITION_COLUMNS
from contract.manifest import ITERATION_COLUMNS
from estimator.data.runs import (
    RunInfo,
    add_dtype,
    axes_from_manifest,
    read_manifest,
    read_parquet_folder,
    served_requests,
)
from estimator.errors import EstimatorError

REQUIRED_ITERATION_COLUMNS: tuple[str, ...] = ITERATION_COLUMNS  # the contract's
OPTIONAL_COMPOSITION = {"prefill_ctx_sum": 0, "decode_ctx_min": None}


@dataclass
class IterationSet:
    """Iterations and requests of one or more runs; `config_columns` name one engine config (tier, model, ...)."""

    runs: list[RunInfo]
    iterations: pd.DataFrame
    requests: pd.DataFrame
    config_columns: list[str]


def load_iteration_runs(paths: Sequence[Path | str]) -> IterationSet:
    """Read the batch tables of run folders; a run without iterations is an EstimatorError naming it."""
    if not paths:
        raise EstimatorError("no run folder given")
    infos: list[RunInfo] = []
    its: list[pd.DataFrame] = []
    reqs: list[pd.DataFrame] = []
    axes: list[str] = []
    for p in paths:
        run_dir = Path(p)
        manifest = read_manifest(run_dir)
        run_id = str(manifest.get("run_id") or run_dir.name)
        if any(i.run_id == run_id for i in infos):
            raise EstimatorError(f"run {run_id} given twice")
        it = read_parquet_folder(run_dir / "iterations")
        if it.empty:
            raise EstimatorError(f"{run_dir}: no iterations (iterations/*.parquet missing: not a batch run?)")
        missing = [c for c in REQUIRED_ITERATION_COLUMNS if c not in it.columns]
        if missing:
            raise EstimatorError(f"{run_dir}: iterations lack column(s) {', '.join(missing)}")
        rq = served_requests(run_dir)
        for frame in (it, rq):
            if len(frame):
                frame["run_id"] = run_id
                add_dtype(frame, manifest)
        infos.append(RunInfo(run_id=run_id, path=run_dir, manifest=manifest))
        its.append(it)
        reqs.append(rq)
        axes.extend(a for a in axes_from_manifest(manifest) if a not in axes and a in it.columns)
    iterations = _clean(pd.concat(its, ignore_index=True))
    requests = (
        pd.concat([r for r in reqs if len(r)], ignore_index=True) if any(len(r) for r in reqs) else pd.DataFrame()
    )
    config = [a for a in ("tier", "model", *axes) if a in iterations.columns]
    if "dtype" in iterations.columns and iterations["dtype"].notna().all():
        config.append("dtype")  # part of the config, as for samples (estimator.data.runs.config_columns_of)
    return IterationSet(infos, iterations, requests, list(dict.fromkeys(config)))


def _clean(it: pd.DataFrame) -> pd.DataFrame:
    out = it.copy()
    for col, default in OPTIONAL_COMPOSITION.items():
        if col not in out.columns:
            out[col] = default
    out["decode_ctx_min"] = out["decode_ctx_min"].fillna(out["decode_ctx_max"])
    for col in (*COMPOSITION_COLUMNS, "prefill_ctx_sum", "decode_ctx_min"):
        out[col] = pd.to_numeric(out[col]).fillna(0).astype("int64")
    out["latency_ms"] = pd.to_numeric(out["latency_ms"]).astype("float64")
    out["segment_id"] = out["segment_id"].astype(str)
    keep = (
        out["latency_ms"].notna()
        & (out["latency_ms"] > 0)
        & ((out["prefill_tokens"] > 0) | (out["num_decode_seqs"] > 0))
    )
    for flag in ("composition_mismatch", "client_lagged"):  # the engine's counts disagreed / the caller lagged
        if flag in out.columns:
            keep &= ~out[flag].fillna(False).astype(bool)
    return out[keep].reset_index(drop=True)


def prefill_square_sums(iterations: pd.DataFrame, requests: pd.DataFrame) -> np.ndarray:
    """Σ over the sequences prefilling in each iteration of (their prompt tokens)²: attention's quadratic term.

    From the request table (a request prefills in its `first_iteration`); where it is missing, the iteration's
    prefill tokens spread evenly over its prefilling sequences."""
    n_pre = iterations["num_prefill_seqs"].to_numpy(dtype=np.float64)
    tokens = iterations["prefill_tokens"].to_numpy(dtype=np.float64)
    even = np.where(n_pre > 0, tokens**2 / np.maximum(n_pre, 1), 0.0)
    if requests.empty or not {"first_iteration", "text_tokens", "segment_id"} <= set(requests.columns):
        return even
    keys = ["run_id", "segment_id"] if "run_id" in requests.columns else ["segment_id"]
    sq = (
        requests.assign(_sq=requests["text_tokens"].astype(np.float64) ** 2, iteration=requests["first_iteration"])
        .groupby([*keys, "iteration"])["_sq"]
        .sum()
    )
    idx = pd.MultiIndex.from_frame(iterations[[*keys, "iteration"]].astype({"segment_id": str}))
    sq.index = sq.index.set_levels(
        [
            lvl.astype(str) if name == "segment_id" else lvl
            for lvl, name in zip(sq.index.levels, sq.index.names, strict=True)
        ]
    )
    found = sq.reindex(idx).to_numpy()
    chunked = (
        iterations["prefill_chunk_inferred"].fillna(False).astype(bool).to_numpy()
        if ("prefill_chunk_inferred" in iterations.columns)
        else np.zeros(len(iterations), dtype=bool)
    )
    # a request's first_iteration is its first chunk when the prefill was split: the even split is then better
    return np.where(np.isfinite(found) & (n_pre > 0) & ~chunked, found, even)


def with_derived(itset: IterationSet) -> pd.DataFrame:
    """Iterations plus the derived composition columns: `prefill_sq_sum` (Σ prefill len²), `ctx_skew` (max − mean
    decode context) and `decode_skew_sum` (decodes × that skew, LLMServingSim's mixed-length term), `_group`
    (run/segment: the unit held out together)."""
    it = itset.iterations
    n = it["num_decode_seqs"].to_numpy(dtype=np.float64)
    ctx_sum = it["decode_ctx_sum"].to_numpy(dtype=np.float64)
    skew = np.where(n > 0, it["decode_ctx_max"].to_numpy(dtype=np.float64) - ctx_sum / np.maximum(n, 1), 0.0)
    return it.assign(
        prefill_sq_sum=prefill_square_sums(it, itset.requests),
        ctx_skew=skew,
        decode_skew_sum=n * skew,
        _group=(it["run_id"].astype(str) + "/" + it["segment_id"].astype(str)).to_numpy(),
    )
