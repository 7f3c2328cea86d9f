"""Grid against replay at equal composition, inside one engine start and across starts.

    profile experiment grid-replay --out DIR [--starts 3] [--rounds 6] [--rate 3] [--count 30] [--heavy-rate R]
    profile experiment grid-replay --analyze DIR

The question: a batch-grid iteration was slower than a replay iteration of the same composition (one decoding
sequence, context 300-400: 2.90 against 2.16 ms). Is that the grid (how an episode starts and holds its
sequences), or the engine start each was measured on (whose speed moves by tens of percent between starts on a
2-core VM, docs/simulate.md)? The experiment turns "same engine start" on and off:
- each engine start (`--tier`, default 0 = cpu-tiny; blocks 128, FCFS, max_num_seqs 8; `EngineSession`) runs
  `rounds` rounds; each round is one grid set and one Poisson trace, in alternating order:
  - grid set: one episode per (B, L) in B = 1, 2, 4 and L = 128, 384: B requests of L prompt tokens added at once,
    32 new tokens each (what `batch_points.episode_requests` sends, without a joiner);
  - trace: `count` requests, prompts 64-512 tokens, 8-48 new tokens, Poisson arrivals at `rate` req/s;
  - with `--heavy-rate`, a third segment: the same mix at that rate (load on against off, in the same start);
- composition = decode-only iterations: decode sequences and their context sum;
- the ratio grid / replay at equal decode sequences and equal context (`adjusted_ratio`: each iteration over a
  line fitted to the replay's times against context, per sequence count), of the engine core's own time
  (`engine_elapsed_ms`) and of the step's wall time (`latency_ms`), with a bootstrap interval (iterations
  resampled within sequence count and kind); beside it the plain match by (n, 128-token context bin);
- "on": grid and replay of the same start; "off": grid of start i against replay of start j != i (what a grid run
  and a separate replay run compare).
DIR/iterations.parquet keeps every iteration row (start, round, kind); `analyze` recomputes DIR/results.json.
Run it alone on the machine.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from contract.request import Request
from harness.experiments.session import EngineSession

GRID_B, GRID_L, GRID_NEW = (1, 2, 4), (128, 384), 32
TRACE_PROMPT, TRACE_NEW = (64, 512), (8, 48)
CTX_BIN, MIN_N = 128, 5
TIMES = ("engine_elapsed_ms", "latency_ms")


Segments = dict[tuple[int, int, str], list[list[Request]]]  # (start, round, kind) -> its episodes


def _trace(seed: str, first_index: int, rate: float, count: int) -> list[Request]:
    rng = random.Random(seed)
    t, reqs = 0.0, []
    for i in range(count):
        t += rng.expovariate(rate)
        reqs.append(Request.numbered(first_index + i, t, rng.randint(*TRACE_PROMPT), rng.randint(*TRACE_NEW)))
    return reqs


def workloads(starts: int, rounds: int, rate: float, count: int, heavy_rate: float = 0.0) -> Segments:
    """Every segment's episodes (one each for a trace), keyed (start, round, kind); request indices unique over the
    run (a distinct prompt each). Kinds: grid, replay (Poisson at `rate`) and, with `heavy_rate` > 0, heavy (the same
    request mix at that rate)."""
    out: Segments = {}
    index = 0
    for s in range(starts):
        for r in range(rounds):
            episodes = []
            for b, length in ((b, length) for b in GRID_B for length in GRID_L):
                episodes.append([Request.numbered(index + i, 0.0, length, GRID_NEW) for i in range(b)])
                index += b
            out[(s, r, "grid")] = episodes
            out[(s, r, "replay")] = [_trace(f"trace:{s}:{r}", index, rate, count)]
            index += count
            if heavy_rate > 0:
                out[(s, r, "heavy")] = [_trace(f"heavy:{s}:{r}", index, heavy_rate, count)]
                index += count
    return out


@dataclass(frozen=True)
class GridReplaySpec:
    """The experiment's settings: engine starts, rounds per start, the traces' Poisson `rate` (req/s) and
    requests per trace, `heavy_rate` (req/s; 0: no heavy trace), the CPU ladder's `tier`."""

    out: Path
    starts: int = 3
    rounds: int = 6
    rate: float = 3.0
    count: int = 30
    heavy_rate: float = 0.0
    tier: int = 0


