"""Scheduling by predicted latency: the `estimate` and `estimate-admit` arrival policies (contract/policy.py).

Registered in pyproject.toml under `contract.policy.ENTRY_POINT_GROUP`, so the harness's replay finds them by name
(`profile replay --policy estimate --policy-model MODEL`) without importing the estimator.

- `estimate`: priority = the request's predicted end-to-end latency alone (µs): the request by itself through the
  scheduler replica and the iteration model. Shortest predicted first. Its output length is not known at arrival:
  with `lengths` (a training trace, estimator/sim/lengths.py) the policy predicts it from what the client declared
  (class label, prompt bucket, cap; `length_stat` mean or a quantile), else it assumes the declared `max_tokens`.
- `estimate-admit`: the same priority; and the replica is run from the engine's state at the arrival (the held
  requests with their computed tokens and outputs, running or waiting, and the new one in its priority place):
  a request whose predicted TTFT or end-to-end latency misses its SLO is rejected at arrival. The SLO of a
  request is its class's (`slo`: `CLASS:TTFT_MS:TPOT_MS` entries for a declared class label, else
  `MIN_PROMPT:TTFT_MS:TPOT_MS` entries, the one with the highest MIN_PROMPT not above its prompt), and its
  end-to-end limit is TTFT + TPOT × (predicted outputs − 1). Held requests run to their predicted lengths given
  the tokens they have produced.

Both use the model's serving overheads (`serving.json`, when the model has one) as `estimate simulate` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from contract.policy import Decision, Held
from contract.request import Declared, Request
from estimator.errors import EstimatorError
from estimator.model.iteration import IterationEstimator
from estimator.sim.lengths import OutputLengths
from estimator.sim.scheduler import EngineConfig, InEngine, IterationFn, SimulationError, simulate
from estimator.sim.workload import Overheads, engine_config_from_manifest, iteration_fn


def parse_slo(entries: Sequence[str]) -> list[tuple[int | str, float, float]]:
    """`MIN_PROMPT:TTFT_MS:TPOT_MS` or `CLASS:TTFT_MS:TPOT_MS` entries -> (min_prompt or class label, ttft_ms,
    tpot_ms), prompt entries sorted first; EstimatorError if malformed. A request whose declared class has an
    entry takes it; any other takes the prompt entry with the highest MIN_PROMPT not above its prompt."""
    out: list[tuple[int | str, float, float]] = []
    for e in entries:
        parts = str(e).split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            key: int | str = int(parts[0]) if parts[0].strip().lstrip("-").isdigit() else parts[0].strip()
            ttft, tpot = float(parts[1]), float(parts[2])
            if key == "" or (isinstance(key, int) and key < 0) or not ttft > 0 or not tpot > 0:
                raise ValueError
        except ValueError:
            raise EstimatorError(f"SLO {e!r}: expected MIN_PROMPT:TTFT_MS:TPOT_MS or CLASS:TTFT_MS:TPOT_MS, "
                                 "e.g. 0:200:20 or chat:200:20") from None
        out.append((key, ttft, tpot))
    if not out:
        raise EstimatorError("estimate-admit needs at least one SLO (MIN_PROMPT:TTFT_MS:TPOT_MS)")
    prompts = sorted((e for e in out if isinstance(e[0], int)), key=lambda e: e[0])
    if prompts and prompts[0][0] != 0:
        raise EstimatorError("the SLO classes must start at MIN_PROMPT 0 (every request needs one)")
    return [*prompts, *(e for e in out if isinstance(e[0], str))]


def as_predicted(declared: Declared, arrival_s: float, priority: int | None = None,
                 outputs: int | None = None) -> Request:
    """A declared request as the replica runs it for a prediction: arriving at `arrival_s` on the replica's clock,
    generating `outputs` tokens (a predicted length), or its declared `max_tokens` when none is given."""
    d = declared
    return Request.make(d.request_id, arrival_s, d.text_tokens, outputs or d.max_tokens, max_tokens=max(
        d.max_tokens, outputs or 0), priority=priority if priority is not None else d.priority)


def engine_state(held: Sequence[Held], totals: Sequence[int]) -> list[InEngine]:
    """The replica's starting state from what the engine holds: each held request that has produced fewer tokens
    than the total it is assumed to generate (`totals[i]`: predicted, or known), in the engine's order."""
    return [InEngine(as_predicted(h.request, -h.arrived_s_ago, h.priority, n), h.computed_tokens, h.outputs,
                     h.running) for h, n in zip(held, totals, strict=True) if h.outputs < n]


