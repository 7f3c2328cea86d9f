"""The nightly state folder: the accepted baseline record, the history lines, atomic JSON writes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from estimator.errors import EstimatorError
from estimator.nightly.spec import BASELINE_FILE, HISTORY_FILE

# ---------------------------------------------------------------- state: baseline, history


@dataclass
class Baseline:
    run_id: str
    run_path: str
    model_path: str | None
    held_out_mape_pct: dict[str, float | None]
    accepted_at: str
    note: str = ""
    # the accepted settings an interleaved night measures again: {"spec_name", "spec_text", "profile_args"}
    # (None when the baseline was accepted from a finished run, or before the nightly recorded them)
    settings: dict[str, Any] | None = None


def read_baseline(state_dir: Path) -> Baseline | None:
    path = state_dir / BASELINE_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return Baseline(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise EstimatorError(f"{path}: unreadable baseline record ({exc})") from exc


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def append_history(state_dir: Path, line: Mapping[str, Any]) -> Path:
    path = state_dir / HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")
    return path
