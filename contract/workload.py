"""Workloads: JSONL files of timed requests, read and checked line by line, or generated (Poisson or gamma arrivals).

Two formats, told apart by their keys:
- the project's: `{"arrival_s": 0.25, "text_tokens": 512, "new_tokens": 64}`, optionally `"prompt"` (text, cut to
  `text_tokens` with the model's tokenizer), `"priority"` (an integer, lower runs first: `profile replay --policy
  file`), `"max_tokens"` (the cap the client declares, >= `new_tokens`; default `new_tokens`) and `"client_class"`
  (a label the client sends). `new_tokens` is the true output length: what the engine generates (`ignore_eos`, the
  trace's stand-in for an EOS) and what no scheduling policy sees (contract/request.py);
- vLLM's timed trace, as `vllm bench serve --dataset-name timed_trace` replays it (vllm/benchmarks/datasets/
  datasets.py `TimedTrace`): `{"timestamp": 0.25, "input_length": 512, "output_length": 64, "hash_ids": [...]}`,
  `timestamp` in seconds, `hash_ids` one id per 16-token chunk (shared ids make shared prefixes).
Arrival times are seconds from the start. No vLLM here: a bad file fails before any engine starts.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract.request import Request

KEYS = {"arrival_s", "text_tokens", "new_tokens", "prompt", "priority", "max_tokens", "client_class"}
TRACE_KEYS = {"timestamp", "input_length", "output_length", "hash_ids"}
TRACE_CHUNK_TOKENS = 16  # vllm bench serve's --timed-trace-chunk-hash-size default


class WorkloadError(ValueError):
    """A workload file or generator argument that cannot be used; the message is one line."""


def workload_record(request: Request) -> dict[str, Any]:
    """One line of the project's workload format. `max_tokens` and `client_class` are written only where they say
    more than the old format did (a cap above the true length, a class), so an old workload is written back
    byte for byte."""
    out: dict[str, Any] = {
        "arrival_s": request.arrival_s,
        "text_tokens": request.text_tokens,
        "new_tokens": request.output_tokens,
    }
    if request.prompt is not None:
        out["prompt"] = request.prompt
    if request.priority is not None:
        out["priority"] = request.priority
    if request.max_tokens != request.output_tokens:
        out["max_tokens"] = request.max_tokens
    if request.client_class is not None:
        out["client_class"] = request.client_class
    return out


def _positive_int(line: int, data: dict[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise WorkloadError(f"{where} line {line}: {key} must be an integer, got {value!r}")
    if value <= 0:
        raise WorkloadError(f"{where} line {line}: {key} must be positive, got {value}")
    return value


def _seconds(line: int, data: dict[str, Any], key: str, where: str) -> int | float:
    """A line's time column (seconds): a finite number, or a one-line WorkloadError."""
    value = data.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise WorkloadError(f"{where} line {line}: {key} must be a finite number of seconds, got {value!r}")
    return value


def _in_order(line: int, key: str, value: int | float, previous: float, where: str) -> float:
    """`value` as the new previous time, or a one-line WorkloadError when it is earlier than `previous`."""
    if value < previous:
        raise WorkloadError(
            f"{where} line {line}: {key} {value} is earlier than the line before ({previous}); sort the file by {key}"
        )
    return float(value)


