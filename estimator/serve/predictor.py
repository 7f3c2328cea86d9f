"""What `estimate serve` answers: a request's TTFT, per-step and end-to-end latency on the engine's current state,
from the iteration model through the scheduler replica (estimator/sim/scheduler.py), and the paired error of the
actuals a router sends back.

Two ways to ask:
- **native** (`Predictor.native`): the contract's declared request (contract/request.py `Declared`) and the engine's
  state as the scheduler sees it (contract/policy.py `Held`: every request the engine holds, running or waiting,
  with its prompt tokens computed and outputs produced). One replica run from that state: exact for the model, a few
  hundred µs to a few ms (more with a long waiting queue).
- **llm-d** (`Predictor.llmd`): the aggregate features llm-d's latency-predictor sidecar takes. They do not say
  which requests the engine holds, so they are mapped onto a stand-in state (`LLMD_MAPPING`), and the replica's
  answer for that state is kept in a table keyed by the features rounded to a grid: the first call at a grid point
  runs the replica (twice: TTFT and TPOT), every later one is a dictionary lookup, and `warm()` fills the common grid
  at start-up. The prompt length is interpolated between its two grid neighbours.

The output length a request will generate is unknown at arrival: `output_tokens` where the caller knows it, else
the learned prediction (`--lengths`, estimator/sim/lengths.py), else the declared `max_tokens`.

**Level**: every iteration time is multiplied by the level (a calibration's, else 1). Each actual (`ingest`) moves
it: level x (measured TPOT / predicted TPOT) ** LEVEL_STEP, a geometric moving average, so the server follows the
engine it predicts (the online calibration). The table's entries are kept at level 1; a lookup scales their
engine-side part by the current level (`request_ms` is not scaled), an approximation that ignores how the level
moves the overheads' share.

**Drift**: each actual is paired with what the server predicts for it now (with its true output length), and the
error of the last DRIFT_WINDOW pairs is reported (`drift()`, and /metrics).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.policy import Held
from contract.request import Declared, Request
from estimator.errors import EstimatorError
from estimator.model.iteration import IterationEstimator
from estimator.sim.lengths import OutputLengths
from estimator.sim.policies import as_predicted, engine_state
from estimator.sim.scheduler import (
    EngineConfig,
    Frontend,
    InEngine,
    IterationFn,
    RequestTrace,
    SimulationError,
    simulate,
)
from estimator.sim.workload import Overheads, iteration_fn

LEVEL_STEP = 0.2  # how far one actual moves the level toward its own (geometric)
DRIFT_WINDOW = 200  # actuals the drift figures cover
TPOT_STEPS = 16  # decode steps the llm-d TPOT is averaged over
GRID_PER_OCTAVE = 4  # prompt-length grid points per doubling (llm-d table)
KV_STEPS = 4  # the table's KV-use grid: 0, 1/4, ..., 4/4 of the most the engine's running requests can hold
MAX_WAITING_TABLE = 64  # beyond this many waiting requests the table extrapolates linearly from 32 and 64

LLMD_MAPPING = """\
llm-d feature -> the replica's stand-in state:
- num_request_running R: min(R, max_num_seqs) running requests (any above max_num_seqs wait); each holds
  kv_cache_percentage x the engine's KV tokens / R as its context (at most max_model_len), and has half the typical
  output left; the table keeps KV use in KV_STEPS steps up to the most max_num_seqs requests can hold (above it,
  that most) and interpolates between them;
- num_request_waiting W: W waiting requests of the typical prompt and output length (the --lengths trace's means,
  else 256 and 64 tokens);
- input_token_length x (1 - prefix_cache_score): the new request's prompt tokens to compute (a prefix-cache hit
  skips its share);
- num_tokens_generated g: the TPOT's context grows by g tokens (the iteration model's per-context-token cost).
ttft_ms: the new request's first token in the replica from that state; tpot_ms: its mean step time over the next
16 steps. Both are the mean prediction (objective_type "mean", quantile null), not llm-d's p90."""


class PredictError(ValueError):
    """A request the predictor cannot answer (bad values, a config it was not trained on): a 4xx, one line."""


@dataclass(frozen=True)
class Answer:
    """One prediction (ms): TTFT (arrival to the first token at the client), of it the wait before the engine first
    schedules the request (`queue_ms`) and its prefill (first scheduled to first token, chunks included), the mean
    time per output token after it, end to end, each later token's gap, and the output length it assumed."""

    ttft_ms: float
    queue_ms: float
    prefill_ms: float
    tpot_ms: float
    e2e_ms: float
    step_ms: list[float]
    assumed_outputs: int  # the output length the prediction ran with (the request's true one where known)
    output_known: bool

    def as_json(self) -> dict[str, Any]:
        return {"ttft_ms": self.ttft_ms, "queue_ms": self.queue_ms, "prefill_ms": self.prefill_ms,
                "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms, "step_ms": self.step_ms,
                "output_tokens": self.assumed_outputs, "output_known": self.output_known}


