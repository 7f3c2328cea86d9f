"""Interleaved nights (issue 35 item 2): baseline settings and tonight's alternate within one night, each on a fresh
engine start, and the verdict comes from the pairs.

A night of `rounds` rounds measures, in each round, the baseline settings (the last accepted run's spec: engine
arguments, model, axes) and tonight's settings once each, in a random order per round (`night_order`). Each sweep
times the CPU canary (harness/engine/canary.py) before its engine starts and after its last point.

**The statistic** per config and phase: in each round j, r_j = exp(mean over text_tokens of log(median tonight /
median baseline)) over the requests of the two sweeps of that round (prefill: a request's prefill step; decode:
the median of its decode steps, as in estimator/nightly/stats.py); the night's ratio is the geometric mean of r_j.
Its canary-normalized twin divides each r_j by the canary's ratio tonight / baseline of that round (the same
phase's canary shape, each sweep's mean of its before and after timings).

**The interval** is a two-level bootstrap: resample the rounds with replacement, then the requests of every
sweep within each text_tokens value; so it holds both the start-to-start spread (between rounds) and each sweep's
own repeat spread.

**The flag**: the night's ratio exceeds 1 + tolerance and the whole interval lies above 1.

`estimate nightly --interleave K` runs such a night (`run_interleaved`) against the accepted baseline's recorded
settings (`baseline_settings`: the spec file's text and the `profile sweep` arguments, kept in baseline.json at
acceptance); `estimate experiment nightly-detection` runs them with an injected slowdown on tonight's side.
"""

from __future__ import annotations

import math
import os
import shutil
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from estimator.data.runs import PHASES, load_runs
from estimator.errors import EstimatorError
from estimator.nightly.spec import NightlySpec
from estimator.nightly.stats import canary_ms, config_label, request_latencies
from estimator.nightly.sweep import SweepOutcome, run_sweep

SIDES = ("baseline", "tonight")
SLOWDOWN_ENV = "LLM_LATENCY_INJECT_SLOWDOWN"  # harness/engine/slowdown.py's ENV (the estimator never imports it)


def refuse_injected(manifest: Mapping[str, Any] | None = None, what: str = "", environ: Any = None) -> None:
    """EstimatorError when the injected slowdown (the detection study's only fake) is asked for in the environment
    or recorded in a run's manifest: outside `estimate experiment nightly-detection` it must never judge a night."""
    raw = (os.environ if environ is None else environ).get(SLOWDOWN_ENV, "").strip()
    if manifest is None and raw:
        raise EstimatorError(
            f"{SLOWDOWN_ENV}={raw} is set: the injected slowdown belongs to `estimate experiment nightly-detection` "
            "only; unset it to run the nightly"
        )
    injected = ((manifest or {}).get("environment") or {}).get("injected_slowdown")
    if injected:
        raise EstimatorError(
            f"{what or 'the run'} was measured with an injected slowdown of {float(injected):.0%} "
            f"({SLOWDOWN_ENV}, the detection study's fake): the nightly does not judge or accept it"
        )


@dataclass
class SweepFigures:
    """What one sweep of an interleaved night contributes: its requests' latencies per config label, phase and
    text_tokens value (ms), and its canary's mean ms per phase (None without a canary)."""

    side: str
    round: int
    run_id: str
    requests: dict[str, dict[str, dict[int, list[float]]]]
    canary_ms: dict[str, float | None] = field(default_factory=dict)
    injected_slowdown: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "round": self.round,
            "run_id": self.run_id,
            "canary_ms": self.canary_ms,
            "injected_slowdown": self.injected_slowdown,
            "requests": {
                label: {ph: {str(n): v for n, v in by_n.items()} for ph, by_n in phases.items()}
                for label, phases in self.requests.items()
            },
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> SweepFigures:
        return cls(
            side=str(raw["side"]),
            round=int(raw["round"]),
            run_id=str(raw["run_id"]),
            canary_ms={k: (float(v) if v is not None else None) for k, v in raw.get("canary_ms", {}).items()},
            injected_slowdown=float(raw.get("injected_slowdown", 0.0)),
            requests={
                label: {ph: {int(n): [float(x) for x in v] for n, v in by_n.items()} for ph, by_n in phases.items()}
                for label, phases in raw["requests"].items()
            },
        )


