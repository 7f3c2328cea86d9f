"""Load one or more harness run folders (results schema v1 or v2) into one samples table and one prompts table.

Schema 2 added the batch tables (`iterations/`, `requests/`, read by `estimator.data.iterations`); the samples
contract is the same in both."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from contract.manifest import READABLE_VERSIONS, SAMPLE_COLUMNS
from contract.manifest import SCHEMA_VERSION as SCHEMA_VERSION  # the newest results schema (the contract's)
from contract.manifest import read_jsonl_dicts as read_jsonl_dicts  # one reader for both halves
from estimator.errors import EstimatorError
from estimator.strict import StrictModel

SCHEMA_VERSIONS: tuple[int, ...] = READABLE_VERSIONS  # every version this estimator reads
DEFAULT_AXES: tuple[str, ...] = ("tier", "top_k", "blocks")
REQUIRED_SAMPLE_COLUMNS: tuple[str, ...] = SAMPLE_COLUMNS  # the contract's
Phase = Literal["prefill", "decode"]
PHASES: tuple[Phase, ...] = ("prefill", "decode")


class RunsSpec(StrictModel):
    """Base of every command spec that reads run folders: at least one, each an existing folder."""

    runs: list[Path] = Field(min_length=1)

    @field_validator("runs")
    @classmethod
    def _runs_exist(cls, runs: list[Path]) -> list[Path]:
        for r in runs:
            if not r.is_dir():
                raise ValueError(f"run folder {r} does not exist")
        return runs


def json_number(v: Any) -> Any:
    """JSON-safe scalar: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(v, float | np.floating):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


# Per-request or per-step columns that a spec may sweep but that are features, not config axes.
NOT_CONFIG_COLUMNS = frozenset(
    {"text_tokens", "position", "step_index", "max_new_tokens", "batch_size", "batch", "batch_join_tokens"}
)


@dataclass(frozen=True)
class RunInfo:
    """One run folder and its manifest."""

    run_id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def status(self) -> str:
        return str(self.manifest.get("status", "unknown"))


@dataclass
class RunSet:
    """Samples and prompts of one or more runs, concatenated.

    `axes` are the config axis columns (from each manifest's spec, union over runs);
    `config_columns` are the axes plus `model` when present: the key that names one config.
    """

    runs: list[RunInfo]
    samples: pd.DataFrame
    prompts: pd.DataFrame
    axes: list[str]
    config_columns: list[str] = field(default_factory=list)

    def phase(self, phase: str) -> pd.DataFrame:
        """Rows of one phase (`prefill` or `decode`), index reset."""
        return self.samples[self.samples["phase"] == phase].reset_index(drop=True)

    def with_text(self, frame: pd.DataFrame) -> pd.DataFrame:
        """`frame` with the prompt `text` column joined on `prompt_id`."""
        if "text" in frame.columns:
            return frame
        texts = self.prompts[["prompt_id", "text"]]
        out = frame.merge(texts, on="prompt_id", how="left", validate="many_to_one")
        missing = out["text"].isna()
        if missing.any():
            bad = out.loc[missing, "prompt_id"].iloc[0]
            raise EstimatorError(f"prompt {bad!r} has samples but no row in prompts/ (incomplete run?)")
        return out


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """Read and check `manifest.json` of one run folder (schema_version must be one of SCHEMA_VERSIONS)."""
    path = run_dir / "manifest.json"
    if not run_dir.is_dir():
        raise EstimatorError(f"{run_dir}: not a run folder (no such directory)")
    if not path.is_file():
        raise EstimatorError(f"{run_dir}: not a run folder (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EstimatorError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise EstimatorError(f"{path}: manifest is not a JSON object")
    version = manifest.get("schema_version")
    if version not in SCHEMA_VERSIONS:
        readable = ", ".join(map(str, SCHEMA_VERSIONS))
        raise EstimatorError(f"{path}: unsupported results schema_version {version!r} (this estimator reads "
                             f"{readable})")
    return manifest


def axes_from_manifest(manifest: dict[str, Any]) -> list[str]:
    """Config axis names from `manifest["spec"]["axes"]` (dict keys, or names in a list), else the defaults.

    The prompt-length axis (`text_tokens`, or any axis mapped to "prompt") is a feature of its own, not part
    of the config.
    """
    spec = manifest.get("spec")
    axes = spec.get("axes") if isinstance(spec, dict) else None
    mapping = spec.get("mapping") if isinstance(spec, dict) else None
    names: list[str] = []
    if isinstance(axes, dict):
        names = [str(k) for k in axes]
    elif isinstance(axes, list):
        for item in axes:
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, dict) and "name" in item:
                names.append(str(item["name"]))
    prompt_axes = (
        {str(k) for k, v in mapping.items() if v == "prompt"} if isinstance(mapping, dict) else set()
    )
    names = [n for n in names if n not in NOT_CONFIG_COLUMNS and n not in prompt_axes]
    return names or list(DEFAULT_AXES)


def load_folder(run_dir: Path, load: int | None = None) -> Path:
    """Where one load of a run keeps its `workload.jsonl` and `requests/`: `loads/<load>/` of a serve-bench run that
    served several loads on one server start (schema version 3), else the run folder itself (a replay, an older
    serve-bench run: one load, number 0). EstimatorError (one line) when the load is not there or not named."""
    run_dir = Path(run_dir)
    folder = run_dir / "loads"
    if not folder.is_dir():
        if load not in (None, 0):
            raise EstimatorError(f"{run_dir}: --load {load} given, but the run has one load (no loads/ folder)")
        return run_dir
    have = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "requests").is_dir())
    if load is None:
        if len(have) == 1:
            return folder / str(have[0])
        names = ", ".join(map(str, have)) or "none finished"
        raise EstimatorError(f"{run_dir}: the run has {len(have)} loads ({names}); give --load i")
    if load not in have:
        raise EstimatorError(f"{run_dir}: no finished load {load} (finished: {', '.join(map(str, have)) or 'none'})")
    return folder / str(load)


def run_loads(run_dir: Path) -> list[int]:
    """The finished loads of a run, in order ([0] for a run of one load)."""
    folder = Path(run_dir) / "loads"
    if not folder.is_dir():
        return [0]
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "requests").is_dir())


def served_requests(run_dir: Path) -> pd.DataFrame:
    """A replay's `requests` table without the requests its arrival policy rejected (they never ran)."""
    frame = read_parquet_folder(run_dir / "requests")
    if "rejected" in frame.columns:
        frame = frame[~frame["rejected"].astype(bool)].reset_index(drop=True)
    return frame


def read_parquet_folder(folder: Path) -> pd.DataFrame:
    """All finished `*.parquet` files of a folder (unfinished `*.tmp` writes are skipped)."""
    if not folder.is_dir():
        return pd.DataFrame()
    files = sorted(p for p in folder.iterdir() if p.suffix == ".parquet" and p.is_file())
    frames = []
    for f in files:
        try:
            frames.append(pd.read_parquet(f))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise EstimatorError(f"{f}: unreadable parquet file ({type(exc).__name__}: {exc})") from exc
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def load_run(run_dir: Path) -> tuple[RunInfo, pd.DataFrame, pd.DataFrame, list[str]]:
    """Read one run folder: (info, samples, prompts, axes)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    run_id = str(manifest.get("run_id") or run_dir.name)
    samples = read_parquet_folder(run_dir / "samples")
    if samples.empty:
        raise EstimatorError(f"{run_dir}: no samples (samples/*.parquet is empty or missing)")
    axes = axes_from_manifest(manifest)
    missing = [c for c in (*REQUIRED_SAMPLE_COLUMNS, *axes) if c not in samples.columns]
    if missing:
        raise EstimatorError(f"{run_dir}: samples lack column(s) {', '.join(missing)}")
    if "run_id" not in samples.columns:
        samples["run_id"] = run_id
    add_dtype(samples, manifest)
    prompts = read_parquet_folder(run_dir / "prompts")
    if prompts.empty or not {"prompt_id", "text"} <= set(prompts.columns):
        raise EstimatorError(f"{run_dir}: no prompts (prompts/*.parquet missing or lacks prompt_id/text)")
    return RunInfo(run_id=run_id, path=run_dir, manifest=manifest), samples, prompts, axes


def add_dtype(frame: pd.DataFrame, manifest: dict[str, Any]) -> None:
    """Give rows of a run written before samples carried `dtype` the dtype their engine start read back
    (`engine_starts[].effective.dtype`, by `engine_config_id`); rows with none stay without it."""
    if "dtype" in frame.columns or "engine_config_id" not in frame.columns:
        return
    by_config = {
        s.get("engine_config_id"): (s.get("effective") or {}).get("dtype")
        for s in manifest.get("engine_starts") or []
        if isinstance(s, dict)
    }
    if any(by_config.values()):
        frame["dtype"] = frame["engine_config_id"].map(by_config)


def config_columns_of(axes: Sequence[str], frame: pd.DataFrame) -> list[str]:
    """The columns that name one config: the axes, plus `model` and `dtype` where every row has them (the dtype an
    engine computes in is part of its config: a float32 model must not answer for bfloat16)."""
    out = list(axes)
    if "model" in frame.columns and "model" not in out:
        out.insert(1 if "tier" in out else 0, "model")
    if "dtype" in frame.columns and "dtype" not in out and frame["dtype"].notna().all():
        out.append("dtype")
    return out


def load_runs(paths: Sequence[Path | str]) -> RunSet:
    """Load and concatenate run folders; raise EstimatorError with one line on any problem."""
    if not paths:
        raise EstimatorError("no run folder given")
    infos: list[RunInfo] = []
    sample_frames: list[pd.DataFrame] = []
    prompt_frames: list[pd.DataFrame] = []
    axes: list[str] = []
    for p in paths:
        info, samples, prompts, run_axes = load_run(Path(p))
        if any(i.run_id == info.run_id for i in infos):
            raise EstimatorError(f"run {info.run_id} given twice")
        infos.append(info)
        sample_frames.append(samples)
        prompt_frames.append(prompts)
        axes.extend(a for a in run_axes if a not in axes)
    samples = pd.concat(sample_frames, ignore_index=True) if len(sample_frames) > 1 else sample_frames[0]
    prompts = pd.concat(prompt_frames, ignore_index=True) if len(prompt_frames) > 1 else prompt_frames[0]
    prompts = prompts.drop_duplicates(subset="prompt_id", keep="first").reset_index(drop=True)
    missing_axes = [a for a in axes if a not in samples.columns or samples[a].isna().any()]
    if missing_axes:
        raise EstimatorError(f"axis column(s) {', '.join(missing_axes)} missing in some run's samples")
    samples = _clean(samples)
    config_columns = config_columns_of(axes, samples)
    return RunSet(runs=infos, samples=samples, prompts=prompts, axes=axes, config_columns=config_columns)


def _clean(samples: pd.DataFrame) -> pd.DataFrame:
    """Normalise dtypes and drop rows no model can learn from (non-positive or missing latency)."""
    out = samples.copy()
    for col in ("text_tokens", "position", "step_index"):
        out[col] = pd.to_numeric(out[col]).astype("int64")
    out["latency_ms"] = pd.to_numeric(out["latency_ms"]).astype("float64")
    out["phase"] = out["phase"].astype(str)
    out["prompt_kind"] = out["prompt_kind"].astype(str)
    out["prompt_id"] = out["prompt_id"].astype(str)
    bad_phase = ~out["phase"].isin(PHASES)
    if bad_phase.any():
        raise EstimatorError(f"unknown phase value {out.loc[bad_phase, 'phase'].iloc[0]!r} in samples")
    keep = out["latency_ms"].notna() & (out["latency_ms"] > 0)
    if "client_lagged" in out:
        # the harness fell behind the engine core on these steps: their caller-side split is not the engine's
        keep &= ~out["client_lagged"].fillna(False).astype(bool)
    return out[keep].reset_index(drop=True)


def read_telemetry(run_dir: Path) -> pd.DataFrame:
    """All finished telemetry files of a run (t_s on the perf_counter clock), sorted by time."""
    folder = run_dir / "telemetry"
    out = read_parquet_folder(folder)
    if out.empty:
        return out
    if "t_s" not in out.columns:
        raise EstimatorError(f"{folder}: telemetry lacks the t_s column")
    return out.sort_values("t_s").reset_index(drop=True)
