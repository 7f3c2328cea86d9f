"""`estimate serve`'s HTTP face: llm-d's latency-predictor API, a native endpoint, the actuals' ingest, health and
Prometheus metrics, over Starlette (the `serve` extra: no vLLM needed).

Endpoints (JSON in and out; every error is a 4xx with {"detail": one line}, and the server goes on serving):
- POST /predict, /predict/bulk: llm-d's request and response fields (`LlmdFeatures`; predictor.py LLMD_MAPPING);
- POST /v1/predict: the contract's declared request and the engine's state (`parse_declared`, `parse_held`),
  optionally its true output length and the config the caller expects (refused when it is not the one served);
- POST /v1/actuals: a measured request (the same, plus `output_tokens`, `ttft_ms`, `tpot_ms`): paired with its
  prediction, it moves the online level;
- GET /healthz, GET /metrics (Prometheus text: predictions, their latency, errors, the level, the drift).

No endpoint takes a path: the server reads only its model (and calibration, lengths) folders, at start-up.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract.policy import Held
from contract.request import Declared
from estimator.errors import one_line_validation_error
from estimator.serve.predictor import PredictError, Predictor

MAX_BODY_BYTES = 1 << 20  # a larger body is refused (413) before it is parsed
MAX_BULK = 10_000  # candidates in one /predict/bulk
MAX_HELD = 4_096  # requests in one engine state
MAX_COUNT = 100_000  # waiting or running requests in llm-d's features
BUCKETS_MS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 100.0, math.inf)


class LlmdFeatures(BaseModel):
    """llm-d's /predict request. Unknown fields are ignored (as llm-d's own server does), missing ones refused."""

    model_config = ConfigDict(extra="ignore")

    kv_cache_percentage: float = Field(ge=0.0, le=1.0)  # a fraction of the KV cache in use, not a percent
    input_token_length: int = Field(ge=1)
    num_request_waiting: int = Field(ge=0, le=MAX_COUNT)
    num_request_running: int = Field(ge=0, le=MAX_COUNT)
    num_tokens_generated: int = Field(ge=0)
    prefix_cache_score: float = Field(default=0.0, ge=0.0, le=1.0)


class LlmdBulk(BaseModel):
    model_config = ConfigDict(extra="ignore")

    requests: list[dict[str, Any]] = Field(max_length=MAX_BULK)


class BadRequest(Exception):
    """A request the server refuses: its HTTP status and a one-line `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# The native endpoints' bodies are parsed by hand into the contract's own types (contract/request.py `Declared`,
# contract/policy.py `Held`): the request lengths are declared there and nowhere else.
DECLARED_KEYS = {"request_id", "text_tokens", "max_tokens", "client_class"}
HELD_KEYS = DECLARED_KEYS | {"computed_tokens", "outputs", "running", "arrived_s_ago", "output_tokens"}
MAX_TOKENS = 10_000_000  # beyond any engine's max_model_len: a larger count is refused as absurd


def _object(data: Any, where: str, required: set[str], allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise BadRequest(422, f"{where}: expected a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(422, f"{where}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(required - set(data))
    if missing:
        raise BadRequest(422, f"{where}: missing field(s) {', '.join(missing)}")
    return data


def _count(data: dict[str, Any], key: str, where: str, minimum: int, default: int | None = None) -> int | None:
    v = data.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= MAX_TOKENS:
        raise BadRequest(422, f"{where}.{key}: expected an integer in [{minimum}, {MAX_TOKENS}], got {v!r}")
    return v


def _number(data: dict[str, Any], key: str, where: str, low: float, high: float, default: float | None = None
            ) -> float | None:
    v = data.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not low <= v <= high:
        raise BadRequest(422, f"{where}.{key}: expected a number in [{low:g}, {high:g}], got {v!r}")
    return float(v)


def parse_declared(data: Any, where: str, allowed: set[str] = DECLARED_KEYS) -> Declared:
    """A declared request from its JSON object (`request_id`, `text_tokens`, `max_tokens`, `client_class`)."""
    d = _object(data, where, {"text_tokens", "max_tokens"}, allowed)
    label = d.get("client_class")
    if label is not None and not isinstance(label, str):
        raise BadRequest(422, f"{where}.client_class: expected a string, got {label!r}")
    return Declared(str(d.get("request_id", "new")), 0.0, _count(d, "text_tokens", where, 1) or 1,
                    _count(d, "max_tokens", where, 1) or 1, label)


def parse_held(items: Any, where: str = "held") -> tuple[list[Held], list[int | None]]:
    """The engine's state (in its order): each held request, and its total output length where the caller knows it."""
    if not isinstance(items, list) or len(items) > MAX_HELD:
        raise BadRequest(422, f"{where}: expected a list of at most {MAX_HELD} requests")
    held, totals = [], []
    for k, item in enumerate(items):
        at = f"{where}[{k}]"
        declared = parse_declared(item, at, HELD_KEYS)
        running = item.get("running", False)
        if not isinstance(running, bool):
            raise BadRequest(422, f"{at}.running: expected true or false, got {running!r}")
        held.append(Held(declared, 0, _number(item, "arrived_s_ago", at, 0.0, 86_400.0, 0.0) or 0.0,
                         _count(item, "computed_tokens", at, 0, 0) or 0, _count(item, "outputs", at, 0, 0) or 0,
                         running))
        totals.append(_count(item, "output_tokens", at, 1))
    return held, totals


class Metrics:
    """Counters and latency histograms per endpoint, as Prometheus text."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list[int]] = {}
        self.sum_ms: dict[str, float] = {}

    def observe(self, endpoint: str, status: int, ms: float) -> None:
        self.counts[(endpoint, status)] = self.counts.get((endpoint, status), 0) + 1
        h = self.hist.setdefault(endpoint, [0] * len(BUCKETS_MS))
        for i, b in enumerate(BUCKETS_MS):
            if ms <= b:
                h[i] += 1
        self.sum_ms[endpoint] = self.sum_ms.get(endpoint, 0.0) + ms

    def text(self, predictor: Predictor) -> str:
        out = ["# HELP estimate_serve_requests_total HTTP requests answered, by endpoint and status.",
               "# TYPE estimate_serve_requests_total counter"]
        for (ep, status), n in sorted(self.counts.items()):
            out.append(f'estimate_serve_requests_total{{endpoint="{ep}",status="{status}"}} {n}')
        out += ["# HELP estimate_serve_request_seconds Time to answer a request inside the server.",
                "# TYPE estimate_serve_request_seconds histogram"]
        for ep, h in sorted(self.hist.items()):
            for b, n in zip(BUCKETS_MS, h, strict=True):
                le = "+Inf" if math.isinf(b) else f"{b / 1e3:g}"
                out.append(f'estimate_serve_request_seconds_bucket{{endpoint="{ep}",le="{le}"}} {n}')
            out.append(f'estimate_serve_request_seconds_sum{{endpoint="{ep}"}} {self.sum_ms[ep] / 1e3:.6f}')
            out.append(f'estimate_serve_request_seconds_count{{endpoint="{ep}"}} {h[-1]}')
        drift = predictor.drift()
        out += ["# HELP estimate_serve_level Iteration-time multiplier now (calibration, moved by each actual).",
                "# TYPE estimate_serve_level gauge", f"estimate_serve_level {predictor.level:.6f}",
                "# HELP estimate_serve_actuals_total Actuals ingested.", "# TYPE estimate_serve_actuals_total counter",
                f"estimate_serve_actuals_total {predictor.actuals}",
                "# HELP estimate_serve_drift_pct Error of the predictions paired with the last actuals "
                "(predicted - measured) / measured, %: mape (mean absolute) and bias (mean signed).",
                "# TYPE estimate_serve_drift_pct gauge"]
        for name in ("ttft", "tpot"):
            for stat in ("mape", "bias"):
                v = drift[f"{name}_{stat}_pct"]
                out.append(f'estimate_serve_drift_pct{{metric="{name}",stat="{stat}"}} '
                           f'{"NaN" if math.isnan(v) else f"{v:.4f}"}')
        out.append(f"estimate_serve_drift_pairs {int(drift['pairs'])}")
        return "\n".join(out) + "\n"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


def build_app(predictor: Predictor) -> Any:
    """The Starlette application serving `predictor`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    metrics = Metrics()
    loaded = _iso(predictor.loaded_at)

    async def body(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(413, f"request body of {len(raw)} bytes is over {MAX_BODY_BYTES}")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(400, f"malformed JSON: {exc}") from None

    def parse(model: type[BaseModel], data: Any) -> Any:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise BadRequest(422, one_line_validation_error(exc)) from None

    def llmd_one(f: LlmdFeatures) -> dict[str, Any]:
        ttft, tpot = predictor.llmd(f.kv_cache_percentage, f.input_token_length, f.num_request_waiting,
                                    f.num_request_running, f.num_tokens_generated, f.prefix_cache_score)
        return {"ttft_ms": ttft, "tpot_ms": tpot, "predicted_at": _iso(time.time()), "model_type": "iteration-replica",
                "objective_type": "mean", "quantile": None, "last_model_load": loaded}

    def check_config(given: dict[str, Any] | None) -> None:
        if given is None:
            return
        differs = {k: v for k, v in given.items() if predictor.config.get(k) != v}
        if differs:
            raise BadRequest(422, f"config {differs} is not the one served ({predictor.config}): never trained on it")

    def handler(name: str, fn: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                out = await fn(request)
                resp: Response = out if isinstance(out, Response) else JSONResponse(out)
            except BadRequest as exc:
                resp = JSONResponse({"detail": exc.detail}, status_code=exc.status)
            except PredictError as exc:
                resp = JSONResponse({"detail": str(exc)}, status_code=422)
            metrics.observe(name, resp.status_code, (time.perf_counter() - t0) * 1e3)
            return resp

        return endpoint

    async def predict(request: Request) -> Any:
        return llmd_one(parse(LlmdFeatures, await body(request)))

    async def bulk(request: Request) -> Any:
        t0 = time.perf_counter()
        batch = parse(LlmdBulk, await body(request))
        predictions: list[dict[str, Any] | None] = []
        errors = []
        for i, item in enumerate(batch.requests):
            try:
                predictions.append(llmd_one(parse(LlmdFeatures, item)))
            except (BadRequest, PredictError) as exc:
                predictions.append(None)
                errors.append({"index": i, "error": getattr(exc, "detail", str(exc))})
        return {"predictions": predictions, "errors": errors, "total_requests": len(batch.requests),
                "successful_predictions": len(batch.requests) - len(errors), "failed_predictions": len(errors),
                "processing_time_ms": (time.perf_counter() - t0) * 1e3}

    async def native(request: Request) -> Any:
        q = _object(await body(request), "body", {"request"}, {"request", "held", "output_tokens", "config"})
        config = q.get("config")
        if config is not None and not isinstance(config, dict):
            raise BadRequest(422, f"config: expected a JSON object, got {config!r}")
        check_config(config)
        held, totals = parse_held(q.get("held", []))
        got = predictor.native(parse_declared(q["request"], "request"), held, _count(q, "output_tokens", "body", 1),
                               totals)
        return {**got.as_json(), "level": predictor.level, "config": predictor.config, "source": predictor.source}

    async def actuals(request: Request) -> Any:
        a = _object(await body(request), "body", {"request", "output_tokens", "ttft_ms"},
                    {"request", "held", "output_tokens", "ttft_ms", "tpot_ms"})
        held, totals = parse_held(a.get("held", []))
        ttft = _number(a, "ttft_ms", "body", 1e-6, 3.6e6)
        assert ttft is not None  # required above
        pair = predictor.ingest(parse_declared(a["request"], "request"), held, _count(a, "output_tokens", "body", 1)
                                or 1, ttft, _number(a, "tpot_ms", "body", 0.0, 3.6e6), totals)
        return {**{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in pair.items()},
                "drift": {k: (None if math.isnan(v) else v) for k, v in predictor.drift().items()}}

    async def healthz(request: Request) -> Any:
        return {"status": "ok", "model": str(predictor.model_dir), "config": predictor.config,
                "level": predictor.level, "source": predictor.source, "last_model_load": loaded}

    async def prom(request: Request) -> Any:
        return PlainTextResponse(metrics.text(predictor), media_type="text/plain; version=0.0.4")

    routes = [Route("/predict", handler("predict", predict), methods=["POST"]),
              Route("/predict/bulk", handler("predict_bulk", bulk), methods=["POST"]),
              Route("/v1/predict", handler("native", native), methods=["POST"]),
              Route("/v1/actuals", handler("actuals", actuals), methods=["POST"]),
              Route("/healthz", handler("healthz", healthz), methods=["GET"]),
              Route("/metrics", prom, methods=["GET"])]
    return Starlette(routes=routes)