def sweep_figures(run_dir: Path, side: str, round_: int) -> SweepFigures:
    """Read one sweep's run folder into its figures."""
    runset = load_runs([run_dir])
    run = runset.runs[0]
    axes = list(runset.axes)
    requests: dict[str, dict[str, dict[int, list[float]]]] = {}
    for phase in PHASES:
        lat = request_latencies(runset.samples, phase, axes)
        for key, g in lat.groupby(axes, sort=True) if axes else [((), lat)]:
            values = key if isinstance(key, tuple) else (key,)
            label = config_label(dict(zip(axes, values, strict=True)))
            by_n = requests.setdefault(label, {}).setdefault(phase, {})
            for n, gn in g.groupby("text_tokens"):
                by_n[int(n)] = [float(x) for x in gn["latency_ms"]]
    slowdown = float((run.manifest.get("environment") or {}).get("injected_slowdown", 0.0))
    return SweepFigures(side, round_, run.run_id, requests, canary_ms(run.manifest), slowdown)


def night_order(rounds: int, rng: np.random.Generator) -> list[tuple[int, str]]:
    """(round, side) in the order to measure: both sides once per round, in a random order each round."""
    order: list[tuple[int, str]] = []
    for r in range(rounds):
        sides = list(SIDES)
        rng.shuffle(sides)
        order += [(r, s) for s in sides]
    return order


@dataclass(frozen=True)
class PairedVerdict:
    """One config and phase of an interleaved night."""

    label: str
    phase: str
    ratio: float  # geometric mean over rounds of tonight / baseline
    ci: tuple[float, float]
    round_ratios: list[float]
    normalized_ratio: float | None  # the same, each round divided by its canary ratio
    normalized_ci: tuple[float, float] | None
    flagged: bool
    normalized_flagged: bool | None

    def as_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "phase": self.phase,
            "ratio": round(self.ratio, 5),
            "ci": [round(x, 5) for x in self.ci],
            "round_ratios": [round(x, 5) for x in self.round_ratios],
            "normalized_ratio": None if self.normalized_ratio is None else round(self.normalized_ratio, 5),
            "normalized_ci": None if self.normalized_ci is None else [round(x, 5) for x in self.normalized_ci],
            "flagged": self.flagged,
            "normalized_flagged": self.normalized_flagged,
        }


def _rounds(sweeps: Sequence[SweepFigures]) -> list[tuple[SweepFigures, SweepFigures]]:
    by: dict[int, dict[str, SweepFigures]] = {}
    for s in sweeps:
        if s.side not in SIDES:
            raise EstimatorError(f"sweep {s.run_id}: side {s.side!r} is not one of {SIDES}")
        if s.side in by.setdefault(s.round, {}):
            raise EstimatorError(f"round {s.round} has two {s.side} sweeps")
        by[s.round][s.side] = s
    pairs = [(d["baseline"], d["tonight"]) for _, d in sorted(by.items()) if len(d) == 2]
    if not pairs:
        raise EstimatorError("no round has both a baseline and a tonight sweep")
    return pairs


def _log_ratio(base: Mapping[int, np.ndarray], new: Mapping[int, np.ndarray]) -> float:
    return float(np.mean([math.log(np.median(new[n]) / np.median(base[n])) for n in base]))


