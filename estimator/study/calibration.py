"""The calibration study (issue 32): calibrate on one load of a server start, predict the loads it never saw on the
same start, against the server's agreement with itself.

Per server start (a `profile serve-bench` run of several loads, named by their workload files):
- `cal` is the calibration load (estimate calibrate), `rate-*` Poisson loads at other rates, `bursty` a bursty
  trace, `mix` a length mix, and one load served twice (the same file again, with loads in between) gives **the
  server's own floor**: each statistic's repeat-to-repeat error.
- Every other load is predicted twice: with the one-time calibration, and **followed**: the level re-fitted on the
  last 30 s of the load before it (what a live follower knows when the load starts; the front end's costs kept).
  **Live**: the followed level at the load's start, then re-fitted every 10 s on the requests of the last 30 s
  that had finished by then (what a follower of the live stream knows at each moment). A fourth prediction, the
  **oracle**, takes the level the load itself needed (its own mean TPOT, known only after
  it ran): what is left of its error is not the level's drift but the model's shape and the server's noise.
- Each prediction error (E2E mean/p90/p99, TTFT mean/p90, per-request E2E MAPE), with its 95% bootstrap interval
  over requests, beside the floor and as a ratio to it; goodput at an SLO over the Poisson loads.
- **Mechanisms** against the server's own histograms over each load (`server_metrics.json`): the server's TTFT
  (`vllm:time_to_first_token_seconds`) and queue time (`vllm:request_queue_time_seconds`) against the replica's
  `server_ttft_ms` and `server_queue_ms` (its p90 is not compared: the histogram's first bucket is 300 ms wide), the
  late join (the wait for the iteration in flight, which the server's queue time leaves out), and the client's
  TTFT minus the server's (the front end's share) against the replica's client TTFT minus its `server_ttft_ms`
  (its front-end queue and the constant; the queue alone is reported as `frontend_queue_mean_ms`).
- **Drift**: per 10 s window of arrivals, the signed error of the mean E2E with its interval, flagged where the
  interval leaves the calibration window's own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract.slo import goodput
from estimator.data.runs import run_loads
from estimator.errors import EstimatorError
from estimator.model.iteration import IterationEstimator
from estimator.sim.calibrate import calibrate, follow_level, live_levels, predict, solve_level, step_function
from estimator.sim.measured import MeasuredRun, compare, load_measured, paired
from estimator.sim.workload import slo_attainment

TARGETS = {"e2e_mean": 5.0, "e2e_p90": 5.0, "e2e_p99": 5.0, "ttft_mean": 10.0, "ttft_p90": 10.0, "e2e_mape": 10.0,
           "goodput": 10.0, "highest_rate": 10.0}
FLOOR_RATIO = 1.2  # where the floor is wider than the target: error / floor <= 1.2
WINDOW_S = 10.0


def _kind(run: MeasuredRun) -> str:
    """The load's role, from its workload file's stem (cal, rate-*, bursty, mix), or `rate-R` for a load that
    serve-bench generated at rate R (`--rates`)."""
    src = (run.manifest.get("loads") or [{}] * (run.load + 1))[run.load].get("source") or {}
    stem = Path(str(src.get("file") or "")).stem
    if not stem and src.get("rate_per_s") is not None:
        return f"rate-{float(src['rate_per_s']):g}"
    return stem or f"load-{run.load}"


def _errors(pairs: pd.DataFrame) -> dict[str, dict[str, float]]:
    c = compare(pairs)
    out = {f"e2e_{s}": c["e2e_ms"][s]["error_pct"] for s in ("mean", "p90", "p99")}
    out.update({f"ttft_{s}": c["ttft_ms"][s]["error_pct"] for s in ("mean", "p90")})
    out["tpot_mean"] = c["tpot_ms"]["mean"]["error_pct"]
    out["e2e_mape"] = c["e2e_ms"]["mape_pct"]
    return out


def _stat(v: np.ndarray, st: str) -> float:
    return float(v.mean()) if st == "mean" else float(np.percentile(v, float(st[1:])))


def floor_of(first: MeasuredRun, repeat: MeasuredRun) -> dict[str, float]:
    """The server's agreement with itself: each statistic of the repeat against the first serving (%, signed), and
    the per-request E2E MAPE between the two (the same requests)."""
    a = first.requests.set_index("request_id")
    b = repeat.requests.set_index("request_id").reindex(a.index)
    out: dict[str, float] = {}
    for metric, stats in (("e2e", ("mean", "p90", "p99")), ("ttft", ("mean", "p90")), ("tpot", ("mean",))):
        va, vb = a[f"{metric}_ms"].to_numpy(dtype=float), b[f"{metric}_ms"].to_numpy(dtype=float)
        ok = np.isfinite(va) & np.isfinite(vb)
        for st in stats:
            out[f"{metric}_{st}"] = (_stat(vb[ok], st) / _stat(va[ok], st) - 1) * 100
    ea, eb = a["e2e_ms"].to_numpy(dtype=float), b["e2e_ms"].to_numpy(dtype=float)
    ok = np.isfinite(ea) & np.isfinite(eb) & (ea > 0)
    out["e2e_mape"] = float(np.mean(np.abs(eb[ok] - ea[ok]) / ea[ok]) * 100)
    return out


def mechanisms(run: MeasuredRun, pred: pd.DataFrame) -> dict[str, Any]:
    """The replica's server-side parts against the server's histograms over the load (ms)."""
    figures = run.server_figures() or {}
    h = figures.get("histograms") or {}
    if not {"vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds"} <= set(h):
        return {}  # a run from before the histograms were kept
    ttft_h, queue_h = h["vllm:time_to_first_token_seconds"], h["vllm:request_queue_time_seconds"]
    client_ttft = run.requests["ttft_ms"].to_numpy(dtype=float)
    return {
        "client_ttft_mean_ms": {"measured": float(np.nanmean(client_ttft)), "predicted": float(pred["ttft_ms"].mean())},
        "client_ttft_p90_ms": {"measured": float(np.nanpercentile(client_ttft, 90)),
                               "predicted": float(pred["ttft_ms"].quantile(0.9))},
        "server_ttft_mean_ms": {"measured": ttft_h["mean_ms"], "predicted": float(pred["server_ttft_ms"].mean())},
        "server_ttft_p90_ms": {"measured": ttft_h["p90_ms"], "predicted": float(pred["server_ttft_ms"].quantile(0.9))},
        "queue_mean_ms": {"measured": queue_h["mean_ms"], "predicted": float(pred["server_queue_ms"].mean())},
        "late_join_mean_ms": {"measured": None, "predicted": float(pred["engine_queue_ms"].mean()
                                                                    - pred["server_queue_ms"].mean())},
        "frontend_mean_ms": {"measured": float(np.nanmean(client_ttft)) - (ttft_h["mean_ms"] or math.nan),
                             "predicted": float((pred["ttft_ms"] - pred["server_ttft_ms"]).mean())},
        "frontend_queue_mean_ms": {"measured": None, "predicted": float(pred["frontend_ms"].mean())},
        "histogram_requests": ttft_h["count"],
    }


def drift(pairs: pd.DataFrame, arrivals: pd.Series, band: tuple[float, float], window_s: float = WINDOW_S,
          n_boot: int = 400, seed: int = 0) -> list[dict[str, Any]]:
    """The signed error of the mean E2E per window of arrivals (%), with a 95% bootstrap interval; `flagged` where
    the interval lies outside `band` (the calibration window's own interval)."""
    rng = np.random.default_rng(seed)
    t = arrivals.reindex(pairs.index).to_numpy(dtype=float)
    pred, meas = pairs["e2e_ms"].to_numpy(dtype=float), pairs["e2e_ms_measured"].to_numpy(dtype=float)
    out = []
    for k in range(int(math.ceil((np.nanmax(t) + 1e-9) / window_s))):
        idx = np.where((t >= k * window_s) & (t < (k + 1) * window_s))[0]
        if len(idx) < 5:
            continue
        b = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        boots = (pred[idx][b].mean(axis=1) / meas[idx][b].mean(axis=1) - 1) * 100
        lo, hi = np.percentile(boots, [2.5, 97.5])
        err = (pred[idx].mean() / meas[idx].mean() - 1) * 100
        out.append({"t_s": k * window_s, "requests": int(len(idx)), "error_pct": float(err), "lo": float(lo),
                    "hi": float(hi), "flagged": bool(lo > band[1] or hi < band[0])})
    return out


def study_start(model: IterationEstimator, model_dir: Path, run_dir: Path, calibrate_on: str = "cal",
                follow_s: float = 30.0, slo: tuple[float, float] | None = None) -> dict[str, Any]:
    """One server start: calibrate on the load named `calibrate_on`, predict every other load (one-time and
    followed), the floor from the load served twice, the mechanisms, drift and goodput."""
    loads = [load_measured(run_dir, load=i) for i in run_loads(run_dir)]
    kinds = [_kind(m) for m in loads]
    if calibrate_on not in kinds:
        raise EstimatorError(f"{run_dir}: no load named {calibrate_on!r} (loads: {', '.join(kinds)})")
    c = kinds.index(calibrate_on)
    cal = calibrate(model, model_dir, loads[c])
    healthy = float((loads[c].manifest.get("server") or {}).get("healthy_mono_s") or 0.0)
    records = loads[c].manifest.get("loads") or []
    cal_pairs = paired(predict(model, cal, loads[c].workload), loads[c].requests)
    cal_err = _errors(cal_pairs)["e2e_mean"]
    band = (cal_err["lo"], cal_err["hi"])
    seen: dict[str, int] = {}
    rows = []
    for j, m in enumerate(loads):
        first = seen.setdefault(kinds[j], j)
        rec = records[j] if j < len(records) else {}
        start_min = (float(rec.get("start_mono_s") or healthy) - healthy) / 60 if healthy else math.nan
        row: dict[str, Any] = {"load": j, "kind": kinds[j], "repeat_of": first if first != j else None,
                               "requests": len(m.workload), "minutes_since_healthy": start_min,
                               "rate_rps": len(m.workload) / max(m.workload[-1].arrival_s, 1e-9)}
        one = predict(model, cal, m.workload)
        pairs = paired(one, m.requests)
        row["one_time"] = _errors(pairs)
        row["mechanisms"] = mechanisms(m, one)
        arrivals = pd.Series({r.request_id: r.arrival_s for r in m.workload})
        row["drift"] = drift(pairs, arrivals, band)
        if j > 0:
            level = follow_level(model, cal, loads[j - 1], follow_s)
            row["followed_level"] = level
            followed = predict(model, cal, m.workload, level)
            row["followed"] = _errors(paired(followed, m.requests))
            row["drift_followed"] = drift(paired(followed, m.requests), arrivals, band)
            steps = live_levels(model, cal, m, level)
            row["live_levels"] = [[t, lv] for t, lv in steps]
            live = predict(model, cal, m.workload, level_at=step_function(steps))
            row["live"] = _errors(paired(live, m.requests))
            row["drift_live"] = drift(paired(live, m.requests), arrivals, band)
        own = solve_level(model, cal, m.workload, float(m.requests["tpot_ms"].dropna().mean()))
        row["own_level"] = own  # the oracle: the level this load itself needed (known only after it ran)
        row["oracle"] = _errors(paired(predict(model, cal, m.workload, own), m.requests))
        if slo is not None:
            row["slo_measured"] = slo_attainment(m.requests, *slo)
            row["slo_predicted"] = slo_attainment(one, *slo)
        rows.append(row)
    for row in rows:  # the floor: the repeat against its first serving, given to every row of the start
        if row["repeat_of"] is not None:
            floor = floor_of(loads[row["repeat_of"]], loads[row["load"]])
            break
    else:
        floor = {}
    search = searched(model, cal, loads)
    out: dict[str, Any] = {"run": str(run_dir), "calibrated_on": c, "rate_search": search,
                           "calibration": cal.model_dump(mode="json"),
                           "band_e2e_mean_pct": list(band), "floor": floor, "rows": rows,
                           "holds_min": {w: holds_min(rows, c, key) for w, key in (("one_time", "drift"),
                                                                                  ("followed", "drift_followed"),
                                                                                  ("live", "drift_live"))}}
    if slo is not None:
        poisson = [r for r in rows if r["kind"] == calibrate_on or r["kind"].startswith("rate")]
        poisson = [r for r in poisson if r["repeat_of"] is None]
        rates = [r["rate_rps"] for r in poisson]
        gm = goodput(rates, [r["slo_measured"] for r in poisson])
        gp = goodput(rates, [r["slo_predicted"] for r in poisson])
        out["goodput"] = {"slo_ttft_ms": slo[0], "slo_tpot_ms": slo[1], "measured_rps": gm.rate_rps,
                          "measured_censored": gm.censored, "predicted_rps": gp.rate_rps,
                          "predicted_censored": gp.censored,
                          "error_pct": (gp.rate_rps / gm.rate_rps - 1) * 100 if gm.rate_rps > 0 else None}
    return out


def searched(model: IterationEstimator, cal: Any, loads: Sequence[MeasuredRun]) -> dict[str, Any] | None:
    """The server's rate search (serve-bench --search: the manifest's `rate_search`) against the same search run on
    the calibrated replica: the same rule (contract/slo.py `next_search_rate`), the same generator, seeds and SLO,
    each step's attainment predicted instead of served. None without a search."""
    from contract.slo import next_search_rate
    from contract.workload import LengthDist, generate_workload

    rs = loads[0].manifest.get("rate_search") if loads else None
    records = loads[0].manifest.get("loads") or [] if loads else []
    first = next((r for r in records if (r.get("source") or {}).get("rate_search")), None)
    if not rs or first is None:
        return None
    src = first["source"]
    texts = LengthDist.parse(src["text_tokens_dist"], "text_tokens_dist")
    news = LengthDist.parse(src["new_tokens_dist"], "new_tokens_dist")
    seed0 = int(src["seed"]) - int(first["index"])  # serve-bench seeds load i with --seed + i
    tried: list[tuple[float, bool]] = []
    steps = []
    while (rate := next_search_rate(rs["lo"], rs["hi"], rs["steps"], tried)) is not None:
        wl = generate_workload(rate, int(src["count"]), seed0 + int(first["index"]) + len(tried), texts, news,
                               int(src["context"]), float(src.get("burstiness", 1.0)))
        share = slo_attainment(predict(model, cal, wl), rs["slo_ttft_ms"], rs["slo_tpot_ms"])
        tried.append((rate, share >= rs["target"]))
        steps.append({"rate_rps": rate, "attainment": share, "met": share >= rs["target"]})
    met = [r for r, ok in tried if ok]
    predicted = max(met) if met else None
    measured = rs.get("highest_rate_meeting_slo")
    return {"slo_ttft_ms": rs["slo_ttft_ms"], "slo_tpot_ms": rs["slo_tpot_ms"], "measured_rps": measured,
            "predicted_rps": predicted, "measured_steps": rs["tried"], "predicted_steps": steps,
            "resolution_rps": (rs["hi"] - rs["lo"]) / 2 ** rs["steps"],
            "error_pct": (predicted / measured - 1) * 100 if measured and predicted else None}


def holds_min(rows: Sequence[dict[str, Any]], calibrated_on: int, key: str = "drift") -> dict[str, Any]:
    """How long the calibration held: minutes from the end of the calibration load to the first later 10 s window
    flagged by the drift check, and the share of later windows flagged (`first_flag_min` None: none was)."""
    cal = rows[calibrated_on]
    end = cal["minutes_since_healthy"] + (max((w["t_s"] for w in cal.get("drift", [])), default=0.0) + WINDOW_S) / 60
    later = [(r["minutes_since_healthy"] + w["t_s"] / 60, w["flagged"]) for r in rows if r["load"] > calibrated_on
             for w in r.get(key, [])]
    first = min((t for t, f in later if f), default=None)
    return {"first_flag_min": None if first is None else max(0.0, first - end),
            "flagged_share": float(np.mean([f for _, f in later])) if later else None, "windows": len(later)}


def verdict(start: dict[str, Any], which: str = "one_time") -> dict[str, Any]:
    """Per target measure, over the start's predicted loads (not the calibration load, not the repeat): the worst
    |error|, the floor, and met (|error| <= target, or <= 1.2 x the floor where the floor is wider)."""
    out: dict[str, Any] = {}
    rows = [r for r in start["rows"] if r["load"] != start["calibrated_on"] and r["repeat_of"] is None
            and which in r]
    for key, target in TARGETS.items():
        whole = {"highest_rate": "rate_search", "goodput": "goodput"}.get(key)  # one figure per start
        if whole is not None:
            got = start.get(whole) or {}
            if got.get("error_pct") is not None:
                err = abs(got["error_pct"])
                out[key] = {"worst_abs_error_pct": err, "floor_pct": None, "met": err <= target}
            continue
        worst = max((abs(r[which][key]["value"]) for r in rows), default=math.nan)
        floor = abs(start["floor"].get(key, math.nan)) if start["floor"] else math.nan
        allowed = max(target, FLOOR_RATIO * floor) if math.isfinite(floor) else target
        out[key] = {"worst_abs_error_pct": worst, "floor_pct": floor,
                    "ratio_to_floor": worst / floor if floor else None, "met": bool(worst <= allowed)}
    return out


def across_starts(starts: Sequence[dict[str, Any]], which: str = "one_time") -> dict[str, Any]:
    """Per target measure, the mean over starts of each start's mean |error| over its predicted loads, with a 95%
    t interval over starts."""
    from scipy import stats as st

    out: dict[str, Any] = {}
    for key in (k for k in TARGETS if k not in ("goodput", "highest_rate")):
        per = []
        for s in starts:
            rows = [r for r in s["rows"] if r["load"] != s["calibrated_on"] and r["repeat_of"] is None and which in r]
            if rows:
                per.append(float(np.mean([abs(r[which][key]["value"]) for r in rows])))
        if not per:
            continue
        mean = float(np.mean(per))
        half = float(st.t.ppf(0.975, len(per) - 1) * np.std(per, ddof=1) / math.sqrt(len(per))) if len(per) > 1 \
            else math.nan
        out[key] = {"mean_abs_error_pct": mean, "lo": mean - half, "hi": mean + half, "starts": len(per)}
    return out


def save(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=_default) + "\n")
    return path