def _objects(text: str, where: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, JSON object) per non-blank line; a line that is not a JSON object is a WorkloadError."""
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise WorkloadError(f"{where} line {n}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
        if not isinstance(data, dict):
            raise WorkloadError(f"{where} line {n}: expected a JSON object, got {type(data).__name__}")
        yield n, data


def parse_workload(text: str, where: str = "workload", allow_trace: bool = False) -> list[Request]:
    """Parse JSONL text into requests; any problem is a one-line WorkloadError naming the line (1-based).

    Blank lines are skipped (they keep their line numbers). Arrival times must be finite, >= 0 and not
    decreasing; lengths positive integers. With `allow_trace`, a file whose first object has `timestamp` is read
    as vLLM's timed trace (every line then), its arrivals shifted so the first is at 0 s.
    """
    first = next((line for line in text.splitlines() if line.strip()), "")
    if allow_trace and first.lstrip().startswith("{") and '"timestamp"' in first:
        return _parse_trace(text, where)
    out: list[Request] = []
    previous = 0.0
    for n, data in _objects(text, where):
        unknown = sorted(set(data) - KEYS)
        if unknown:
            raise WorkloadError(f"{where} line {n}: unknown key(s) {', '.join(unknown)}; expected {sorted(KEYS)}")
        arrival = _seconds(n, data, "arrival_s", where)
        if arrival < 0:
            raise WorkloadError(f"{where} line {n}: arrival_s {arrival} is negative")
        previous = _in_order(n, "arrival_s", arrival, previous, where)
        text_tokens = _positive_int(n, data, "text_tokens", where)
        new_tokens = _positive_int(n, data, "new_tokens", where)
        prompt = data.get("prompt")
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise WorkloadError(f"{where} line {n}: prompt must be non-empty text")
        priority = data.get("priority")
        if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
            raise WorkloadError(f"{where} line {n}: priority must be an integer (lower runs first), got {priority!r}")
        max_tokens = _positive_int(n, data, "max_tokens", where) if "max_tokens" in data else new_tokens
        if max_tokens < new_tokens:
            raise WorkloadError(
                f"{where} line {n}: max_tokens {max_tokens} is below new_tokens {new_tokens} (the tokens the request "
                "generates cannot exceed the cap its client declares)"
            )
        client_class = data.get("client_class")
        if client_class is not None and (not isinstance(client_class, str) or not client_class.strip()):
            raise WorkloadError(f"{where} line {n}: client_class must be a non-empty label, got {client_class!r}")
        out.append(Request.numbered(n - 1, float(arrival), text_tokens, new_tokens, max_tokens=max_tokens,
                                    client_class=client_class, prompt=prompt, priority=priority))
    if not out:
        raise WorkloadError(f"{where}: no requests")
    return out


def _parse_trace(text: str, where: str) -> list[Request]:
    """vLLM's timed-trace JSONL (see the module docstring) as requests, arrivals from the first timestamp."""
    out: list[Request] = []
    previous: float | None = None
    start = 0.0
    for n, data in _objects(text, where):
        missing = sorted({"timestamp", "input_length", "output_length"} - set(data))
        if missing:
            raise WorkloadError(f"{where} line {n}: timed-trace line lacks {', '.join(missing)}")
        stamp = _seconds(n, data, "timestamp", where)
        if previous is None:
            start = previous = float(stamp)
        previous = _in_order(n, "timestamp", stamp, previous, where)
        text_tokens = _positive_int(n, data, "input_length", where)
        new_tokens = _positive_int(n, data, "output_length", where)
        out.append(Request.numbered(n - 1, round(float(stamp) - start, 6), text_tokens, new_tokens))
    if not out:
        raise WorkloadError(f"{where}: no requests")
    return out


def trace_record(request: Request, hash_offset: int) -> dict[str, Any]:
    """One timed-trace line for `vllm bench serve`: distinct hash ids per request (no shared prefix)."""
    chunks = -(-request.text_tokens // TRACE_CHUNK_TOKENS)
    return {
        "timestamp": request.arrival_s,
        "input_length": request.text_tokens,
        "output_length": request.output_tokens,
        "hash_ids": list(range(hash_offset, hash_offset + chunks)),
    }


def write_trace(path: Path, requests: list[Request]) -> None:
    """Write requests as vLLM's timed trace (one object per line, in order; prompts are not carried)."""
    lines, offset = [], 0
    for r in requests:
        record = trace_record(r, offset)
        offset += len(record["hash_ids"])
        lines.append(json.dumps(record) + "\n")
    path.write_text("".join(lines), encoding="utf-8")


def read_workload(path: Path, allow_trace: bool = False) -> list[Request]:
    """Read and check a workload file (see parse_workload)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkloadError(f"cannot read workload file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise WorkloadError(f"workload file {path} is not UTF-8 text: {e.reason}") from None
    return parse_workload(text, f"workload {path}", allow_trace)


def check_context(requests: list[Request], context: int, where: str = "workload") -> None:
    """Refuse a request that does not fit the model's context (prompt + new tokens)."""
    for r in requests:
        if r.text_tokens + r.output_tokens > context:
            raise WorkloadError(
                f"{where} line {r.index + 1}: text_tokens {r.text_tokens} + new_tokens {r.output_tokens} exceeds the "
                f"model's context ({context} tokens)"
            )


def write_workload(path: Path, requests: list[Request]) -> None:
    """Write requests as JSONL (one object per line, in order)."""
    path.write_text("".join(json.dumps(workload_record(r)) + "\n" for r in requests), encoding="utf-8")


# --- generation ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: `fixed:N`, `uniform:LO:HI` (inclusive) or `lognormal:MEDIAN:SIGMA`."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str, name: str) -> LengthDist:
        parts = text.strip().split(":")
        try:
            values = [float(p) for p in parts[1:]]
        except ValueError:
            values = []
        kind = parts[0]
        if kind == "fixed" and len(values) == 1 and values[0] >= 1:
            return cls("fixed", values[0])
        if kind == "uniform" and len(values) == 2 and 1 <= values[0] <= values[1]:
            return cls("uniform", values[0], values[1])
        if kind == "lognormal" and len(values) == 2 and values[0] >= 1 and values[1] >= 0:
            return cls("lognormal", values[0], values[1])
        raise WorkloadError(
            f"--{name} '{text}': expected fixed:N, uniform:LO:HI (1 <= LO <= HI) or lognormal:MEDIAN:SIGMA "
            "(MEDIAN >= 1, SIGMA >= 0)"
        )

    def draw(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.lognormvariate(math.log(self.a), self.b)))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"


