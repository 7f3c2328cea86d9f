"""Sweep spec: the axes to sweep, how each maps onto the engine, and the grid of points it expands to."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
# tier 3: mixture of experts (routing depends on the tokens)
CPU_LADDER = ["cpu-tiny", "cpu-small", "cpu-base", "cpu-moe"]
GPU_LADDER = ["gpu-1b-llama3.2-shape", "gpu-3b-llama3.2-shape", "gpu-8b-llama3.1-shape"]

# Where each built-in axis goes. Targets: "model" (the tier ladder), "prompt" (prompt length),
# "engine:<EngineArgs field>", "hf:<config key>" (hf_overrides), "sampling:<SamplingParams field>", "batch" (the
# batch shape: harness/drivers/batch_points.py).
DEFAULT_MAPPING = {
    "tier": "model",
    "text_tokens": "prompt",
    "top_k": "sampling:top_k",
    "blocks": "engine:block_size",
    "batch": "batch",
    "batch_join_tokens": "batch",
}


class SpecError(ValueError):
    """A sweep spec or flag that cannot be used; the message is one line, shown to the user as is."""


WHOLE_TARGETS = ("model", "prompt", "batch")  # targets that are a word
KEYED_TARGETS = ("engine", "hf", "sampling")  # targets that name a key: "engine:block_size"


@dataclass(frozen=True)
class Target:
    """Where an axis goes, parsed once from its mapping text (the only parser of it): `kind` is one of
    WHOLE_TARGETS or KEYED_TARGETS, and `key` the EngineArgs field, hf_overrides entry or SamplingParams field of
    a keyed one ("" for a whole one)."""

    kind: str
    key: str = ""

    @classmethod
    def parse(cls, text: str) -> Target:
        """A mapping text as a target; ValueError naming the forms when it is none of them."""
        kind, sep, key = text.partition(":")
        if (text in WHOLE_TARGETS) or (kind in KEYED_TARGETS and sep and key):
            return cls(kind, key)
        raise ValueError(f"'{text}' is not a target; expected model, prompt, batch, engine:X, hf:X or sampling:X")

    @property
    def restarts_engine(self) -> bool:
        """A change of value needs a new engine (the model, an engine argument, an hf override)."""
        return self.kind in ("model", "engine", "hf")

    def __str__(self) -> str:
        return f"{self.kind}:{self.key}" if self.key else self.kind


class SweepSpec(BaseModel):
    """Everything a sweep needs to know, validated. Lengths are in tokens."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["cpu", "cuda"] = "cpu"
    axes: dict[str, list[Any]] = Field(default_factory=dict)
    mapping: dict[str, str] = Field(default_factory=dict)
    ladder: list[str] = Field(default_factory=list, description="tier index -> preset name or model path")
    reps: int = Field(4, ge=1, description="distinct prompts per point")
    same_prompt_repeats: int = Field(3, ge=0, description="repeats of one prompt per point (noise floor)")
    max_new_tokens: int = Field(32, ge=2)
    warmup_requests: int = Field(3, ge=0)
    seed: int = Field(0, description="seed for prompt choice and request order (not for sampling)")
    sampling_seed: int | None = Field(
        None,
        description="per-request SamplingParams.seed; None = none, as served (a seed moves CUDA's top-k/top-p "
        "sampling off its fused kernel)",
    )
    prompts: str | None = Field(None, description="prompt file; None = the built-in corpus")
    max_num_seqs: int | None = Field(
        None, ge=1, description="vLLM's max_num_seqs; None = vLLM's serving default (it moves batch-1 latency)"
    )
    engine: dict[str, Any] = Field(default_factory=dict, description="extra vLLM EngineArgs")
    engine_mode: Literal["multiprocess", "inprocess"] = "multiprocess"
    telemetry_interval_ms: float = Field(25.0, gt=0)
    telemetry: bool = Field(True, description="off only to measure telemetry's own overhead")
    telemetry_mode: Literal["process", "thread"] = Field(
        "process", description="sample in a process of its own (off the measuring loop's CPU and GIL) or, to "
        "measure the difference, in a thread of the harness (harness/telemetry/sampler.py)"
    )
    gc_guard: bool = Field(True, description="garbage collection off inside timed requests")
    cpu_pinning: bool = Field(
        True, description="CPU, multiprocess: >= 4 physical cores: harness, engine core and compute threads on "
        "separate cores (harness/engine/cpu_pinning.py); fewer: the steady engine's placement where "
        "LLM_LATENCY_PLACE asks for it (harness/engine/steady.py); off only to measure its effect"
    )
    allow_chunked_prefill: bool = Field(
        False, description="a prefill over several engine iterations is recorded chunk by chunk instead of failing"
    )
    trust_remote_code: bool = False
    budget: str | None = Field(
        None, description="wall-clock budget for the whole sweep, engine starts included (\"4m\", \"90s\", "
        "\"1h30m\"): the engine configs that fit are measured adaptively (harness/drivers/budget.py); None = the "
        "full grid"
    )

    @field_validator("budget")
    @classmethod
    def _budget_duration(cls, budget: str | None) -> str | None:
        if budget is not None:
            parse_duration(budget)
        return budget

    @field_validator("axes")
    @classmethod
    def _axes_non_empty(cls, axes: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, values in axes.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"axis '{name}' must be a non-empty list")
            for v in values:
                _check_plain(f"axis '{name}'", v)
            if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
                raise ValueError(f"axis '{name}' has repeated values")
        return axes

    @field_validator("engine")
    @classmethod
    def _engine_plain(cls, engine: dict[str, Any]) -> dict[str, Any]:
        for key, value in engine.items():
            _check_plain(f"engine.{key}", value)
        return engine

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        for name in ("text_tokens", "tier", "top_k", "blocks"):
            self.axes.setdefault(name, default_axes(self.device)[name])
        for name in self.axes:
            self.mapping.setdefault(name, DEFAULT_MAPPING.get(name, ""))
            target = self.mapping[name]
            if not target:
                raise ValueError(
                    f"axis '{name}' has no mapping; add mapping.{name} = 'engine:...', 'hf:...' or 'sampling:...'"
                )
            try:
                Target.parse(target)
            except ValueError:
                raise ValueError(
                    f"mapping for '{name}' is '{target}'; expected model, prompt, engine:X, hf:X or sampling:X"
                ) from None
        for name in self.axes:  # one engine setting, one place: an [engine] entry would be silently overridden
            kind, key = self.target(name).kind, self.target(name).key
            if kind == "engine" and key in self.engine:
                raise ValueError(
                    f"[engine] {key} = {self.engine[key]!r} contradicts axis '{name}' (mapped to engine:{key}, "
                    f"values {self.axes[name]}); set {key} in one place"
                )
            hf = self.engine.get("hf_overrides")
            if kind == "hf" and isinstance(hf, dict) and key in hf:
                raise ValueError(
                    f"[engine] hf_overrides.{key} = {hf[key]!r} contradicts axis '{name}' (mapped to hf:{key}, "
                    f"values {self.axes[name]}); set {key} in one place"
                )
        if self.max_num_seqs is not None:
            also = [f"axis '{a}'" for a, t in self.mapping.items() if t == "engine:max_num_seqs"]
            also += ["[engine] max_num_seqs"] if "max_num_seqs" in self.engine else []
            if also:
                raise ValueError(f"max_num_seqs = {self.max_num_seqs} contradicts {also[0]}; set it in one place")
        if "trust_remote_code" in self.engine or "engine:trust_remote_code" in self.mapping.values():
            raise ValueError("trust_remote_code can only be turned on with the --trust-remote-code flag")
        for n in self.axes["text_tokens"]:
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ValueError(f"text_tokens must be positive integers, got {n!r}")
        for k in self.axes["top_k"]:
            if not isinstance(k, int) or isinstance(k, bool) or k < -1:
                raise ValueError(f"top_k must be an integer >= -1 (0 or -1 = off), got {k!r}")
        step = 32 if self.device == "cpu" else 16
        for b in self.axes["blocks"]:
            if not isinstance(b, int) or isinstance(b, bool) or b <= 0 or b % step:
                raise ValueError(f"blocks must be positive multiples of {step} on {self.device}, got {b!r}")
        if not self.ladder:
            self.ladder = list(CPU_LADDER if self.device == "cpu" else GPU_LADDER)
        for t in self.axes["tier"]:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < len(self.ladder):
                raise ValueError(
                    f"unknown tier {t!r}: the ladder has tiers 0..{len(self.ladder) - 1} ({', '.join(self.ladder)})"
                )
        return self

    @property
    def requests_per_point(self) -> int:
        return self.reps + self.same_prompt_repeats

    @property
    def budget_s(self) -> float | None:
        """The budget in seconds; None for a full-grid sweep."""
        return None if self.budget is None else parse_duration(self.budget)

    def target(self, axis: str) -> Target:
        """Where `axis` goes (its mapping, parsed)."""
        return Target.parse(self.mapping[axis])

    def sampling_of(self, axes: dict[str, Any]) -> dict[str, Any]:
        """The `sampling:*` axes among `axes` (a point's values) as SamplingParams fields, e.g. {"top_k": 50}."""
        return {t.key: v for a, v in axes.items() if (t := self.target(a)).kind == "sampling"}


