"""Replay workloads: a JSONL file of timed requests, read and checked line by line, or generated (Poisson arrivals).

One request per line: `{"arrival_s": 0.25, "text_tokens": 512, "new_tokens": 64}`, optionally `"prompt"` (text,
cut to `text_tokens` with the model's tokenizer). Arrival times are seconds from the replay's start, on the
harness's clock. No vLLM here: a bad file fails before any engine starts.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.rundata.spec import SpecError

KEYS = {"arrival_s", "text_tokens", "new_tokens", "prompt"}


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload. `index` is its 0-based place in the file (line `index + 1`)."""

    index: int
    arrival_s: float
    text_tokens: int
    new_tokens: int
    prompt: str | None = None

    @property
    def request_id(self) -> str:
        return f"req-{self.index:05d}"

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"arrival_s": self.arrival_s, "text_tokens": self.text_tokens,
                               "new_tokens": self.new_tokens}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


def _positive_int(line: int, data: dict[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(f"{where} line {line}: {key} must be an integer, got {value!r}")
    if value <= 0:
        raise SpecError(f"{where} line {line}: {key} must be positive, got {value}")
    return value


def parse_workload(text: str, where: str = "workload") -> list[WorkloadRequest]:
    """Parse JSONL text into requests; any problem is a one-line SpecError naming the line (1-based).

    Blank lines are skipped (they keep their line numbers). Arrival times must be finite, >= 0 and not
    decreasing; lengths positive integers.
    """
    out: list[WorkloadRequest] = []
    previous = 0.0
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise SpecError(f"{where} line {n}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
        if not isinstance(data, dict):
            raise SpecError(f"{where} line {n}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - KEYS)
        if unknown:
            raise SpecError(f"{where} line {n}: unknown key(s) {', '.join(unknown)}; expected {sorted(KEYS)}")
        arrival = data.get("arrival_s")
        if not isinstance(arrival, int | float) or isinstance(arrival, bool) or not math.isfinite(arrival):
            raise SpecError(f"{where} line {n}: arrival_s must be a finite number of seconds, got {arrival!r}")
        if arrival < 0:
            raise SpecError(f"{where} line {n}: arrival_s {arrival} is negative")
        if arrival < previous:
            raise SpecError(f"{where} line {n}: arrival_s {arrival} is earlier than the line before ({previous}); "
                            "sort the file by arrival_s")
        previous = float(arrival)
        text_tokens = _positive_int(n, data, "text_tokens", where)
        new_tokens = _positive_int(n, data, "new_tokens", where)
        prompt = data.get("prompt")
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise SpecError(f"{where} line {n}: prompt must be non-empty text")
        out.append(WorkloadRequest(n - 1, float(arrival), text_tokens, new_tokens, prompt))
    if not out:
        raise SpecError(f"{where}: no requests")
    return out


def read_workload(path: Path) -> list[WorkloadRequest]:
    """Read and check a workload file (see parse_workload)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"cannot read workload file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"workload file {path} is not UTF-8 text: {e.reason}") from None
    return parse_workload(text, f"workload {path}")


def check_context(requests: list[WorkloadRequest], context: int, where: str = "workload") -> None:
    """Refuse a request that does not fit the model's context (prompt + new tokens)."""
    for r in requests:
        if r.text_tokens + r.new_tokens > context:
            raise SpecError(
                f"{where} line {r.index + 1}: text_tokens {r.text_tokens} + new_tokens {r.new_tokens} exceeds the "
                f"model's context ({context} tokens)"
            )


def write_workload(path: Path, requests: list[WorkloadRequest]) -> None:
    """Write requests as JSONL (one object per line, in order)."""
    path.write_text("".join(json.dumps(r.record()) + "\n" for r in requests), encoding="utf-8")


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
        raise SpecError(
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
    rate: float, count: int, seed: int, text_dist: LengthDist, new_dist: LengthDist, context: int
) -> list[WorkloadRequest]:
    """`count` requests with Poisson arrivals at `rate` requests/s (the first at 0 s), lengths drawn from the
    distributions and clipped so prompt + new tokens fit `context`. Deterministic for a seed."""
    if not rate > 0 or not math.isfinite(rate):
        raise SpecError(f"--rate must be a positive number of requests per second, got {rate}")
    if count < 1:
        raise SpecError(f"--count must be at least 1, got {count}")
    if context < 2:
        raise SpecError(f"context {context} is too small for a prompt and a new token")
    rng = random.Random(f"workload:{seed}")
    t = 0.0
    out = []
    for i in range(count):
        if i:
            t += rng.expovariate(rate)
        text_tokens = min(text_dist.draw(rng), context - 1)
        new_tokens = min(new_dist.draw(rng), context - text_tokens)
        out.append(WorkloadRequest(i, round(t, 6), text_tokens, new_tokens))
    return out
