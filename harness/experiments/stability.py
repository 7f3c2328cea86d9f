"""Where each engine start's speed level comes from: arms of settings, each a fresh start, in randomized interleaved
rounds (issue 45, DESIGN.md §14).

    profile experiment stability --out DIR [--rounds 8] [--arms today,today-b,placed,...] [--path step|served]
    profile experiment stability --out DIR --analyze

The start is the unit. Each round runs every arm once, each on a fresh engine start, in a random order seeded by
the round, so the machine's drift over the hour falls on every arm alike; `today` and `today-b` are the same
settings (an A/A pair: what two arms differ by when nothing differs). Arms are environments (harness/engine/
steady.py names the variables) plus, for `inprocess`, the sweep's `--inprocess`.

- **step path** (`--path step`): one `profile sweep` per start, the issue's config (tier 0, top_k 0, blocks 32,
  text_tokens 64 and 512, 6 prompts + 3 repeats of one, 32 new tokens, the canary before and after). Per start:
  the median decode step, the median prefill at 512, the same-prompt decode CV at equal position (median over
  positions), and where the threads ran and waited (the manifest's `engine_threads`: run-queue wait of the
  compute thread and of each process, involuntary switches, CPUs seen, AnonHugePages).
- **served path** (`--path served`): one `profile serve-bench` per start, the same small load served
  `SERVED_REPEATS` times on that start (vLLM's own client). Per start: the mean E2E of each repeat, their
  median (the level) and their CV (repeat to repeat within the start).

`DIR/starts.jsonl` holds one line per start (the resume state: a rerun skips the (round, arm) pairs it holds);
`DIR/runs/` the run folders; `DIR/stability.json` and `DIR/stability.png` the analysis: per arm, the sd of the
log level across starts with a bootstrap interval over starts, max/min, the within-start CV, and the arm's level
against `today`'s (a ratio of geometric means with its interval). Run it alone on the machine.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract.manifest import read_jsonl_dicts
from harness.engine.steady import PLACE_ENV, PRELOAD_ENV, SPIN_ENV, STEADY_ENV

Say = Callable[[str], None]
STARTS = "starts.jsonl"
RESULTS = "stability.json"
FIGURE = "stability.png"
SERVED_REPEATS = 5
STEP_SWEEP = ["--tier", "0", "--top-k", "0", "--blocks", "32", "--text-tokens", "64,512", "--reps", "6",
              "--same-prompt-repeats", "3", "--max-new-tokens", "32", "--budget", "off", "--canary", "--quiet"]
SERVED_LOAD = ["--rate", "2", "--count", "16", "--seed", "7", "--text-tokens-dist", "uniform:32:512",
               "--new-tokens-dist", "uniform:8:64"]
BOOT = 2000


@dataclass(frozen=True)
class Arm:
    """One arm: the environment its start runs under, the sweep's extra arguments, and what it changes."""

    env: dict[str, str]
    args: tuple[str, ...] = ()
    changes: str = "where threads run"  # or "what computes": a setting that changes the computation itself
    note: str = ""


TODAY = {STEADY_ENV: "0"}
ARMS: dict[str, Arm] = {
    "today": Arm(TODAY, note="vLLM's own placement, spin and libraries (before issue 45)"),
    "today-b": Arm(TODAY, note="the same as today: the A/A pair"),
    "placed": Arm({**TODAY, PLACE_ENV: "reserved"}, note="every thread but the compute thread on the reserved core"),
    "short-spin": Arm({**TODAY, SPIN_ENV: "1"}, note="shm_broadcast readers spin 1 ms, not 1 s (plugin)"),
    "placed-spin": Arm({**TODAY, PLACE_ENV: "reserved", SPIN_ENV: "1"}, note="placed and short-spin together"),
    "inprocess": Arm(TODAY, ("--inprocess",), "what computes",
                     "the engine core in the harness's process (torch's own thread count; not how vLLM serves)"),
    "spinloop-ext": Arm({**TODAY, "VLLM_USE_SPINLOOP_EXT": "1"}, note="vLLM's native spin loop for the readers"),
    "preload": Arm({**TODAY, PRELOAD_ENV: "tcmalloc,iomp5"}, changes="what computes",
                   note="libtcmalloc and libiomp5 in the engine's LD_PRELOAD"),
    "thp": Arm({**TODAY, "THP_MEM_ALLOC_ENABLE": "1"}, note="torch's CPU allocator on transparent huge pages"),
    "adopted": Arm({}, note="the harness's defaults now (harness/engine/steady.py defaults())"),
    "combined": Arm({**TODAY, PLACE_ENV: "reserved", PRELOAD_ENV: "tcmalloc,iomp5", "THP_MEM_ALLOC_ENABLE": "1"},
                    changes="what computes", note="placed, preload and thp together (each helped somewhere)"),
}
SERVED_ARMS = ("today", "today-b", "adopted")