class Predictor:
    """The served model: the iteration model of one config, the engine's limits, the serving overheads (or a
    calibration's front end and level), and the online level and drift."""

    def __init__(self, model_dir: Path, engine: EngineConfig, config: Mapping[str, Any], overheads: Overheads,
                 level: float = 1.0, frontend: Frontend | None = None, lengths: OutputLengths | None = None,
                 typical: tuple[int, int] = (256, 64), source: str = "offline model") -> None:
        self.model_dir = Path(model_dir)
        self.model = IterationEstimator.load(self.model_dir)
        self.config = dict(config)
        try:
            self.model.coefficients(self.config)
        except (EstimatorError, KeyError, ValueError) as exc:
            raise EstimatorError(f"config {self.config}: {exc}") from None
        engine.check()
        self.engine = engine
        self.overheads = overheads
        self.frontend = frontend
        self.lengths = lengths
        self.source = source
        self.loaded_at = time.time()
        self._lock = threading.Lock()
        self._level = level
        self._fn1 = iteration_fn(self.model, self.config)  # level 1: the table's entries
        self._fn = iteration_fn(self.model, self.config, level)  # the current level: native answers
        self._table: dict[tuple[int, int, int, int], tuple[float, float]] = {}
        self._pairs: deque[tuple[float, float, float, float]] = deque(maxlen=DRIFT_WINDOW)
        self.actuals = 0
        self.typical_prompt, self.typical_output = typical  # (prompt, output) tokens of the stand-in requests
        # the KV use (a fraction) at which the running requests are full: max_num_seqs x max_model_len tokens
        self.kv_full = min(1.0, engine.max_num_seqs * engine.max_model_len / (engine.num_blocks * engine.block_size))

    @property
    def level(self) -> float:
        return self._level

    # -- native ---------------------------------------------------------------------------------------------
    def outputs(self, request: Declared, produced: int = 0) -> int:
        return self.lengths.predict(request, produced) if self.lengths is not None else request.max_tokens

    def native(self, request: Declared, held: Sequence[Held], output_tokens: int | None = None,
               held_outputs: Sequence[int | None] | None = None) -> Answer:
        """The request's latency if it arrives now on the engine holding `held` (in its order; a held request
        generating `held_outputs[i]` tokens in all where known, else its predicted length)."""
        n = output_tokens or self.outputs(request)
        known = held_outputs or [None] * len(held)
        state = engine_state(held, [k or self.outputs(h.request, h.outputs) for h, k in zip(held, known, strict=True)])
        trace = self._run([as_predicted(request, 0.0, outputs=n)], state, self._fn)
        return self._answer(trace, n, output_tokens is not None)

    def _run(self, arrivals: list[Request], state: list[InEngine], fn: IterationFn) -> RequestTrace:
        o = self.overheads
        try:
            run = simulate(arrivals, self.engine, fn, o.iteration_ms, o.sequence_ms, in_engine=state,
                           frontend=self.frontend)
        except SimulationError as exc:
            raise PredictError(str(exc)) from None
        return run.requests[0]

    def _answer(self, trace: RequestTrace, n: int, known: bool) -> Answer:
        extra = self.overheads.request_ms
        times_s = trace.client_times_s
        ttft = times_s[0] * 1e3 + extra
        e2e = times_s[-1] * 1e3 + extra
        scheduled = trace.first_scheduled_s or 0.0
        steps = [(b - a) * 1e3 for a, b in zip(times_s, times_s[1:], strict=False)]
        tpot = (e2e - ttft) / (n - 1) if n > 1 else 0.0
        return Answer(ttft, scheduled * 1e3, (trace.token_times_s[0] - scheduled) * 1e3, tpot, e2e, steps, n, known)

    # -- llm-d ----------------------------------------------------------------------------------------------
    def llmd(self, kv_cache_percentage: float, input_token_length: int, num_request_waiting: int,
             num_request_running: int, num_tokens_generated: int, prefix_cache_score: float) -> tuple[float, float]:
        """(ttft_ms, tpot_ms) for llm-d's features (module docstring, LLMD_MAPPING)."""
        tokens = max(1, round(input_token_length * (1.0 - prefix_cache_score)))
        if tokens + 1 > self.engine.max_model_len or input_token_length + num_tokens_generated >= \
                self.engine.max_model_len:
            raise PredictError(f"input_token_length {input_token_length} (+ {num_tokens_generated} generated) "
                               f"exceeds the engine's max_model_len {self.engine.max_model_len}")
        lo, hi, w = grid_neighbours(tokens)
        at = min(kv_cache_percentage / self.kv_full, 1.0) * KV_STEPS  # on the KV grid, interpolated between steps
        kv_lo = min(int(at), KV_STEPS - 1)

        def cell(waiting: int) -> tuple[float, float]:
            return _lerp(self._interp(lo, hi, w, num_request_running, waiting, kv_lo),
                         self._interp(lo, hi, w, num_request_running, waiting, kv_lo + 1), at - kv_lo)

        if num_request_waiting <= MAX_WAITING_TABLE:
            ttft_1, tpot_1 = cell(num_request_waiting)
        else:  # linear in the waiting count beyond the table
            ttft_1, tpot_1 = _lerp(cell(32), cell(64), (num_request_waiting - 32) / 32)
        # the request's own context grows by the tokens generated: the model's cost per decode-context token
        ctx = input_token_length
        tpot_1 += self._fn1(0, 0.0, 1, ctx + num_tokens_generated, ctx + num_tokens_generated) - self._fn1(
            0, 0.0, 1, ctx, ctx)
        extra = self.overheads.request_ms
        return (ttft_1 - extra) * self._level + extra, tpot_1 * self._level

    def _interp(self, lo: int, hi: int, w: float, running: int, waiting: int, kv: int) -> tuple[float, float]:
        a = self._entry(lo, running, waiting, kv)
        return a if w == 0.0 else _lerp(a, self._entry(hi, running, waiting, kv), w)

    def _entry(self, tokens: int, running: int, waiting: int, kv: int) -> tuple[float, float]:
        """(TTFT ms with request_ms, TPOT ms) at level 1 for one grid point (a prompt length on the grid, the
        running and waiting counts, KV use in steps of kv_full / KV_STEPS): from the table, else the replica."""
        seqs = self.engine.max_num_seqs
        key = (tokens, min(running, seqs), waiting + max(running - seqs, 0), kv)
        found = self._table.get(key)
        if found is None:
            found = self._compute(*key)
            self._table[key] = found
        return found

    def _compute(self, tokens: int, running: int, waiting: int, kv: int) -> tuple[float, float]:
        e = self.engine
        remaining = max(self.typical_output // 2, 1)
        room = e.max_model_len - remaining - 1
        state = []
        if running:
            ctx = min(max(round(kv / KV_STEPS * self.kv_full * e.num_blocks * e.block_size / running), 1), room)
            for i in range(running):
                r = Request.make(f"run{i}", -1.0, ctx, remaining + 1)
                state.append(InEngine(r, ctx, 1, True))
        p = min(self.typical_prompt, e.max_model_len - self.typical_output)
        for i in range(waiting):
            state.append(InEngine(Request.make(f"wait{i}", -0.5, p, self.typical_output)))
        extra = self.overheads.request_ms
        first = self._run([Request.make("new", 0.0, tokens, 1)], state, self._fn1).client_times_s
        steps = self._run([Request.make("new", 0.0, tokens, TPOT_STEPS + 1)], state, self._fn1).client_times_s
        return first[0] * 1e3 + extra, (steps[-1] - steps[0]) * 1e3 / TPOT_STEPS

    def warm(self, waiting_max: int = 8) -> int:
        """Fill the table's common grid (every prompt grid point up to max_model_len / 2, running 0 to
        max_num_seqs, waiting 0 to `waiting_max`, every KV step): entries computed."""
        before = len(self._table)
        for g in (t for t in GRID if t <= self.engine.max_model_len // 2):
            for running in range(self.engine.max_num_seqs + 1):
                for waiting in range(waiting_max + 1):
                    for kv in range(KV_STEPS + 1):
                        self._entry(g, running, waiting, kv)
        return len(self._table) - before

    # -- actuals --------------------------------------------------------------------------------------------
    def ingest(self, request: Declared, held: Sequence[Held], output_tokens: int, ttft_ms: float,
               tpot_ms: float | None, held_outputs: Sequence[int | None] | None = None) -> dict[str, float]:
        """Pair one actual with the prediction for it (its true output length, the engine state it arrived on),
        move the level by its TPOT (module docstring) and return the pair and the new level."""
        with self._lock:
            got = self.native(request, held, output_tokens, held_outputs)
            before = self._level
            if tpot_ms is not None and tpot_ms > 0 and got.tpot_ms > 0:
                self._level = before * (tpot_ms / got.tpot_ms) ** LEVEL_STEP
                self._fn = iteration_fn(self.model, self.config, self._level)
            self._pairs.append((got.ttft_ms, ttft_ms, got.tpot_ms, tpot_ms if tpot_ms is not None else math.nan))
            self.actuals += 1
        return {"predicted_ttft_ms": got.ttft_ms, "actual_ttft_ms": ttft_ms, "predicted_tpot_ms": got.tpot_ms,
                "actual_tpot_ms": tpot_ms if tpot_ms is not None else math.nan,
                "ttft_error_pct": _pct(got.ttft_ms, ttft_ms),
                "tpot_error_pct": _pct(got.tpot_ms, tpot_ms) if tpot_ms else math.nan,
                "level_before": before, "level": self._level}

    def drift(self) -> dict[str, float]:
        """Over the last DRIFT_WINDOW actuals: mean absolute and mean signed % error (predicted vs measured) of TTFT
        and TPOT (nan before any), and their count."""
        pairs = list(self._pairs)
        out: dict[str, float] = {"pairs": float(len(pairs))}
        for name, k in (("ttft", 0), ("tpot", 2)):
            errs = [_pct(p[k], p[k + 1]) for p in pairs if p[k + 1] > 0]
            out[f"{name}_mape_pct"] = sum(abs(e) for e in errs) / len(errs) if errs else math.nan
            out[f"{name}_bias_pct"] = sum(errs) / len(errs) if errs else math.nan
        return out


def _lerp(a: tuple[float, float], b: tuple[float, float], f: float) -> tuple[float, float]:
    """(TTFT, TPOT) pairs: a + f · (b - a), f in [0, 1] between them, above 1 beyond b."""
    return a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1])