def run_grid_replay(spec: GridReplaySpec, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every start's rounds into `out/iterations.parquet` (and `setup.json`), then analyze them."""
    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    segs = workloads(spec.starts, spec.rounds, spec.rate, spec.count, spec.heavy_rate)
    everything = [r for episodes in segs.values() for reqs in episodes for r in reqs]
    frames, starts = [], []
    for s in range(spec.starts):
        session = EngineSession(8, everything, scheduling_policy="fcfs", tier=spec.tier)
        say(f"[{time.strftime('%H:%M:%S')}] start {s}: {session.start_s:.1f} s, dtype "
            f"{session.effective.get('dtype')}")
        starts.append({"start": s, "engine_start_s": session.start_s, "effective": session.effective})
        try:
            for r in range(spec.rounds):
                kinds = ["grid", "replay", "heavy"] if spec.heavy_rate > 0 else ["grid", "replay"]
                kinds = kinds[(s + r) % len(kinds):] + kinds[: (s + r) % len(kinds)]  # rotate: spread drift
                for kind in kinds:
                    for e, reqs in enumerate(segs[(s, r, kind)]):
                        session.drive(reqs)
                        assert session.last is not None
                        rows = session.last.iteration_rows({"start": s, "round": r, "kind": kind, "episode": e})
                        frames.append(pd.DataFrame(rows))
                say(f"[{time.strftime('%H:%M:%S')}] start {s} round {r} done")
        finally:
            session.close()
    pd.concat(frames, ignore_index=True).to_parquet(out / "iterations.parquet")
    args = {k: str(v) for k, v in asdict(spec).items()}
    (out / "setup.json").write_text(json.dumps({"starts": starts, "args": args}, indent=1, default=str))
    return analyze_grid_replay(out, say)


def decode_only(frame: pd.DataFrame) -> pd.DataFrame:
    d = frame[(frame.num_prefill_seqs == 0) & (frame.num_decode_seqs > 0) & ~frame.composition_mismatch.astype(bool)]
    return d.assign(key=list(zip(d.num_decode_seqs.astype(int), (d.decode_ctx_sum // CTX_BIN).astype(int),
                                 strict=True)))


def _interval(stat: Any, parts: list[np.ndarray], rng: np.random.Generator, n_boot: int) -> list[float]:
    boots = [stat([a[rng.integers(0, len(a), len(a))] for a in parts]) for _ in range(n_boot)]
    return [round(float(x), 4) for x in np.percentile(boots, [2.5, 97.5])]


def adjusted_ratio(grid: pd.DataFrame, replay: pd.DataFrame, col: str, rng: np.random.Generator,
                   n_boot: int = 1000) -> dict[str, Any]:
    """grid / replay at equal decode sequences and equal context: per sequence count n (>= 10 iterations of
    each kind), a line time = a + b x decode context sum fitted to the replay's iterations; each iteration's time
    over the line; the ratio = median over the grid's iterations / median over the replay's (iterations of
    every n pooled; the replay's within the grid's context range, +-64 tokens). A 128-token bin is not enough:
    the grid's contexts sit at one end of a bin, the replay's spread over it."""
    gs, rs, per_n = [], [], {}
    for n in sorted(set(grid.num_decode_seqs) & set(replay.num_decode_seqs)):
        g, r = grid[grid.num_decode_seqs == n], replay[replay.num_decode_seqs == n]
        if len(g) < 10 or len(r) < 10:
            continue
        b, a = np.polyfit(r.decode_ctx_sum.to_numpy(float), r[col].to_numpy(float), 1)
        near = r[r.decode_ctx_sum.between(g.decode_ctx_sum.min() - 64, g.decode_ctx_sum.max() + 64)]
        if len(near) < 10:
            continue
        gr = (g[col] / (a + b * g.decode_ctx_sum)).to_numpy(float)
        rr = (near[col] / (a + b * near.decode_ctx_sum)).to_numpy(float)
        gs.append(gr)
        rs.append(rr)
        per_n[int(n)] = {"ratio": round(float(np.median(gr) / np.median(rr)), 4), "grid_n": len(gr),
                         "replay_n": len(rr)}
    if not gs:
        return {"sequence_counts": 0}
    k = len(gs)

    def stat(parts: list[np.ndarray]) -> float:
        return float(np.median(np.concatenate(parts[:k])) / np.median(np.concatenate(parts[k:])))

    return {"ratio": round(stat([*gs, *rs]), 4), "ci95": _interval(stat, [*gs, *rs], rng, n_boot),
            "sequence_counts": k, "per_n": per_n}


def binned_ratio(grid: pd.DataFrame, replay: pd.DataFrame, col: str, rng: np.random.Generator,
                 n_boot: int = 1000) -> dict[str, Any]:
    """Median over the shared (n, 128-token context bin) keys of median(grid) / median(replay), with a bootstrap
    95% interval (shown beside the adjusted ratio: the simple composition match, and why it is not enough)."""
    keys = sorted(k for k in set(grid.key) & set(replay.key)
                  if (grid.key == k).sum() >= MIN_N and (replay.key == k).sum() >= MIN_N)
    if not keys:
        return {"keys": 0}
    parts = [grid.loc[grid.key == k, col].to_numpy(float) for k in keys]
    parts += [replay.loc[replay.key == k, col].to_numpy(float) for k in keys]
    n = len(keys)

    def stat(ps: list[np.ndarray]) -> float:
        return float(np.median([np.median(ps[i]) / np.median(ps[n + i]) for i in range(n)]))

    per_key = {f"{k[0]}x{k[1] * CTX_BIN}": round(float(np.median(parts[i]) / np.median(parts[n + i])), 4)
               for i, k in enumerate(keys)}
    return {"ratio": round(stat(parts), 4), "ci95": _interval(stat, parts, rng, n_boot), "keys": n,
            "per_key": per_key}


def analyze_grid_replay(out: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The ratios from `out/iterations.parquet`, written to `out/results.json` and said line by line."""
    d = decode_only(pd.read_parquet(out / "iterations.parquet"))
    rng = np.random.default_rng(0)
    starts = sorted(int(s) for s in d.start.unique())
    res: dict[str, Any] = {"on": {}, "off": {}, "binned": {}, "level": {}, "load": {}}

    def part(s: int, kind: str) -> pd.DataFrame:
        return d[(d.start == s) & (d.kind == kind)]

    for s in starts:
        one = d[(d.start == s) & (d.num_decode_seqs == 1)]
        res["level"][s] = {k: round(float(one.loc[one.kind == k, "engine_elapsed_ms"].median()), 3)
                           for k in sorted(set(one.kind))}
        for col in TIMES:
            res["on"].setdefault(col, {})[s] = adjusted_ratio(part(s, "grid"), part(s, "replay"), col, rng)
            res["binned"].setdefault(col, {})[s] = binned_ratio(part(s, "grid"), part(s, "replay"), col, rng)
            if len(part(s, "heavy")):
                res["load"].setdefault(col, {})[s] = adjusted_ratio(part(s, "heavy"), part(s, "replay"), col, rng)
    for col in TIMES:
        for i in starts:
            for j in starts:
                if i != j:
                    res["off"].setdefault(col, {})[f"{i}/{j}"] = adjusted_ratio(part(i, "grid"), part(j, "replay"),
                                                                                col, rng, n_boot=300)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    say("decode-only, one sequence: median engine core ms per start")
    for s, v in res["level"].items():
        say(f"  start {s}: " + ", ".join(f"{k} {x:.3f}" for k, x in v.items()))
    for col in TIMES:
        say(f"{col}: grid / replay at equal decode sequences and context (adjusted; binned beside)")
        for s, v in res["on"][col].items():
            if v.get("sequence_counts"):
                b = res["binned"][col][s]
                per_n = ", ".join(f"n={n}: {x['ratio']:.3f}" for n, x in v["per_n"].items())
                say(f"  same start {s}: {v['ratio']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] ({per_n}); "
                      f"binned {b.get('ratio', float('nan')):.3f}")
        for s, v in res["load"].get(col, {}).items():
            if v.get("sequence_counts"):
                per_n = ", ".join(f"n={n}: {x['ratio']:.3f}" for n, x in v["per_n"].items())
                say(f"  heavy / replay, start {s}: {v['ratio']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] "
                      f"({per_n})")
        off = [v["ratio"] for v in res["off"][col].values() if v.get("sequence_counts")]
        if off:
            say(f"  grid of one start / replay of another: {min(off):.3f} to {max(off):.3f} over {len(off)} pairs")
    return res