@dataclass
class StabilitySpec:
    out: Path
    rounds: int = 8
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    path: str = "step"
    seed: int = 45

    def check(self) -> None:
        from harness.rundata.spec import SpecError

        if self.path not in ("step", "served"):
            raise SpecError(f"--path must be step or served, got {self.path!r}")
        bad = [a for a in self.arms if a not in ARMS]
        if bad:
            raise SpecError(f"unknown arm(s) {', '.join(bad)} (known: {', '.join(ARMS)})")
        if len(set(self.arms)) < 2:
            raise SpecError("--arms needs at least two arms (today and another)")
        if self.rounds < 1:
            raise SpecError(f"--rounds must be at least 1, got {self.rounds}")


def round_order(arms: list[str], rnd: int, seed: int) -> list[str]:
    """The arms of round `rnd` in their random order (seeded by the round: a resumed study keeps it)."""
    order = list(arms)
    random.Random(f"stability:{seed}:{rnd}").shuffle(order)
    return order


def read_starts(out: Path) -> list[dict[str, Any]]:
    """DIR/starts.jsonl's rows (a line a kill cut short is skipped: that start runs again)."""
    return read_jsonl_dicts(out / STARTS)


def _cv(x: pd.Series) -> float:
    return float(x.std(ddof=1) / x.mean()) if len(x) > 1 and x.mean() > 0 else float("nan")


def step_figures(run: Path) -> dict[str, Any]:
    """One step-path start's figures from its run folder (module docstring)."""
    s = pd.read_parquet(run / "samples")
    m = json.loads((run / "manifest.json").read_text())
    dec, pre = s[s.phase == "decode"], s[s.phase == "prefill"]
    same = s[s.prompt_kind == "same"]
    same_dec = same[same.phase == "decode"].groupby(["point_id", "position"]).latency_ms.agg(_cv).dropna()
    same_pre = same[same.phase == "prefill"].groupby("point_id").latency_ms.agg(_cv).dropna()
    threads = (m.get("engine_threads") or [{}])[0]
    start = (m.get("engine_starts") or [{}])[0]
    canary = m.get("canary") or {}
    out = {
        "decode_median_ms": float(dec.latency_ms.median()),
        "decode_engine_median_ms": float(dec.engine_elapsed_ms.median()) if dec.engine_elapsed_ms.notna().any()
        else None,
        "prefill512_median_ms": float(pre[pre.text_tokens == 512].latency_ms.median()),
        "prefill64_median_ms": float(pre[pre.text_tokens == 64].latency_ms.median()),
        "decode_same_prompt_cv_pct": 100 * float(same_dec.median()),
        "prefill_same_prompt_cv_pct": 100 * float(same_pre.median()),
        "engine_start_s": start.get("seconds"),
        "engine_mode": m.get("engine_mode"),
        "steady": (start.get("effective") or {}).get("steady"),
        "threads": threads,
        "compute_wait_ms": (threads.get("compute") or {}).get("wait_ms"),
        "compute_run_ms": (threads.get("compute") or {}).get("run_ms"),
        "steal_ms": (threads.get("machine") or {}).get("steal_ms"),
        "others_busy_ms": (threads.get("machine") or {}).get("others_busy_ms"),
    }
    for when in ("before", "after"):
        c = canary.get(when) or {}
        out[f"canary_decode_{when}_ms"] = (c.get("decode") or {}).get("median_ms")
        out[f"canary_prefill_{when}_ms"] = (c.get("prefill") or {}).get("median_ms")
    return out


def served_figures(run: Path) -> dict[str, Any]:
    """One served-path start's figures: each repeat's mean E2E, TTFT and TPOT, their median and CV."""
    means, ttft, tpot = [], [], []
    for folder in sorted((run / "loads").iterdir(), key=lambda p: int(p.name)):
        r = pd.read_parquet(folder / "requests")
        r = r[r.ok]
        means.append(float(r.e2e_ms.mean()))
        ttft.append(float(r.ttft_ms.median()))
        tpot.append(float(r.tpot_ms.median()))
    e2e = pd.Series(means)
    return {"e2e_mean_ms_by_repeat": [round(x, 3) for x in means], "e2e_mean_ms": float(e2e.median()),
            "e2e_repeat_cv_pct": 100 * _cv(e2e), "ttft_median_ms": float(np.median(ttft)),
            "tpot_median_ms": float(np.median(tpot))}


