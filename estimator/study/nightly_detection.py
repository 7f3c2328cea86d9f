"""The nightly's detection study (issue 35 item 4): how often an interleaved night flags an injected engine slowdown
of 5%, 10% and 20%, and how often it flags an unchanged night.

A study night is one interleaved night, run by the nightly's own `run_interleaved` (estimator/nightly/interleave.py):
`rounds` rounds, each a baseline sweep and a "tonight" sweep of the study spec in a random order, every sweep a fresh
`profile sweep --canary` (a fresh engine start). On an injected night tonight's sweeps run with
`LLM_LATENCY_INJECT_SLOWDOWN` (harness/engine/slowdown.py: every engine step waits that fraction of its own
duration); on an unchanged night both sides are the same settings.
The night is flagged when any config and phase is (`paired_verdicts`), raw and canary-normalized alike.

State, in the study folder (committed): `nights.jsonl`, one line per night with every sweep's per-request
latencies, its canary and the verdicts (the resume state: the next night is chosen from what it holds, and every
figure can be recomputed from it), `detection.json` (`summarize`) and `detection.png` (every night's ratio by
size), with each machine's figures apart under `by_machine`. The sweeps' run folders go to `runs_dir/runs`, their
output to `runs_dir/logs` (not committed; nights before 15 kept `runs_dir/night*` folders and logs side by side).
Which size runs next: the one furthest below its target count (20 unchanged nights, 10 per size), ties broken at
random, so a study cut short stays balanced.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from estimator.errors import EstimatorError
from estimator.nightly.interleave import SLOWDOWN_ENV, baseline_settings, run_interleaved
from estimator.nightly.spec import NightlySpec
from estimator.nightly.state import write_json_atomic

TARGETS = {0: 20, 5: 10, 10: 10, 20: 10}
NIGHTS_FILE = "nights.jsonl"
DETECTION_FILE = "detection.json"
FIGURE_FILE = "detection.png"


@dataclass
class DetectionSpec:
    out: Path = Path("docs/nightly-detection")
    runs_dir: Path = Path("results/nightly-detection")
    spec: Path = Path("scripts/nightly_study_spec.toml")
    nights: int = 1
    rounds: int = 2
    targets: dict[int, int] = field(default_factory=lambda: dict(TARGETS))
    tolerance: float = 0.05
    seed: int = 0
    sweep_timeout_s: float = 900.0
    profile: str | None = None  # the command that runs the harness CLI (default: the venv's `profile`)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> dict[str, float | None]:
    """k of n with its exact (Clopper–Pearson) interval."""
    from scipy.stats import beta

    if n == 0:
        return {"rate": None, "lo": None, "hi": None, "k": 0, "n": 0}
    a = (1 - confidence) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return {"rate": round(k / n, 4), "lo": round(lo, 4), "hi": round(hi, 4), "k": k, "n": n}


def read_nights(out: Path) -> list[dict[str, Any]]:
    """The study's nights (a line cut short by a kill is skipped)."""
    path = out / NIGHTS_FILE
    if not path.is_file():
        return []
    lines = []
    for raw in path.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return lines


def next_size(nights: Sequence[dict[str, Any]], targets: dict[int, int], rng: np.random.Generator) -> int | None:
    """The size furthest below its target (done / target smallest), ties at random; None when all are met."""
    done = {s: sum(1 for n in nights if n.get("size_pct") == s and not n.get("failed")) for s in targets}
    open_ = {s: done[s] / targets[s] for s in targets if done[s] < targets[s]}
    if not open_:
        return None
    low = min(open_.values())
    tied = sorted(s for s, f in open_.items() if f == low)
    return int(tied[int(rng.integers(len(tied)))])