def _default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(type(v).__name__)


def _ci(e: dict[str, float]) -> str:
    return f"{e['value']:+.1f} [{e['lo']:+.1f}, {e['hi']:+.1f}]"


def start_lines(start: dict[str, Any]) -> list[str]:
    """The start's table as text lines: per load the one-time and followed errors, the floor, the mechanisms."""
    keys = ("e2e_mean", "e2e_p90", "e2e_p99", "ttft_mean", "ttft_p90", "e2e_mape")
    lines = ["load kind rate | " + " | ".join(keys) + " (one-time; followed below)"]
    for r in start["rows"]:
        tag = " (calibration)" if r["load"] == start["calibrated_on"] else (
            f" (repeat of {r['repeat_of']})" if r["repeat_of"] is not None else "")
        lines.append(f"{r['load']} {r['kind']}{tag} {r['rate_rps']:.1f}/s | "
                     + " | ".join(_ci(r["one_time"][k]) for k in keys))
        if "followed" in r:
            lines.append(f"    followed (level {r['followed_level']:.3f}) | "
                         + " | ".join(_ci(r["followed"][k]) for k in keys))
        if "live" in r:
            lines.append(f"    live (levels {', '.join(f'{lv:.3f}' for _, lv in r['live_levels'])}) | "
                         + " | ".join(_ci(r["live"][k]) for k in keys))
        if "oracle" in r:
            lines.append(f"    oracle (its own level {r['own_level']:.3f}) | "
                         + " | ".join(_ci(r["oracle"][k]) for k in keys))
        m = r.get("mechanisms") or {}
        if m:
            lines.append("    measured/predicted ms: " + ", ".join(
                f"{k.replace('_ms', '')} {v['measured']:.1f}/{v['predicted']:.1f}" for k, v in m.items()
                if isinstance(v, dict) and v.get("measured") is not None))
        flagged = [w["t_s"] for w in r.get("drift", []) if w["flagged"]]
        if flagged:
            lines.append(f"    drift: windows flagged at {', '.join(f'{t:g}' for t in flagged)} s")
    if start["floor"]:
        lines.append("floor (repeat vs first, %): " + ", ".join(f"{k} {v:+.1f}" for k, v in start["floor"].items()))
    g = start.get("goodput")
    if g:
        lines.append(f"goodput at TTFT <= {g['slo_ttft_ms']:g} ms, TPOT <= {g['slo_tpot_ms']:g} ms: measured "
                     f"{'>= ' if g['measured_censored'] else ''}{g['measured_rps']:.1f} req/s, predicted "
                     f"{'>= ' if g['predicted_censored'] else ''}{g['predicted_rps']:.1f} req/s")
    for w, h in (start.get("holds_min") or {}).items():
        if h.get("windows"):
            first = "never" if h["first_flag_min"] is None else f"after {h['first_flag_min']:.1f} min"
            lines.append(f"drift ({w.replace('_', '-')}): first window out of the calibration's band {first}; "
                         f"{h['flagged_share'] * 100:.0f}% of {h['windows']} later windows flagged")
    rs = start.get("rate_search")
    if rs:
        lines.append(f"rate search at TTFT <= {rs['slo_ttft_ms']:g} ms, TPOT <= {rs['slo_tpot_ms']:g} ms: served "
                     + ", ".join(f"{t['rate_rps']:g} ({t['attainment'] * 100:.0f}%)" for t in rs["measured_steps"])
                     + f" -> {rs['measured_rps']} req/s; predicted "
                     + ", ".join(f"{t['rate_rps']:g} ({t['attainment'] * 100:.0f}%)" for t in rs["predicted_steps"])
                     + f" -> {rs['predicted_rps']} req/s (resolution {rs['resolution_rps']:.2f} req/s)")
    v = verdict(start)
    lines.append("targets (one-time): " + ", ".join(f"{k} {'met' if x['met'] else 'missed'} "
                                                    f"({x['worst_abs_error_pct']:.1f}%)" for k, x in v.items()))
    return lines