def _command(spec: StabilitySpec, arm: Arm, run_name: str) -> list[str]:
    runs = spec.out / "runs"
    if spec.path == "step":
        return [sys.executable, "-m", "harness.cli", "sweep", *STEP_SWEEP, *arm.args, "--out", str(runs),
                "--name", run_name]
    workload = spec.out / "served-load.jsonl"
    loads = [a for _ in range(SERVED_REPEATS) for a in ("--workload", str(workload))]
    return [sys.executable, "-m", "harness.cli", "serve-bench", *loads, "--prewarm", "8", "--out", str(runs),
            "--name", run_name]


def _served_workload(spec: StabilitySpec) -> None:
    path = spec.out / "served-load.jsonl"
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "harness.cli", "workload", *SERVED_LOAD, "--out", str(path)],
                       check=True, capture_output=True)


def run_stability(spec: StabilitySpec, say: Say) -> None:
    """Run the rounds not yet in DIR/starts.jsonl, then the analysis."""
    spec.out.mkdir(parents=True, exist_ok=True)
    if spec.path == "served":
        _served_workload(spec)
    done = {(r["path"], r["round"], r["arm"]) for r in read_starts(spec.out)}
    base_env = {k: v for k, v in os.environ.items()
                if k not in (STEADY_ENV, PLACE_ENV, SPIN_ENV, PRELOAD_ENV, "VLLM_USE_SPINLOOP_EXT",
                             "THP_MEM_ALLOC_ENABLE", "VLLM_ENABLE_V1_MULTIPROCESSING")}
    total = spec.rounds * len(spec.arms)
    n = sum(1 for key in done if key[0] == spec.path and key[1] < spec.rounds and key[2] in spec.arms)
    for rnd in range(spec.rounds):
        for place_in_round, name in enumerate(round_order(spec.arms, rnd, spec.seed)):
            if (spec.path, rnd, name) in done:
                continue
            arm = ARMS[name]
            run_name = f"{spec.path}-r{rnd:02d}-{name}"
            log = spec.out / "runs" / f"{run_name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            with log.open("w") as f:
                proc = subprocess.run(_command(spec, arm, run_name), env={**base_env, **arm.env},
                                      stdout=f, stderr=subprocess.STDOUT)
            wall = time.monotonic() - t0
            row: dict[str, Any] = {"path": spec.path, "round": rnd, "arm": name, "place_in_round": place_in_round,
                                   "started_at": started, "wall_s": round(wall, 1), "run": run_name,
                                   "exit_code": proc.returncode, "env": arm.env, "args": list(arm.args)}
            try:
                if proc.returncode != 0:
                    raise RuntimeError(f"exit code {proc.returncode} (see {log})")
                run = spec.out / "runs" / run_name
                row.update(step_figures(run) if spec.path == "step" else served_figures(run))
                row["status"] = "ok"
            except Exception as e:  # a failed start is a row too: it counts, and the study goes on
                row["status"] = "failed"
                row["error"] = " ".join(str(e).split())[:300]
            n += 1
            with (spec.out / STARTS).open("a") as f:
                f.write(json.dumps(row) + "\n")
            level = (f"decode {row.get('decode_median_ms', float('nan')):.2f} ms, prefill@512 "
                     f"{row.get('prefill512_median_ms', float('nan')):.1f} ms" if spec.path == "step"
                     else f"E2E {row.get('e2e_mean_ms', float('nan')):.0f} ms")
            say(f"[{n}/{total}] round {rnd} {name}: {row['status']}, {level}, {wall:.0f} s")
    analyze_stability(spec.out, say)


# ----- analysis -----

LEVELS = {"step": ("decode_median_ms", "prefill512_median_ms"), "served": ("e2e_mean_ms",)}
CANARY_OF = {"decode_median_ms": "canary_decode", "prefill512_median_ms": "canary_prefill"}
WITHIN = {"step": ("decode_same_prompt_cv_pct", "prefill_same_prompt_cv_pct"), "served": ("e2e_repeat_cv_pct",)}