def run_night(spec: DetectionSpec, index: int, size: int, say: Callable[[str], None]) -> dict[str, Any]:
    """One interleaved night (`run_interleaved`, the nightly's own), the study spec on both sides and the injected
    slowdown on tonight's; the line `nights.jsonl` keeps (`failed` with the reason when a sweep failed)."""
    run_id = f"night{index:03d}"
    nightly = NightlySpec.model_validate({
        "spec": spec.spec, "state_dir": spec.runs_dir, "profile": spec.profile, "interleave": spec.rounds,
        "tolerance": spec.tolerance, "seed": index, "sweep_timeout_s": spec.sweep_timeout_s})
    line: dict[str, Any] = {
        "night": index,
        "size_pct": size,
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    t0 = time.monotonic()
    night = run_interleaved(nightly, run_id, baseline_settings(nightly), lambda m: say(f"night {index} ({size}%): {m}"),
                            tonight_env={SLOWDOWN_ENV: f"{size / 100:g}"} if size else None,
                            log_dir=spec.runs_dir / "logs")
    line["order"] = night.order
    if night.failed:
        return {**line, "failed": f"sweep {', '.join(night.failed)} (logs in {spec.runs_dir / 'logs'})"}
    runs = night.tonight.run_dir.parent
    for s in night.sweeps:
        if abs(s.injected_slowdown - (size / 100 if s.side == "tonight" else 0.0)) > 1e-9:
            raise EstimatorError(f"{s.run_id}: the manifest records slowdown {s.injected_slowdown}, not {size}%")
    recorded: dict[str, Any] = json.loads((runs / night.sweeps[0].run_id / "manifest.json").read_text()).get(
        "environment") or {}
    return {
        **line,
        "machine": {"cpu_model": recorded.get("cpu_model"), "dtype": (recorded.get("cpu_dtype") or {}).get("dtype")},
        "seconds": round(time.monotonic() - t0, 1),
        "flagged": any(v.flagged for v in night.verdicts),
        "normalized_flagged": any(bool(v.normalized_flagged) for v in night.verdicts),
        "verdicts": [v.as_json() for v in night.verdicts],
        "sweeps": [s.as_json() for s in night.sweeps],
    }


def _rates(nights: Sequence[dict[str, Any]], key: str, sizes: Sequence[int]) -> dict[str, Any]:
    by = {s: [n for n in nights if n["size_pct"] == s] for s in sizes}
    return {
        "detection_rate": {str(s): clopper_pearson(sum(bool(n[key]) for n in by[s]), len(by[s])) for s in sizes if s},
        "false_alarm_rate": clopper_pearson(sum(bool(n[key]) for n in by.get(0, [])), len(by.get(0, []))),
    }


def _median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float)))