class ServingSpec(BaseModel):
    """One engine config to serve a workload on (`profile replay`, `profile serve-bench`, the experiments): built
    once from the flags, typed and checked, instead of a spec dict assembled by hand in each command. A replay
    runs it through the sweep's planner as a one-point grid (`for_workload`), which is what the run's manifest
    records as its `spec`."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["cpu", "cuda"] = "cpu"
    tier: int = Field(default=0, ge=0)
    model: str | None = Field(default=None, description="a local model folder or preset instead of the ladder's tier")
    top_k: int = Field(default=0, ge=-1)
    blocks: int | None = Field(default=None, gt=0, description="KV block size; None = 128 on CPU, 16 on CUDA")
    max_num_seqs: int | None = Field(default=None, ge=1)
    engine: dict[str, Any] = Field(default_factory=dict, description="extra vLLM EngineArgs")
    seed: int | None = None
    warmup_requests: int | None = Field(default=None, ge=0)
    prompts: str | None = None
    engine_mode: Literal["multiprocess", "inprocess"] = "multiprocess"
    trust_remote_code: bool = False

    def with_scheduling(self, policy: str) -> ServingSpec:
        """The same config with vLLM's `scheduling_policy` (`fcfs` or `priority`)."""
        return self.model_copy(update={"engine": {**self.engine, "scheduling_policy": policy}})

    def sweep_data(self, text_tokens: int) -> dict[str, Any]:
        """The one-point sweep spec's data: this config at one prompt length (no generation length of its own:
        each request has its own, so `max_new_tokens` is the smallest allowed)."""
        data: dict[str, Any] = {
            "device": self.device,
            "axes": {"tier": [0 if self.model else self.tier], "top_k": [self.top_k],
                     "blocks": [self.blocks or (128 if self.device == "cpu" else 16)], "text_tokens": [text_tokens]},
            "max_new_tokens": 2,
        }
        if self.model:
            data["ladder"] = [self.model]
        for key in ("max_num_seqs", "seed", "warmup_requests", "prompts"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        if self.engine:
            data["engine"] = dict(self.engine)
        if self.engine_mode != "multiprocess":
            data["engine_mode"] = self.engine_mode
        if self.trust_remote_code:
            data["trust_remote_code"] = True
        return data

    def for_workload(self, longest_prompt: int) -> SweepSpec:
        """The sweep spec a replay of a workload plans with: `text_tokens` = its longest prompt (the token budget
        must hold it)."""
        return build_spec(self.sweep_data(longest_prompt))

    def context(self) -> int:
        """The served model's context (max_position_embeddings), which clips generated workloads."""
        spec = self.for_workload(1)
        _, path = resolve_model(spec.ladder[int(spec.axes["tier"][0])])
        return int(model_config(path).get("max_position_embeddings", 2048))


def build_serving(**values: Any) -> ServingSpec:
    """A serving spec from flags; any problem is a one-line SpecError."""
    try:
        return ServingSpec(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise SpecError(f"invalid {where}: {err['msg'].removeprefix('Value error, ')}") from e


def _check_plain(where: str, value: Any) -> None:
    """Refuse a value that would not come back the same from the manifest's JSON (--resume compares specs):
    a YAML date, NaN or infinity, a table with non-string keys."""
    try:
        same = json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where} holds {value!r}, which is not plain data ({e})") from None
    if not same:
        raise ValueError(f"{where} holds {value!r}, which is not plain data (a table key that is not a string?)")


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|m|s)")
DEFAULT_CPU_BUDGET = "3m"  # the embedded CPU default's budget (the full grid is the study studies/full-grid.toml)


