"""Calibration on the running server: per server start, the loads it never saw predicted from one calibrated window,
beside the server's own floor, with intervals across starts (the JSON of `estimate experiment calibration --json`,
estimator/study/calibration.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from estimator.report.document import SECTIONS, Bullets, Figure, Note, Paragraph, Section, Table

KEYS = ("e2e_mean", "e2e_p90", "e2e_p99", "ttft_mean", "ttft_p90", "e2e_mape")


def _ci(e: dict[str, float]) -> str:
    return f"{e['value']:+.1f} [{e['lo']:+.1f}, {e['hi']:+.1f}]"


def calibration_section(study: dict[str, Any] | str, plots: dict[str, bytes] | None = None) -> Section:
    sec = Section("calibration", SECTIONS["calibration"])
    if isinstance(study, str):
        sec.add(Note(f"Calibration study unreadable: {study}"))
        return sec
    t = study["targets"]
    sec.add(Paragraph(
        f"Each server start is calibrated on one load (`{study['calibrate_on']}`: its level, front end; the per-step "
        "terms from serving.json) and predicts the other loads of the same start, which it never saw. Signed error, "
        "% [95% bootstrap interval over requests]. Targets: E2E mean, p90, p99 within "
        f"±{t['e2e_mean']:g}%, TTFT mean and p90 within ±{t['ttft_mean']:g}%, per-request E2E MAPE ≤ "
        f"{t['e2e_mape']:g}%, goodput within {t['goodput']:g}%; or error ÷ the server's own floor ≤ 1.2 where the "
        "floor (one load served twice on the start) is wider. *Followed*: the level re-fitted on the last 30 s of the "
        "load before; *live*: re-fitted every 10 s on the requests finished in the last 30 s; *its own level*: the "
        "level the load itself needed (an oracle, known only after it ran)."
    ))
    for start in study["starts"]:
        cal = start["calibration"]
        rows = []
        for r in start["rows"]:
            tag = " (calibration)" if r["load"] == start["calibrated_on"] else (
                f" (repeat of {r['repeat_of']})" if r["repeat_of"] is not None else "")
            rows.append([f"{r['load']} {r['kind']}{tag}", f"{r['rate_rps']:.1f}",
                         *(_ci(r["one_time"][k]) for k in KEYS),
                         _ci(r["followed"]["e2e_mean"]) if "followed" in r else "–",
                         _ci(r["live"]["e2e_mean"]) if "live" in r else "–",
                         f"{r['own_level']:.3f}: {_ci(r['oracle']['e2e_mean'])}" if "oracle" in r else "–"])
        floor = start.get("floor") or {}
        if floor:
            rows.append(["server floor (repeat vs first)", "", *(f"{floor.get(k, float('nan')):+.1f}" for k in KEYS),
                         "", "", ""])
        sec.add(Table(
            ["load", "req/s", "E2E mean", "E2E p90", "E2E p99", "TTFT mean", "TTFT p90", "E2E MAPE",
             "E2E mean, followed", "E2E mean, live", "its own level: E2E mean"], rows,
            caption=(f"{Path(start['run']).name}: level {cal['level']:.3f}, per iteration {cal['iteration_ms']:.3f} "
                     f"ms, front end {cal['frontend_request_ms']:.2f} ms/request + {cal['frontend_token_ms']:.3f} "
                     f"ms/token, constant {cal.get('request_ms', 0.0):.1f} ms"),
        ))
        name = Path(start["run"]).name
        rs = start.get("rate_search")
        if rs:
            sec.add(Bullets([
                f"{name}: highest rate meeting TTFT ≤ {rs['slo_ttft_ms']:g} ms and TPOT ≤ {rs['slo_tpot_ms']:g} ms, "
                f"searched on the server: {rs['measured_rps']} req/s ("
                + ", ".join(f"{t['rate_rps']:g}: {t['attainment'] * 100:.0f}%" for t in rs["measured_steps"])
                + f"); the same search on the calibrated replica: {rs['predicted_rps']} req/s ("
                + ", ".join(f"{t['rate_rps']:g}: {t['attainment'] * 100:.0f}%" for t in rs["predicted_steps"])
                + f"); resolution {rs['resolution_rps']:.2f} req/s"
            ]))
        if plots and name in plots:
            sec.add(Figure(f"drift-{name}", plots[name], f"{name}: E2E-mean error per 10 s window over the "
                                                           "server's life; red: out of the calibration's band"))
    items = []
    for which, figures in study["across_starts"].items():
        items.append(f"across {len(study['starts'])} starts, {which.replace('_', '-')}: mean |error| % [95% t "
                     "interval]: " + ", ".join(f"{k} {v['mean_abs_error_pct']:.1f} [{v['lo']:.1f}, {v['hi']:.1f}]"
                                               for k, v in figures.items()))
    for which, verdicts in study.get("verdicts", {}).items():
        met = {k: sum(v[k]["met"] for v in verdicts if k in v) for k in t}
        items.append(f"targets met ({which.replace('_', '-')}), starts out of {len(verdicts)}: "
                     + ", ".join(f"{k} {n}" for k, n in met.items()))
    sec.add(Bullets(items))
    return sec