def drift_plot(start: dict[str, Any], path: Path) -> Path:
    """Signed error of the mean E2E per 10 s window over the server's life, one-time and followed, with the
    calibration window's band; flagged windows in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(11, 3.8))
    lo, hi = start["band_e2e_mean_pct"]
    ax.axhspan(lo, hi, color="0.85", label="calibration window's 95% interval")
    for key, color, label in (("drift", "C0", "one-time calibration"), ("drift_followed", "C1", "followed level"),
                              ("drift_live", "C2", "live level")):
        xs, ys, errs, flags = [], [], [], []
        for r in start["rows"]:
            t0 = r["minutes_since_healthy"] * 60
            for w in r.get(key, []):
                xs.append((t0 + w["t_s"]) / 60)
                ys.append(w["error_pct"])
                errs.append((w["error_pct"] - w["lo"], w["hi"] - w["error_pct"]))
                flags.append(w["flagged"])
        if not xs:
            continue
        ax.errorbar(xs, ys, yerr=np.array(errs).T, fmt="o", ms=3, color=color, label=label, alpha=0.8)
        fx = [x for x, f in zip(xs, flags, strict=True) if f]
        fy = [y for y, f in zip(ys, flags, strict=True) if f]
        ax.plot(fx, fy, "x", color="red", ms=7)
    for r in start["rows"]:
        ax.axvline(r["minutes_since_healthy"], color="0.6", lw=0.6)
        ax.text(r["minutes_since_healthy"], ax.get_ylim()[1], r["kind"], fontsize=7, va="top")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("minutes since the server was healthy")
    ax.set_ylabel("E2E mean error per 10 s (%)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