def generate_workload(
    rate: float,
    count: int,
    seed: int,
    text_dist: LengthDist,
    new_dist: LengthDist,
    context: int,
    burstiness: float = 1.0,
) -> list[Request]:
    """`count` requests arriving at `rate` requests/s on average (the first at 0 s), lengths drawn from the
    distributions and clipped so prompt + new tokens fit `context`. Deterministic for a seed.

    Gaps between arrivals are gamma-distributed with shape `burstiness` and mean 1/rate, as `vllm bench serve
    --burstiness` draws them: 1 is Poisson (exponential gaps, the same draws as before gamma existed), below 1
    burstier (gap CV = 1/sqrt(shape)), above 1 more regular."""
    if not rate > 0 or not math.isfinite(rate):
        raise WorkloadError(f"--rate must be a positive number of requests per second, got {rate}")
    if not burstiness > 0 or not math.isfinite(burstiness):
        raise WorkloadError(f"--burstiness must be a positive gamma shape, got {burstiness}")
    if count < 1:
        raise WorkloadError(f"--count must be at least 1, got {count}")
    if context < 2:
        raise WorkloadError(f"context {context} is too small for a prompt and a new token")
    rng = random.Random(f"workload:{seed}")
    t = 0.0
    out = []
    for i in range(count):
        if i:
            t += rng.expovariate(rate) if burstiness == 1.0 else rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        text_tokens = min(text_dist.draw(rng), context - 1)
        new_tokens = min(new_dist.draw(rng), context - text_tokens)
        out.append(Request.numbered(i, round(t, 6), text_tokens, new_tokens))
    return out


# --- the scheduler experiment's mix ----------------------------------------------------------------------------

# (prompt tokens LO-HI, true output tokens LO-HI), uniform within each class
BIMODAL_SHORT, BIMODAL_LONG = ((32, 96), (4, 12)), ((768, 1024), (48, 64))
BIMODAL_SHORT_SHARE = 0.7
LONG_PROMPT_MIN = BIMODAL_LONG[0][0]  # the SLO class boundary: a prompt this long or longer is in the long class


def bimodal(rate: float, count: int, seed: int) -> list[Request]:
    """70% short, 30% long requests (lengths depend on the seed only), Poisson arrivals at `rate`: the seed's
    unit-rate gaps divided by `rate`, so every rate replays the same requests in the same order. Each client
    declares exactly its true length (`max_tokens = output_tokens`)."""
    lengths, gaps = random.Random(f"bimodal:{seed}"), random.Random(f"gaps:{seed}")
    t, out = 0.0, []
    for i in range(count):
        if i:
            t += gaps.expovariate(1.0) / rate
        (p_lo, p_hi), (n_lo, n_hi) = BIMODAL_SHORT if lengths.random() < BIMODAL_SHORT_SHARE else BIMODAL_LONG
        out.append(Request.numbered(i, round(t, 6), lengths.randint(p_lo, p_hi), lengths.randint(n_lo, n_hi)))
    return out


# --- the scheduler proof's mixes (issue 34): what a client declares is not the true output length -------------

OUTPUT_CAP = 256  # the `max_tokens` every client of a mix declares; true outputs are drawn below it


@dataclass(frozen=True)
class MixClass:
    """One kind of request in a mix: the `client_class` label its client sends (None: it sends none), its share of
    the requests, and its prompt and true-output length distributions (clipped to `prompt_range` and 1..cap)."""

    label: str | None
    share: float
    prompt: LengthDist
    output: LengthDist
    prompt_range: tuple[int, int] = (16, 1024)


