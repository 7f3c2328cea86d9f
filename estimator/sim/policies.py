"""Scheduling by predicted latency: the `estimate` and `estimate-admit` arrival policies (contract/policy.py).

Registered in pyproject.toml under `contract.policy.ENTRY_POINT_GROUP`, so the harness's replay finds them by name
(`profile replay --policy estimate --policy-model MODEL`) without importing the estimator.

- `estimate`: priority = the request's predicted end-to-end latency alone (µs): the request by itself through the
  scheduler replica and the iteration model. Shortest predicted first.
- `estimate-admit`: the same priority; and the replica is run from the engine's state at the arrival (the held
  requests with their computed tokens and outputs, running or waiting, and the new one in its priority place):
  a request whose predicted TTFT or end-to-end latency misses its SLO is rejected at arrival. The SLO of a
  request is its class's (`slo`: `MIN_PROMPT:TTFT_MS:TPOT_MS` entries; the class with the highest MIN_PROMPT not
  above its prompt), and its end-to-end limit is TTFT + TPOT × (outputs − 1).

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
from estimator.sim.scheduler import EngineConfig, InEngine, IterationFn, SimulationError, simulate
from estimator.sim.workload import Overheads, engine_config_from_manifest, iteration_fn


def parse_slo(entries: Sequence[str]) -> list[tuple[int, float, float]]:
    """`MIN_PROMPT:TTFT_MS:TPOT_MS` entries -> sorted (min_prompt, ttft_ms, tpot_ms); EstimatorError if malformed."""
    out = []
    for e in entries:
        parts = str(e).split(":")
        try:
            lo, ttft, tpot = int(parts[0]), float(parts[1]), float(parts[2])
            if len(parts) != 3 or lo < 0 or not ttft > 0 or not tpot > 0:
                raise ValueError
        except (ValueError, IndexError):
            raise EstimatorError(f"SLO {e!r}: expected MIN_PROMPT:TTFT_MS:TPOT_MS, e.g. 0:200:20") from None
        out.append((lo, ttft, tpot))
    if not out:
        raise EstimatorError("estimate-admit needs at least one SLO (MIN_PROMPT:TTFT_MS:TPOT_MS)")
    if min(lo for lo, _, _ in out) != 0:
        raise EstimatorError("the SLO classes must start at MIN_PROMPT 0 (every request needs one)")
    return sorted(out)


def as_predicted(declared: Declared, arrival_s: float, priority: int | None = None) -> Request:
    """A declared request as the replica runs it for a prediction: arriving at `arrival_s` on the replica's clock,
    generating its declared `max_tokens` (what a policy can know of its length)."""
    d = declared
    return Request.make(d.request_id, arrival_s, d.text_tokens, d.max_tokens,
                        priority=priority if priority is not None else d.priority)


class EstimatePolicy:
    """Shortest predicted request latency first (see the module docstring)."""

    name = "estimate"

    def __init__(self, model: str | Path, config: Mapping[str, Any] | None = None) -> None:
        self.folder = Path(model)
        self.model = IterationEstimator.load(self.folder)
        self.overheads = Overheads.load(self.folder)
        self.config: dict[str, Any] | None = dict(config) if config else None
        self.engine: EngineConfig | None = None
        self.fn: IterationFn | None = None

    def start(self, engine: Mapping[str, Any], config: Mapping[str, Any]) -> None:
        """Bind to the running engine's settings (read back) and the run's config (or the one given)."""
        self.engine = engine_config_from_manifest({"engine": dict(engine)}, policy="priority")
        cfg = self.config or {k: config[k] for k in self.model.meta.config_columns if k in config}
        self.config = cfg
        self.fn = iteration_fn(self.model, cfg)  # EstimatorError for a config the model was not trained on

    def _bound(self) -> tuple[EngineConfig, IterationFn]:
        if self.engine is None or self.fn is None:
            raise EstimatorError(f"policy {self.name}: start() was not called with the engine's settings")
        return self.engine, self.fn

    def alone_us(self, request: Declared) -> int:
        """The request's predicted end-to-end latency alone (µs), for its declared `max_tokens` outputs (a policy
        never sees the true length)."""
        engine, fn = self._bound()
        o = self.overheads
        run = simulate([as_predicted(request, 0.0)], engine, fn, o.iteration_ms, o.sequence_ms)
        return round(run.requests[0].token_times_s[-1] * 1e6 + o.request_ms * 1e3)

    def decide(self, request: Declared, held: Sequence[Held]) -> Decision:
        return Decision(priority=self.alone_us(request))


class EstimateAdmitPolicy(EstimatePolicy):
    """`estimate`, and admission by the predicted TTFT and end-to-end latency on the engine's current state."""

    name = "estimate-admit"

    def __init__(self, model: str | Path, slo: Sequence[str], config: Mapping[str, Any] | None = None) -> None:
        super().__init__(model, config)
        self.slo = parse_slo(slo)

    def limits_ms(self, text_tokens: int, max_tokens: int) -> tuple[float, float]:
        """(TTFT, end-to-end) limits of a request's class, ms, for `max_tokens` outputs."""
        _, ttft, tpot = [c for c in self.slo if c[0] <= text_tokens][-1]
        return ttft, ttft + tpot * max(max_tokens - 1, 0)

    def predict_ms(self, request: Declared, priority: int, held: Sequence[Held]) -> tuple[float, float]:
        """The request's predicted TTFT and end-to-end latency (ms) if admitted now (each request generating its
        declared `max_tokens`)."""
        engine, fn = self._bound()
        o = self.overheads
        state = [
            InEngine(as_predicted(h.request, -h.arrived_s_ago, h.priority), h.computed_tokens, h.outputs, h.running)
            for h in held if h.outputs < h.request.max_tokens
        ]
        new = as_predicted(request, 0.0, priority)
        try:
            run = simulate([new], engine, fn, o.iteration_ms, o.sequence_ms, in_engine=state)
        except SimulationError as exc:
            raise EstimatorError(str(exc)) from None
        times = run.requests[0].token_times_s
        return times[0] * 1e3 + o.request_ms, times[-1] * 1e3 + o.request_ms

    def decide(self, request: Declared, held: Sequence[Held]) -> Decision:
        priority = self.alone_us(request)
        ttft, e2e = self.predict_ms(request, priority, held)
        lim_ttft, lim_e2e = self.limits_ms(request.text_tokens, request.max_tokens)
        if ttft > lim_ttft:
            return Decision(priority, False, f"predicted TTFT {ttft:.0f} ms > SLO {lim_ttft:.0f} ms")
        if e2e > lim_e2e:
            return Decision(priority, False, f"predicted end-to-end {e2e:.0f} ms > SLO {lim_e2e:.0f} ms")
        return Decision(priority)