def paired_verdicts(
    sweeps: Sequence[SweepFigures],
    tolerance: float = 0.05,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[PairedVerdict]:
    """Per config and phase both sides measured in every complete round: the night's paired ratio, its two-level
    bootstrap interval, the canary-normalized twin and the flags (module docstring)."""
    pairs = _rounds(sweeps)
    rng = np.random.default_rng(seed)
    alpha = (1.0 - confidence) / 2.0
    out: list[PairedVerdict] = []
    labels = sorted(set.intersection(*(set(b.requests) & set(t.requests) for b, t in pairs)))
    for label in labels:
        for phase in PHASES:
            rounds: list[tuple[dict[int, np.ndarray], dict[int, np.ndarray]]] = []
            for b, t in pairs:
                bp, tp = b.requests[label].get(phase, {}), t.requests[label].get(phase, {})
                common = sorted(n for n in set(bp) & set(tp) if bp[n] and tp[n])
                if common:
                    rounds.append(({n: np.asarray(bp[n]) for n in common}, {n: np.asarray(tp[n]) for n in common}))
            if len(rounds) != len(pairs):
                continue
            logs = np.array([_log_ratio(b, t) for b, t in rounds])
            boot = np.empty(n_boot)
            for i in range(n_boot):
                picked = rng.integers(0, len(rounds), len(rounds))
                total = 0.0
                for j in picked:
                    base, new = rounds[j]
                    total += float(
                        np.mean(
                            [
                                math.log(np.median(rng.choice(new[n], len(new[n]))))
                                - math.log(np.median(rng.choice(base[n], len(base[n]))))
                                for n in base
                            ]
                        )
                    )
                boot[i] = total / len(picked)
            lo, hi = np.quantile(boot, [alpha, 1 - alpha])
            ratio = float(math.exp(logs.mean()))
            ci = (float(math.exp(lo)), float(math.exp(hi)))
            canary = [(b.canary_ms.get(phase), t.canary_ms.get(phase)) for b, t in pairs]
            norm, norm_ci, norm_flag = None, None, None
            if all(cb and ct for cb, ct in canary):
                shift = float(np.mean([math.log(ct / cb) for cb, ct in canary if cb and ct]))
                # the canary's shift is one number per night: subtract its mean (its own noise is small beside
                # the engine's: ~0.75 s of passes per timing, docs/nightly.md)
                norm = ratio / math.exp(shift)
                norm_ci = (ci[0] / math.exp(shift), ci[1] / math.exp(shift))
                norm_flag = norm > 1 + tolerance and norm_ci[0] > 1
            out.append(
                PairedVerdict(
                    label,
                    phase,
                    ratio,
                    ci,
                    [float(math.exp(x)) for x in logs],
                    norm,
                    norm_ci,
                    ratio > 1 + tolerance and ci[0] > 1,
                    norm_flag,
                )
            )
    return out


# ---------------------------------------------------------------- the nightly's interleaved night


def baseline_settings(spec: NightlySpec) -> dict[str, Any]:
    """What an accepted night records so that a later night can measure the same settings again."""
    return {"spec_name": spec.spec.name, "spec_text": spec.spec.read_text(), "profile_args": list(spec.profile_args)}


@dataclass
class InterleavedNight:
    """The sweeps of one interleaved night. `tonight` (round 0's tonight sweep, named by the night's run id) is the
    run the nightly trains, records and reports; `verdicts` are the paired rounds' (empty when no round is whole)."""

    tonight: SweepOutcome
    order: list[str]
    sweeps: list[SweepFigures]
    failed: list[str]
    verdicts: list[PairedVerdict]

    def as_json(self) -> dict[str, Any]:
        return {
            "rounds": len({s.round for s in self.sweeps}),
            "order": self.order,
            "runs": [s.run_id for s in self.sweeps],
            "failed": self.failed,
            "verdicts": [v.as_json() for v in self.verdicts],
        }


def run_interleaved(
    spec: NightlySpec,
    run_id: str,
    settings: Mapping[str, Any],
    say: Callable[[str], None],
    tonight_env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
) -> InterleavedNight:
    """`spec.interleave` rounds of the accepted `settings` and tonight's spec, in a random order per round, each a
    fresh `profile sweep --canary` (a folder a killed night left is measured again from nothing); then the paired
    verdicts. Neither side inherits an injected slowdown (`SLOWDOWN_ENV`); tonight's sweeps run with `tonight_env`
    added (the detection study's injection). `log_dir`: each sweep's output to `<log_dir>/<name>.log`."""
    folder = spec.state_dir / "interleave"
    folder.mkdir(parents=True, exist_ok=True)
    base_spec = folder / f"{run_id}-baseline{Path(str(settings['spec_name'])).suffix}"
    base_spec.write_text(str(settings["spec_text"]))
    sides = {
        "baseline": spec.model_copy(update={"spec": base_spec, "profile_args": list(settings["profile_args"])}),
        "tonight": spec,
    }
    order = night_order(spec.interleave, np.random.default_rng(zlib.crc32(run_id.encode())))
    sweeps: list[SweepFigures] = []
    failed: list[str] = []
    tonight: SweepOutcome | None = None
    clean = {k: v for k, v in os.environ.items() if k != SLOWDOWN_ENV}
    envs = {"baseline": clean, "tonight": {**clean, **(tonight_env or {})}}
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    for r, side in order:
        name = run_id if (r, side) == (0, "tonight") else f"{run_id}-r{r}-{side}"
        say(f"interleaved round {r + 1}/{spec.interleave}: {side}")
        stale = spec.state_dir / "runs" / name
        if stale.is_dir():  # each round is a fresh engine start: never resume a sweep a killed night began
            shutil.rmtree(stale)
        log = log_dir / f"{name}.log" if log_dir is not None else None
        outcome = run_sweep(sides[side], name, say, env=envs[side], log=log)
        if name == run_id:
            tonight = outcome
        if outcome.returncode != 0 or not (outcome.run_dir / "manifest.json").is_file():
            failed.append(f"{name} (exit {outcome.returncode})")
            continue
        sweeps.append(sweep_figures(outcome.run_dir, side, r))
    assert tonight is not None  # round 0 always holds a tonight sweep
    try:
        verdicts = paired_verdicts(sweeps, spec.tolerance, spec.confidence, spec.bootstrap, spec.seed)
    except EstimatorError:
        verdicts = []
    return InterleavedNight(tonight, [f"{r}:{s}" for r, s in order], sweeps, failed, verdicts)