def sd_log_interval(x: np.ndarray, rng: np.random.Generator, boot: int = BOOT) -> tuple[float, float, float]:
    """The sd of log(x) across starts, with a 95% percentile bootstrap interval over starts."""
    lx = np.log(x)
    sd = float(np.std(lx, ddof=1))
    idx = rng.integers(0, len(lx), size=(boot, len(lx)))
    sds = np.std(lx[idx], axis=1, ddof=1)
    return sd, float(np.quantile(sds, 0.025)), float(np.quantile(sds, 0.975))


def ratio_interval(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, boot: int = BOOT) -> list[float]:
    """Geometric mean of a over that of b, with a 95% bootstrap interval (starts resampled within each arm)."""
    la, lb = np.log(a), np.log(b)
    ra = la[rng.integers(0, len(la), size=(boot, len(la)))].mean(axis=1)
    rb = lb[rng.integers(0, len(lb), size=(boot, len(lb)))].mean(axis=1)
    d = ra - rb
    return [float(np.exp(la.mean() - lb.mean())), float(np.exp(np.quantile(d, 0.025))),
            float(np.exp(np.quantile(d, 0.975)))]


NIGHTLY_TESTS = 2  # the nightly's interleaved verdict tests decode and prefill of its config (docs/nightly.md)