def canary_spread(nights: Sequence[dict[str, Any]], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Night-to-night spread of the baseline side (never slowed), per config and phase: the standard deviation over
    nights of the log of the night's median request latency, raw and divided by the night's canary, with the
    share of the raw spread the canary removes (bootstrap over nights, 95%)."""
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for night in nights:
        for s in night.get("sweeps", []):
            if s["side"] != "baseline":
                continue
            for label, phases in s["requests"].items():
                for phase, by_n in phases.items():
                    canary = (s.get("canary_ms") or {}).get(phase)
                    if not canary:
                        continue
                    med = math.exp(np.mean([math.log(_median(v)) for v in by_n.values()]))
                    rows.setdefault((label, phase), []).append((math.log(med), math.log(med / canary)))
    out = []
    rng = np.random.default_rng(seed)
    for (label, phase), pairs in sorted(rows.items()):
        a = np.asarray(pairs)
        if len(a) < 3:
            continue
        raw, norm = float(a[:, 0].std(ddof=1)), float(a[:, 1].std(ddof=1))
        boot = []
        for _ in range(n_boot):
            b = a[rng.integers(0, len(a), len(a))]
            r = b[:, 0].std(ddof=1)
            if r > 0:
                boot.append(1 - b[:, 1].std(ddof=1) / r)
        lo, hi = np.quantile(boot, [0.025, 0.975]) if boot else (float("nan"), float("nan"))
        out.append(
            {
                "label": label,
                "phase": phase,
                "sweeps": len(a),
                "raw_log_sd": round(raw, 4),
                "normalized_log_sd": round(norm, 4),
                "removed": round(1 - norm / raw, 3) if raw > 0 else None,
                "removed_ci": [round(float(lo), 3), round(float(hi), 3)],
            }
        )
    return {
        "per_config": out,
        "what": "sd over baseline-side sweeps of log(median request latency), raw and "
        "divided by the sweep's canary; removed = 1 - normalized / raw",
    }


def rounds_needed(
    nights: Sequence[dict[str, Any]],
    effect: float = 0.10,
    false_alarm: float = 0.05,
    detection: float = 0.90,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """How many interleaved rounds a night needs to catch `effect` with the rates asked for, from the unchanged
    nights' spread: per config and phase, s = the standard deviation of one round's log(tonight / baseline) (its
    true value is 0 on an unchanged night), and a night of K rounds has a mean log ratio with sd s / sqrt(K). A
    one-sided threshold at z(1 - a) s / sqrt(K), with a = `false_alarm` / m over the m configs and phases a night
    tests, reaches `detection` at log(1 + effect) when K >= ((z(1 - a) + z(detection)) s / log(1 + effect))^2.
    The normal model of the round ratios is an assumption; the interval is a bootstrap over nights (95%)."""
    from scipy.stats import norm

    rows: dict[tuple[str, str], list[list[float]]] = {}
    for night in nights:
        if night.get("size_pct") != 0 or night.get("failed"):
            continue
        for v in night["verdicts"]:
            rows.setdefault((v["label"], v["phase"]), []).append([math.log(r) for r in v["round_ratios"]])
    if not rows:
        return {}
    z = float(norm.ppf(1 - false_alarm / len(rows)) + norm.ppf(detection))
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for (label, phase), per_night in sorted(rows.items()):
        if len(per_night) < 3:
            continue

        def need(picked: Sequence[list[float]]) -> float:
            sd = float(np.std(np.concatenate(picked), ddof=1))
            return (z * sd / math.log(1 + effect)) ** 2

        boot = [need([per_night[i] for i in rng.integers(0, len(per_night), len(per_night))]) for _ in range(n_boot)]
        lo, hi = np.quantile(boot, [0.025, 0.975])
        sd = float(np.std(np.concatenate(per_night), ddof=1))
        out[f"{label} {phase}"] = {
            "round_log_sd": round(sd, 4),
            "rounds": math.ceil(need(per_night)),
            "rounds_ci": [math.ceil(float(lo)), math.ceil(float(hi))],
            "unchanged_nights": len(per_night),
        }
    return {
        "effect": effect,
        "false_alarm": false_alarm,
        "detection": detection,
        "tests_per_night": len(rows),
        "per_config": out,
    }


def summarize(nights: Sequence[dict[str, Any]], spec: DetectionSpec) -> dict[str, Any]:
    """detection.json: the issue's shape (raw verdicts), the canary-normalized twin, the canary's spread figures."""
    ok = [n for n in nights if not n.get("failed")]
    sizes = sorted(spec.targets)
    result = _figures(ok, sizes)
    result["failed_nights"] = len(nights) - len(ok)
    ratios: dict[str, dict[str, list[float]]] = {}
    for n in ok:
        for v in n["verdicts"]:
            ratios.setdefault(str(n["size_pct"]), {}).setdefault(f"{v['label']} {v['phase']}", []).append(v["ratio"])
    result["measured_ratio_median"] = {
        s: {k: round(_median(v), 4) for k, v in by.items()} for s, by in sorted(ratios.items(), key=lambda x: int(x[0]))
    }
    result["rule"] = (
        f"{spec.rounds} interleaved rounds per night (baseline and tonight in a random order, each a fresh engine "
        f"start); flag a config and phase when the geometric mean of the rounds' median ratios exceeds "
        f"{1 + spec.tolerance:.2f} and its two-level bootstrap 95% interval lies above 1; a night is flagged when "
        "any is"
    )
    result["targets"] = {str(s): t for s, t in spec.targets.items()}
    result["machines"] = sorted({json.dumps(n.get("machine"), sort_keys=True) for n in ok if n.get("machine")})
    result["machines"] = [json.loads(m) for m in result["machines"]]
    result["by_machine"] = by_machine(ok, sizes)
    return result


def machine_label(night: dict[str, Any]) -> str:
    """A night's machine as one label: its CPU model and the engine's dtype ("unrecorded" where the line has none)."""
    m = night.get("machine") or {}
    return f"{m.get('cpu_model') or 'unrecorded'}, {m.get('dtype') or 'unrecorded'}" if m else "unrecorded"


def by_machine(nights: Sequence[dict[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    """The rates, pair counts, rounds needed and canary spread of each machine's nights apart: a night is paired
    within itself, so pooling machines is sound for the rates, but each machine has its own start-to-start spread
    (and pooled, the canary would get credit for the machines' different levels)."""
    labels = sorted({machine_label(n) for n in nights})
    return {label: _figures([n for n in nights if machine_label(n) == label], sizes) for label in labels}


def _figures(nights: Sequence[dict[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    """The figures of a set of whole nights: the rates raw and canary-normalized, the pairs per size, the rounds a
    night would need and the canary's spread."""
    result: dict[str, Any] = _rates(nights, "flagged", sizes)
    result["pairs"] = {str(s): sum(1 for n in nights if n["size_pct"] == s) for s in sizes}
    result["normalized"] = _rates(nights, "normalized_flagged", sizes)
    result["rounds_needed"] = rounds_needed(nights)
    result["canary"] = canary_spread(nights)
    return result


def detection_figure(nights: Sequence[dict[str, Any]], tolerance: float) -> bytes:
    """detection.png: per phase, every night's ratio tonight / baseline with its 95% interval, by injected size
    (red: flagged; hollow: the canary-normalized ratio; one marker shape per machine), the flag threshold and the
    injected ratio."""
    from estimator.report.plots import new_figure, png_bytes, style_axes

    fig = new_figure(12, 4.4)
    sizes = sorted({int(n["size_pct"]) for n in nights} | {0, 5, 10, 20})
    machines = sorted({machine_label(n) for n in nights})
    markers = dict(zip(machines, "osD^v", strict=False))
    rng = np.random.default_rng(0)
    for ax, phase in zip(fig.subplots(1, 2), ("prefill", "decode"), strict=True):
        for n in nights:
            x0 = sizes.index(int(n["size_pct"]))
            for v in n.get("verdicts", []):
                if v["phase"] != phase:
                    continue
                x = x0 + float(rng.uniform(-0.25, 0.25))
                colour = "#d62728" if v["flagged"] else "#1f77b4"
                ax.errorbar(x, v["ratio"], yerr=[[v["ratio"] - v["ci"][0]], [v["ci"][1] - v["ratio"]]],
                            fmt=markers.get(machine_label(n), "o"), color=colour, markersize=4, elinewidth=0.8,
                            capsize=2)
                if v.get("normalized_ratio"):
                    ax.plot(x, v["normalized_ratio"], marker="o", markersize=5, markerfacecolor="none",
                            color="#7f7f7f", linestyle="none")
        for i, size in enumerate(sizes):
            ax.hlines(1 + size / 100, i - 0.35, i + 0.35, color="#2ca02c", linewidth=1.5)
        ax.axhline(1 + tolerance, color="#d62728", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(sizes)), [f"{s}%" if s else "unchanged" for s in sizes])
        ax.set_xlabel("injected slowdown on tonight's side")
        ax.set_ylabel("night's ratio tonight / baseline")
        ax.set_title(f"{phase.capitalize()}: one point per night (95% interval)", fontsize=11)
        if len(machines) > 1:
            for label in machines:
                ax.plot([], [], markers.get(label, "o"), color="#1f77b4", markersize=4, label=label)
            ax.legend(fontsize=7, loc="upper left")
        style_axes(ax)
    return png_bytes(fig)


def run_study(spec: DetectionSpec, say: Callable[[str], None]) -> dict[str, Any]:
    """Run up to `spec.nights` more nights (each appended as it ends), then rewrite detection.json."""
    if not spec.spec.is_file():
        raise EstimatorError(f"study spec {spec.spec} not found")
    spec.out.mkdir(parents=True, exist_ok=True)
    for _ in range(spec.nights):
        nights = read_nights(spec.out)
        index = len(nights)
        size = next_size(nights, spec.targets, np.random.default_rng(spec.seed * 7919 + index))
        if size is None:
            say("every size has its target count of nights")
            break
        line = run_night(spec, index, size, say)
        with (spec.out / NIGHTS_FILE).open("a") as f:
            f.write(json.dumps(line) + "\n")
        if line.get("failed"):
            say(f"night {index} failed: {line['failed']}")
        else:
            say(
                f"night {index} ({size}%): "
                + "; ".join(
                    f"{v['label']} {v['phase']} x{v['ratio']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
                    + (" FLAGGED" if v["flagged"] else "")
                    for v in line["verdicts"]
                )
                + f" ({line['seconds']:.0f} s)"
            )
        write_json_atomic(spec.out / DETECTION_FILE, summarize(read_nights(spec.out), spec))
    nights = read_nights(spec.out)
    result = summarize(nights, spec)
    write_json_atomic(spec.out / DETECTION_FILE, result)
    if any(not n.get("failed") for n in nights):
        (spec.out / FIGURE_FILE).write_bytes(detection_figure([n for n in nights if not n.get("failed")],
                                                              spec.tolerance))
    return result