class EstimatePolicy:
    """Shortest predicted request latency first (see the module docstring)."""

    name = "estimate"

    def __init__(self, model: str | Path, config: Mapping[str, Any] | None = None, lengths: str | Path | None = None,
                 length_stat: str = "mean") -> None:
        self.folder = Path(model)
        self.model = IterationEstimator.load(self.folder)
        self.overheads = Overheads.load(self.folder)
        self.config: dict[str, Any] | None = dict(config) if config else None
        self.lengths = OutputLengths.from_file(lengths, length_stat) if lengths else None
        self.engine: EngineConfig | None = None
        self.fn: IterationFn | None = None
        self._alone: dict[tuple[int, int], int] = {}

    def start(self, engine: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Bind to the running engine's settings (read back) and the run's config (or the one given)."""
        self.engine = engine_config_from_manifest({"engine": dict(engine)}, policy="priority")
        cfg = self.config or {k: config[k] for k in self.model.meta.config_columns if k in config}
        self.config = cfg
        self.fn = iteration_fn(self.model, cfg)  # EstimatorError for a config the model was not trained on
        self._alone = {}

    def _bound(self) -> tuple[EngineConfig, IterationFn]:
        if self.engine is None or self.fn is None:
            raise EstimatorError(f"policy {self.name}: start() was not called with the engine's settings")
        return self.engine, self.fn

    def outputs(self, request: Declared, produced: int = 0) -> int:
        """The output length the policy assumes for a request that has produced `produced` tokens: the learned
        prediction (estimator/sim/lengths.py) where the policy has a training trace, else the declared cap."""
        if self.lengths is None:
            return request.max_tokens
        return self.lengths.predict(request, produced)

    def alone_us(self, request: Declared) -> int:
        """The request's predicted end-to-end latency alone (µs), for its predicted output length (or its declared
        `max_tokens`; a policy never sees the true length). Kept per (prompt, outputs): the same answer again."""
        engine, fn = self._bound()
        n = self.outputs(request)
        key = (request.text_tokens, n)
        if key not in self._alone:
            o = self.overheads
            run = simulate([as_predicted(request, 0.0, outputs=n)], engine, fn, o.iteration_ms, o.sequence_ms)
            self._alone[key] = round(run.requests[0].token_times_s[-1] * 1e6 + o.request_ms * 1e3)
        return self._alone[key]

    def decide(self, request: Declared, held: Sequence[Held]) -> Decision:
        return Decision(priority=self.alone_us(request))


class EstimateAdmitPolicy(EstimatePolicy):
    """`estimate`, and admission by the predicted TTFT and end-to-end latency on the engine's current state."""

    name = "estimate-admit"

    def __init__(self, model: str | Path, slo: Sequence[str], config: Mapping[str, Any] | None = None,
                 lengths: str | Path | None = None, length_stat: str = "mean") -> None:
        super().__init__(model, config, lengths, length_stat)
        self.slo = parse_slo(slo)

    def limits_ms(self, request: Declared, outputs: int) -> tuple[float, float]:
        """(TTFT, end-to-end) limits of a request's class, ms, for `outputs` generated tokens: its declared
        class's entry, else the prompt entry for its length."""
        found = [c for c in self.slo if c[0] == request.client_class] or [
            c for c in self.slo if isinstance(c[0], int) and c[0] <= request.text_tokens][-1:]
        if not found:
            raise EstimatorError(f"no SLO for class {request.client_class!r} and no prompt-length SLO entry")
        _, ttft, tpot = found[0]
        return ttft, ttft + tpot * max(outputs - 1, 0)

    def predict_ms(self, request: Declared, priority: int, held: Sequence[Held]) -> tuple[float, float]:
        """The request's predicted TTFT and end-to-end latency (ms) if admitted now (each request generating its
        predicted output length, a held one given the tokens it has already produced)."""
        engine, fn = self._bound()
        o = self.overheads
        state = engine_state(held, [self.outputs(h.request, h.outputs) for h in held])
        new = as_predicted(request, 0.0, priority, self.outputs(request))
        try:
            run = simulate([new], engine, fn, o.iteration_ms, o.sequence_ms, in_engine=state)
        except SimulationError as exc:
            raise EstimatorError(str(exc)) from None
        times = run.requests[0].token_times_s
        return times[0] * 1e3 + o.request_ms, times[-1] * 1e3 + o.request_ms

    def decide(self, request: Declared, held: Sequence[Held]) -> Decision:
        priority = self.alone_us(request)
        ttft, e2e = self.predict_ms(request, priority, held)
        lim_ttft, lim_e2e = self.limits_ms(request, self.outputs(request))
        if ttft > lim_ttft:
            return Decision(priority, False, f"predicted TTFT {ttft:.0f} ms > SLO {lim_ttft:.0f} ms")
        if e2e > lim_e2e:
            return Decision(priority, False, f"predicted end-to-end {e2e:.0f} ms > SLO {lim_e2e:.0f} ms")
        return Decision(priority)