def rounds_needed(sd_round: float, effect: float = 0.10, false_alarm: float = 0.05, detection: float = 0.90,
                  tests: int = NIGHTLY_TESTS) -> float:
    """Interleaved rounds a night needs to catch a slowdown of `effect` with probability `detection` at
    `false_alarm` over `tests` one-sided tests, when one round's log ratio has sd `sd_round` (the rule of
    estimator/study/nightly_detection.py rounds_needed: K = ((z(1 - a/m) + z(detection)) s / log(1 + effect))^2)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - false_alarm / tests) + NormalDist().inv_cdf(detection)
    return float((z * sd_round / np.log1p(effect)) ** 2)


def nightly_figures(ok: pd.DataFrame, rng: np.random.Generator) -> dict[str, Any]:
    """The nightly's rounds needed: from the A/A pair (today and today-b of each round: one round's log ratio, as
    an interleaved night measures it), and for every arm from its start-to-start sd (a round is two independent
    starts: sd x sqrt 2), each with a bootstrap interval over rounds or starts."""
    out: dict[str, Any] = {}
    for col in LEVELS["step"]:
        pairs = ok[ok.arm.isin(["today", "today-b"])].pivot_table(index="round", columns="arm", values=col)
        entry: dict[str, Any] = {}
        if {"today", "today-b"} <= set(pairs.columns) and len(pairs := pairs.dropna()) >= 3:
            d = np.log(pairs["today-b"].to_numpy(dtype=float) / pairs["today"].to_numpy(dtype=float))
            boot = [rounds_needed(float(np.std(d[i], ddof=1))) for i in rng.integers(0, len(d), (BOOT, len(d)))]
            entry["aa_round_sd_log"] = float(np.std(d, ddof=1))
            entry["aa_rounds_needed"] = rounds_needed(float(np.std(d, ddof=1)))
            entry["aa_rounds_needed_95"] = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
            entry["aa_rounds"] = len(d)
        per_arm = {}
        for arm, g in ok.groupby("arm"):
            lx = np.log(g[col].dropna().to_numpy(dtype=float))
            if len(lx) < 3:
                continue
            boot = [rounds_needed(np.sqrt(2) * float(np.std(lx[i], ddof=1)))
                    for i in rng.integers(0, len(lx), (BOOT, len(lx)))]
            per_arm[str(arm)] = [rounds_needed(np.sqrt(2) * float(np.std(lx, ddof=1))),
                                 float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
        entry["rounds_needed_from_start_sd"] = per_arm
        out[col] = entry
    return out


def _round(v: Any, k: int = 4) -> Any:
    if isinstance(v, float):
        return round(v, k)
    if isinstance(v, list):
        return [_round(x, k) for x in v]
    if isinstance(v, dict):
        return {key: _round(x, k) for key, x in v.items()}
    return v


def summarize(rows: list[dict[str, Any]], path: str, seed: int = 0) -> dict[str, Any]:
    """Per arm of `path`: starts, each level's sd of log across starts [95% bootstrap], max/min, the median
    within-start CV, the level against today's, the compute thread's run-queue wait; and the drift the
    canary and the A/A pair saw."""
    rng = np.random.default_rng(seed)
    ok = pd.DataFrame([r for r in rows if r.get("path") == path and r.get("status") == "ok"])
    failed = [r for r in rows if r.get("path") == path and r.get("status") != "ok"]
    out: dict[str, Any] = {"path": path, "starts_ok": len(ok), "starts_failed": len(failed), "arms": {}}
    if ok.empty:
        return out
    base = ok[ok.arm == "today"]
    for arm, g in ok.groupby("arm", sort=False):
        entry: dict[str, Any] = {"starts": len(g), "changes": ARMS[str(arm)].changes if arm in ARMS else None,
                                 "note": ARMS[str(arm)].note if arm in ARMS else None}
        for col in LEVELS[path]:
            x = g[col].dropna().to_numpy(dtype=float)
            if len(x) < 2:
                continue
            sd, lo, hi = sd_log_interval(x, rng)
            entry[col] = {"median": float(np.median(x)), "min": float(x.min()), "max": float(x.max()),
                          "max_over_min": float(x.max() / x.min()), "sd_log": sd, "sd_log_95": [lo, hi]}
            b = base[col].dropna().to_numpy(dtype=float)
            if len(b) >= 2 and arm != "today":
                entry[col]["vs_today"] = ratio_interval(x, b, rng)
            canary = CANARY_OF.get(col)
            if canary and all(f"{canary}_{w}_ms" in g for w in ("before", "after")):
                c = g[[col, f"{canary}_before_ms", f"{canary}_after_ms"]].dropna().to_numpy(dtype=float)
                if len(c) >= 2:  # the level over the machine's own speed then (the canary's geometric mean)
                    norm = c[:, 0] / np.sqrt(c[:, 1] * c[:, 2])
                    nsd, nlo, nhi = sd_log_interval(norm, rng)
                    entry[col]["sd_log_canary_normalized"] = nsd
                    entry[col]["sd_log_canary_normalized_95"] = [nlo, nhi]
        for col in WITHIN[path]:
            x = g[col].dropna().to_numpy(dtype=float)
            if len(x):
                lo, hi = np.quantile([np.median(rng.choice(x, len(x))) for _ in range(BOOT)], [0.025, 0.975])
                entry[col] = {"median": float(np.median(x)), "median_95": [float(lo), float(hi)]}
        if "compute_wait_ms" in g:
            w = g.compute_wait_ms.dropna()
            if len(w):
                entry["compute_wait_ms_median"] = float(w.median())
        out["arms"][str(arm)] = entry
    out["explain"] = explain(ok, rng, LEVELS[path][0])
    if path == "step":
        out["nightly"] = nightly_figures(ok, rng)
    if path == "step" and "canary_decode_before_ms" in ok:
        c = ok[["canary_decode_before_ms", "canary_decode_after_ms"]].dropna()
        if len(c) > 2:
            lc = np.log(c.mean(axis=1).to_numpy(dtype=float))
            ld = np.log(ok.loc[c.index, "decode_median_ms"].to_numpy(dtype=float))
            out["canary"] = {"sd_log_decode_canary": float(np.std(lc, ddof=1)),
                             "corr_log_canary_vs_log_decode": float(np.corrcoef(lc, ld)[0, 1]),
                             "starts": len(c)}
    return _round(out)


def _nested(row: dict[str, Any], *keys: str) -> Any:
    v: Any = row
    for k in keys:
        v = v.get(k) if isinstance(v, dict) else None
    return v


def candidates(ok: pd.DataFrame) -> pd.DataFrame:
    """What could explain a start's level, one column per candidate (from each row's `threads` record)."""
    t = ok["threads"] if "threads" in ok else pd.Series([{}] * len(ok), index=ok.index)
    started = pd.to_datetime(ok["started_at"]) if "started_at" in ok else pd.Series(pd.NaT, index=ok.index)
    run = t.map(lambda r: _nested(r, "compute", "run_ms"))
    return pd.DataFrame({
        "compute_wait_share": t.map(lambda r: _nested(r, "compute", "wait_ms")) / run,
        "compute_nvcsw_per_s": t.map(lambda r: _nested(r, "compute", "nvcsw")) / (run / 1e3),
        "steal_ms": t.map(lambda r: _nested(r, "machine", "steal_ms")),
        "others_busy_ms": t.map(lambda r: _nested(r, "machine", "others_busy_ms")),
        "log_canary_decode": np.log(ok[["canary_decode_before_ms", "canary_decode_after_ms"]].mean(axis=1))
        if "canary_decode_before_ms" in ok else np.nan,
        "minutes_into_study": (started - started.min()).dt.total_seconds() / 60,
    }, index=ok.index).astype(float)


def explain(ok: pd.DataFrame, rng: np.random.Generator, level_col: str = "decode_median_ms") -> dict[str, Any]:
    """Across starts, the Pearson correlation of each candidate with the log level (`level_col`), both centred on
    their arm's mean (so an arm's own effect is not counted), with a 95% bootstrap interval over starts, and r²:
    the share of the level's start-to-start variance a straight line on that candidate takes out."""
    cand = candidates(ok)
    level = np.log(ok[level_col].astype(float))
    out: dict[str, Any] = {}
    for col in cand:
        d = pd.DataFrame({"x": cand[col], "y": level, "arm": ok["arm"]}).dropna()
        if len(d) < 8 or d.x.std() == 0:
            continue
        d["x"] -= d.groupby("arm").x.transform("mean")
        d["y"] -= d.groupby("arm").y.transform("mean")
        x, y = d.x.to_numpy(), d.y.to_numpy()
        r = float(np.corrcoef(x, y)[0, 1])
        idx = rng.integers(0, len(x), size=(BOOT, len(x)))
        rs = [np.corrcoef(x[i], y[i])[0, 1] for i in idx]
        lo, hi = np.nanquantile(rs, [0.025, 0.975])
        out[col] = {"r": r, "r_95": [float(lo), float(hi)], "variance_share": r * r, "starts": len(d)}
    return out


