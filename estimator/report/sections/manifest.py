"""Run manifest: what ran, where, with which versions and settings."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping
from typing import Any

from estimator.data.runs import PHASES, RunInfo, RunSet
from estimator.report.document import (
    SECTIONS,
    Section,
    Table,
)
from estimator.report.plots import (
    fmt,
)

# ---------------------------------------------------------------- manifest


def _duration_s(manifest: Mapping[str, Any]) -> float | None:
    try:
        a = dt.datetime.fromisoformat(str(manifest["started_at"]))
        b = dt.datetime.fromisoformat(str(manifest["ended_at"]))
    except (KeyError, ValueError, TypeError):
        return None
    return (b - a).total_seconds()


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _when(stamp: Any) -> str:
    """ISO-8601 → 'YYYY-mm-dd HH:MM:SS' (UTC); anything else as given."""
    try:
        t = dt.datetime.fromisoformat(str(stamp))
    except (TypeError, ValueError):
        return "?" if stamp is None else str(stamp)
    if t.tzinfo is not None:
        t = t.astimezone(dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S")


def manifest_rows(run: RunInfo) -> list[tuple[str, str]]:
    """(field, value) pairs summarising one run's manifest."""
    m = run.manifest
    env, spec, tel = _dict(m.get("environment")), _dict(m.get("spec")), _dict(m.get("telemetry"))
    rows: list[tuple[str, str]] = []
    counts = f"{m.get('points_done', '?')}/{m.get('points_total', '?')} points done, {m.get('points_failed', 0)} failed"
    rows.append(("status", f"{m.get('status', 'unknown')} ({counts})"))
    dur = _duration_s(m)
    when = f"{_when(m.get('started_at'))} → {_when(m.get('ended_at'))}"
    rows.append(("time (UTC)", when + (f" ({dur / 60:.1f} min)" if dur is not None else "")))
    device = env.get("device")
    if isinstance(device, dict):
        device = device.get("name") or json.dumps(device)
    cores = env.get("cpu_cores")
    rows.append(("device", f"{device}" + (f" ({cores} CPU cores)" if cores else "")))
    rows.append(
        (
            "versions",
            f"vLLM {env.get('vllm', '?')} ({env.get('vllm_build', '?')} build), torch {env.get('torch', '?')}, "
            f"Python {env.get('python', '?')}, tool {m.get('tool_version', '?')}",
        )
    )
    commit = m.get("git_commit")
    if commit:
        rows.append(("git", f"{str(commit)[:10]}{' (dirty)' if m.get('git_dirty') else ''}"))
    mode = m.get("engine_mode") or spec.get("engine_mode")
    rows.append(("engine mode", str(mode)))
    if tel:
        locked = tel.get("clocks_locked_mhz")
        rows.append(
            (
                "telemetry",
                f"{tel.get('source', '?')} every {fmt(tel.get('interval_ms'), 0)} ms"
                + (f", clocks locked at {locked} MHz" if locked else "")
                + (f" ({tel.get('reason')})" if tel.get("reason") else ""),
            )
        )
    axes = spec.get("axes")
    mapping = _dict(spec.get("mapping"))
    if isinstance(axes, dict):
        parts = [
            f"{k} = {', '.join(str(v) for v in vals)}" + (f" → {mapping[k]}" if k in mapping else "")
            for k, vals in axes.items()
        ]
        rows.append(("spec axes", "; ".join(parts)))
    rows.append(
        (
            "spec sizes",
            f"reps {spec.get('reps', '?')} distinct prompts + {spec.get('same_prompt_repeats', '?')} repeats of one "
            f"prompt per point, max_new_tokens {spec.get('max_new_tokens', '?')}, "
            f"warm-up {spec.get('warmup_requests', '?')} requests, seed {spec.get('seed', '?')}",
        )
    )
    models = m.get("models")
    if isinstance(models, dict) and models:
        parts = []
        for v in models.values():
            if isinstance(v, dict):
                params = v.get("params")
                size = f" ({params / 1e6:.1f} M params)" if isinstance(params, int | float) else ""
                parts.append(f"tier {v.get('tier', '?')}: {v.get('name', '?')}{size}")
        rows.append(("models", "; ".join(parts)))
    starts = m.get("engine_starts")
    if isinstance(starts, list) and starts:
        secs = [float(s.get("seconds", float("nan"))) for s in starts if isinstance(s, dict)]
        ok = [s for s in secs if math.isfinite(s)]
        count = f"{len(starts)} start{'' if len(starts) == 1 else 's'}"
        if ok and len(ok) > 1:
            count += f", {sum(ok):.0f} s in all ({min(ok):.0f}–{max(ok):.0f} s each)"
        elif ok:
            count += f", {ok[0]:.0f} s"
        rows.append(("engine starts", count))
    summary = _dict(m.get("summary"))
    ratios = [
        f"{p} {summary[f'{p}_harness_over_engine_ratio']:.3f}×"
        for p in PHASES
        if isinstance(summary.get(f"{p}_harness_over_engine_ratio"), int | float)
    ]
    if ratios:
        rows.append(("harness / engine step time", ", ".join(ratios)))
    command = m.get("command")
    if isinstance(command, list):
        rows.append(("command", " ".join(str(c) for c in command)))
    return rows


def manifest_section(runset: RunSet) -> Section:
    sec = Section("manifest", SECTIONS["manifest"])
    per_run = [dict(manifest_rows(r)) for r in runset.runs]
    keys: list[str] = []
    for rows in per_run:
        keys.extend(k for k in rows if k not in keys)
    sec.add(
        Table(
            columns=["", *[r.run_id for r in runset.runs]],
            rows=[[k, *[rows.get(k, "–") for rows in per_run]] for k in keys],
        )
    )
    return sec