def _pct(predicted: float, actual: float) -> float:
    return (predicted - actual) / actual * 100.0


# the table's prompt lengths: GRID_PER_OCTAVE points per doubling, rounded (1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, ...)
GRID = sorted({max(1, round(2 ** (g / GRID_PER_OCTAVE))) for g in range(GRID_PER_OCTAVE * 24)})


def grid_neighbours(tokens: int) -> tuple[int, int, float]:
    """The grid's prompt lengths at or below and above `tokens`, and the linear weight toward the upper one."""
    hi = bisect.bisect_left(GRID, tokens)
    if hi >= len(GRID):
        raise PredictError(f"input_token_length {tokens} is beyond the table's grid ({GRID[-1]})")
    if GRID[hi] == tokens:
        return tokens, tokens, 0.0
    lo = GRID[hi - 1]
    return lo, GRID[hi], (tokens - lo) / (GRID[hi] - lo)


def load_predictor(model_dir: Path, calibration: Path | None = None, engine: Path | None = None,
                   config: Mapping[str, Any] | None = None, lengths: Path | None = None) -> Predictor:
    """The predictor `estimate serve` runs: a calibration's engine, config, overheads, front end and level where
    one is given; else the model's serving.json, the engine limits of `engine` (a run folder, or a JSON file with an
    `engine` object such as a scheduler study's setup.json) and `config` (AXIS=VALUE, or the model's only trained
    config). EstimatorError (one line) for anything missing or unreadable."""
    import json

    from contract.workload import WorkloadError, read_workload
    from estimator.data.runs import read_manifest
    from estimator.sim.workload import engine_config_from_manifest

    model = IterationEstimator.load(model_dir)
    learned, typical = None, (256, 64)
    if lengths is not None:  # read once: the lengths learned from it, and its typical request
        try:
            trace = read_workload(lengths)
        except WorkloadError as exc:
            raise EstimatorError(f"output-length training trace: {exc}") from None
        learned = OutputLengths.fit(trace)
        typical = (round(sum(r.text_tokens for r in trace) / len(trace)),
                   round(sum(r.output_tokens for r in trace) / len(trace)))
    if calibration is not None:
        from estimator.sim.calibrate import Calibration

        if engine is not None or config:
            raise EstimatorError("--calibration gives the engine and the config: drop --engine and --config")
        cal = Calibration.read(calibration)
        return Predictor(model_dir, cal.engine_config(), cal.config, cal.overheads(), cal.level, cal.frontend(),
                         learned, typical, f"calibration {calibration} (level {cal.level:.3f})")
    if engine is None:
        raise EstimatorError("give --engine (a run folder, or a JSON file with an `engine` object) or --calibration")
    if engine.is_dir():
        manifest = read_manifest(engine)
    else:
        try:
            manifest = json.loads(engine.read_text())
        except (OSError, ValueError) as exc:
            raise EstimatorError(f"--engine {engine}: unreadable ({exc})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("engine"), dict):
            raise EstimatorError(f"--engine {engine}: no `engine` object (a run folder or a scheduler setup.json)")
    eng = engine_config_from_manifest(manifest)
    if not config:
        trained = model.trained_configs
        if len(trained) != 1:
            raise EstimatorError(f"the model holds {len(trained)} configs: choose one with --config AXIS=VALUE "
                                 f"({trained})")
        config = trained[0]
    return Predictor(model_dir, eng, config, Overheads.load(model_dir), 1.0, None, learned, typical, "offline model")