def parse_duration(text: str) -> float:
    """"4m", "90s", "1h30m" or plain seconds ("240") in seconds; ValueError naming the forms otherwise."""
    t = str(text).strip().lower()
    try:
        seconds = float(t)
    except ValueError:
        parts = _DURATION.findall(t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise ValueError(f"budget '{text}' is not a duration; expected e.g. 4m, 90s, 1h30m or 240") from None
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if not seconds > 0:
        raise ValueError(f"budget '{text}' must be positive")
    return seconds


def default_axes(device: str) -> dict[str, list[Any]]:
    """The embedded default sweep for a device (sized for a 10-minute CPU run on 2 cores)."""
    if device == "cpu":
        return {"text_tokens": [16, 64, 128, 256, 512, 1024], "tier": [0, 1, 2], "top_k": [0, 50], "blocks": [32, 128]}
    return {
        "text_tokens": [16, 64, 128, 256, 512, 1024, 2048, 4096],
        "tier": [0, 1, 2],
        "top_k": [0, 50],
        "blocks": [16, 32],
    }


def resolve_model(ladder_entry: str) -> tuple[str, str]:
    """Return (name, local path) for a ladder entry: a shipped preset name or a local model directory."""
    preset = PRESETS_DIR / ladder_entry
    if (preset / "config.json").is_file():
        return ladder_entry, str(preset)
    path = Path(ladder_entry).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SpecError(f"model folder {path} has no config.json")
        return path.name, str(path.resolve())
    raise SpecError(
        f"model '{ladder_entry}' is neither a shipped preset ({', '.join(available_presets())}) "
        "nor a local folder with a config.json (nothing is downloaded)"
    )


def available_presets() -> list[str]:
    return sorted(p.name for p in PRESETS_DIR.iterdir() if (p / "config.json").is_file())


def model_config(path: str) -> dict[str, Any]:
    """The HF config.json of a model folder."""
    try:
        cfg: dict[str, Any] = json.loads((Path(path) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SpecError(f"cannot read {path}/config.json: {e}") from e
    return cfg


def load_spec_file(path: Path) -> dict[str, Any]:
    """Read a TOML or YAML spec file into a plain dict (not yet validated)."""
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    kind = "TOML" if path.suffix == ".toml" else "YAML"
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
        json.dumps(data, default=str)  # plain data only: a self-referencing YAML alias is refused here
    except OSError as e:
        raise SpecError(f"cannot read spec file {path}: {e.strerror or e}") from e
    # ValueError: bad UTF-8, bad TOML, an impossible YAML date, a cycle; RecursionError: absurdly deep nesting
    except (ValueError, RecursionError, yaml.YAMLError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SpecError(f"spec file {path} is not valid {kind}: {first}") from e
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path} must hold a table/mapping at the top level")
    return data


def build_spec(data: dict[str, Any]) -> SweepSpec:
    """Validate a spec dict; any problem becomes a one-line SpecError."""
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        raise SpecError(f"invalid spec: {where}: {msg}") from e


@dataclass(frozen=True)
class Point:
    """One combination of axis values."""

    point_id: str
    engine_config_id: str
    axes: dict[str, Any]

    @property
    def text_tokens(self) -> int:
        return int(self.axes["text_tokens"])


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def engine_axes(spec: SweepSpec) -> list[str]:
    """Axes whose change needs an engine restart (model, engine args, hf overrides)."""
    return [a for a in spec.axes if spec.target(a).restarts_engine]


def expand(spec: SweepSpec) -> list[Point]:
    """The grid of points, grouped so that points sharing an engine config are consecutive."""
    eng = engine_axes(spec)
    other = [a for a in spec.axes if a not in eng]
    points = []
    for eng_values in itertools.product(*(spec.axes[a] for a in eng)):
        eng_part = dict(zip(eng, eng_values, strict=True))
        eng_id = _hash(eng_part)
        for other_values in itertools.product(*(spec.axes[a] for a in other)):
            axes = {**eng_part, **dict(zip(other, other_values, strict=True))}
            points.append(Point(point_id=_hash(axes), engine_config_id=eng_id, axes=axes))
    return points


def group_by_engine(points: Iterable[Point]) -> list[list[Point]]:
    """Consecutive runs of points sharing an engine config (one engine start each)."""
    groups: list[list[Point]] = []
    for p in points:
        if groups and groups[-1][0].engine_config_id == p.engine_config_id:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups
