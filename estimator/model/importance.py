"""What a saved model's trees split on: LightGBM gain importance per phase, read from its text model files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from estimator.errors import EstimatorError


def feature_importance(model_dir: Path) -> dict[str, pd.Series]:
    """Gain importance per phase (share of the total, %) from the LightGBM text models in a model folder."""
    import lightgbm as lgb

    meta_path = model_dir / "meta.json"
    files: dict[str, Path] = {}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        for phase, pm in (meta.get("phases") or {}).items():
            files[str(phase)] = model_dir / str(pm.get("model_file", f"{phase}.txt"))
    else:
        files = {p.stem: p for p in sorted(model_dir.glob("*.txt"))}
    out: dict[str, pd.Series] = {}
    for phase, path in files.items():
        if not path.is_file():
            raise EstimatorError(f"{model_dir}: missing LightGBM model file {path.name}")
        booster = lgb.Booster(model_file=str(path))
        gain = pd.Series(booster.feature_importance("gain"), index=booster.feature_name(), dtype="float64")
        emb = gain[gain.index.str.startswith("emb_")]
        if len(emb):
            gain = gain.drop(emb.index)
            gain[f"embedding ({len(emb)} dims, summed)"] = emb.sum()
        total = gain.sum()
        out[phase] = (gain / total * 100.0 if total > 0 else gain).sort_values(ascending=True)
    return out