def analyze_stability(out: Path, say: Say) -> dict[str, Any]:
    """DIR/stability.json and DIR/stability.png from DIR/starts.jsonl; prints the table."""
    rows = read_starts(out)
    paths = {p: summarize(rows, p) for p in ("step", "served") if any(r.get("path") == p for r in rows)}
    results: dict[str, Any] = {"schema": "stability/1", "cpu": _cpu(), "paths": paths}
    (out / RESULTS).write_text(json.dumps(results, indent=1) + "\n")
    for path, res in paths.items():
        say(f"{path} path: {res['starts_ok']} starts ok, {res['starts_failed']} failed")
        what = LEVELS[path][0].split("_")[0]
        for arm, e in res["arms"].items():
            parts = [f"{arm:13s} n={e['starts']}"]
            for col in LEVELS[path]:
                if col in e:
                    c = e[col]
                    vs = c.get("vs_today")
                    parts.append(f"{col.split('_')[0]} {c['median']:.2f} ms sd_log {c['sd_log']:.3f} "
                                 f"[{c['sd_log_95'][0]:.3f}, {c['sd_log_95'][1]:.3f}] max/min {c['max_over_min']:.2f}"
                                 + (f" x{vs[0]:.2f} [{vs[1]:.2f}, {vs[2]:.2f}] vs today" if vs else ""))
            for col in WITHIN[path]:
                if col in e:
                    parts.append(f"{col.split('_')[0]} CV {e[col]['median']:.1f}%")
            say("  " + "; ".join(parts))
        for col, e in (res.get("explain") or {}).items():
            say(f"  explains the {what} level? {col}: r {e['r']:+.2f} [{e['r_95'][0]:+.2f}, {e['r_95'][1]:+.2f}] "
                f"over {e['starts']} starts")
    _figure(rows, out / FIGURE)
    return results


def _cpu() -> str:
    from harness.engine.device import cpu_model

    return str(cpu_model())


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = pd.DataFrame([r for r in rows if r.get("status") == "ok"])
    if ok.empty:
        return
    panels = [(p, c) for p in ("step", "served") for c in LEVELS[p] if c in ok and (ok.path == p).any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (p, col) in zip(axes[0], panels, strict=True):
        d = ok[ok.path == p]
        arms = [a for a in ARMS if a in set(d.arm)]
        for i, arm in enumerate(arms):
            g = d[d.arm == arm]
            jitter = (g["round"].to_numpy() - g["round"].mean()) * 0.03
            ax.scatter(i + jitter, g[col], s=18, alpha=0.8)
            ax.hlines(g[col].median(), i - 0.3, i + 0.3, color="k", lw=1)
        ax.set_xticks(range(len(arms)), arms, rotation=40, ha="right")
        ax.set_ylabel(col)
        ax.set_title(f"{p} path: one dot per engine start")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