@dataclass(frozen=True)
class Mix:
    """A scheduler-experiment mix: its classes (shares summing to 1) and the cap each client declares."""

    name: str
    classes: tuple[MixClass, ...]
    cap: int = OUTPUT_CAP
    note: str = field(default="", compare=False)

    def describe(self) -> dict[str, Any]:
        """The mix's published parameters (as recorded in an experiment's setup.json)."""
        return {"name": self.name, "cap": self.cap, "note": self.note, "classes": [
            {"label": c.label, "share": c.share, "prompt": str(c.prompt), "output": str(c.output),
             "prompt_range": list(c.prompt_range)} for c in self.classes]}


MIXES = {
    "bimodal": Mix("bimodal", (
        MixClass(None, BIMODAL_SHORT_SHARE, LengthDist("uniform", *BIMODAL_SHORT[0]),
                 LengthDist("uniform", *BIMODAL_SHORT[1])),
        MixClass(None, 1 - BIMODAL_SHORT_SHARE, LengthDist("uniform", *BIMODAL_LONG[0]),
                 LengthDist("uniform", *BIMODAL_LONG[1])),
    ), note="(a) the earlier bimodal lengths (uniform within each kind; the same draws per seed as `bimodal`): "
            "prompt length orders the work"),
    "independent": Mix("independent", (
        MixClass(None, 1.0, LengthDist("lognormal", 192, 0.8), LengthDist("lognormal", 24, 1.0)),
    ), note="(b) output independent of the prompt (rho ~ 0), heavy-tailed; no class label"),
    "classes": Mix("classes", (
        MixClass("code", 0.5, LengthDist("lognormal", 640, 0.25), LengthDist("lognormal", 10, 0.5), (256, 1024)),
        MixClass("chat", 0.5, LengthDist("lognormal", 64, 0.5), LengthDist("lognormal", 64, 0.7), (16, 1024)),
    ), note="(c) two declared client classes, like Azure's code/conversation split: code has long prompts and "
            "short outputs, chat short prompts and long outputs (rho < 0)"),
}


def mix_requests(mix: str, rate: float, count: int, seed: int) -> list[Request]:
    """`count` requests of the named mix (MIXES), Poisson arrivals at `rate` (the seed's unit-rate gaps divided by
    `rate`: every rate replays the same requests in the same order). Each client declares the mix's cap as
    `max_tokens` and, where its class has one, its `client_class`; the true output length is the trace's alone."""
    if mix not in MIXES:
        raise WorkloadError(f"unknown mix {mix!r}; expected one of {', '.join(MIXES)}")
    m = MIXES[mix]
    lengths, gaps = random.Random(f"{mix}:{seed}"), random.Random(f"gaps:{seed}")
    t, out = 0.0, []
    for i in range(count):
        if i:
            t += gaps.expovariate(1.0) / rate
        u, kind = lengths.random(), m.classes[-1]
        for c in m.classes:
            if u < c.share:
                kind = c
                break
            u -= c.share
        lo, hi = kind.prompt_range
        prompt = min(max(kind.prompt.draw(lengths), lo), hi)
        output = min(max(kind.output.draw(lengths), 1), m.cap)
        out.append(Request.numbered(i, round(t, 6), prompt, output, max_tokens=m.cap, client_class=kind.label))
    return out


def slo_class(text_tokens: int, client_class: str | None) -> str:
    """The SLO class of a request: its declared client class, or else `long` / `short` by its prompt
    (LONG_PROMPT_MIN)."""
    if client_class:
        return client_class
    return "long" if text_tokens >= LONG_PROMPT_MIN else "short"


def slo_entries(slo: Mapping[str, Mapping[str, float]]) -> list[str]:
    """A scheduler experiment's SLOs (setup.json `slo`: class -> ttft_ms, tpot_ms) as the `estimate-admit` policy's
    `KEY:TTFT_MS:TPOT_MS` entries: a declared class label as itself, the prompt classes `short` / `long` by their
    lower bound (0, LONG_PROMPT_MIN)."""
    bounds = {"short": 0, "long": LONG_PROMPT_MIN}
    return [f"{bounds.get(k, k)}:{v['ttft_ms']:.3f}:{v['tpot_ms']:.3f}" for k, v in slo.items()]
