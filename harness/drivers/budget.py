"""A sweep within a wall-clock budget (`profile sweep --budget 3m`, or `budget = "3m"` in a spec): which engine
configs fit, and the coarse design each one starts with.

An engine start costs tens of seconds on a CPU and a point added after its engine has stopped costs another start,
so the budget is spent per engine config, in this order:

1. **Planning** (here, before any engine starts). Each engine config costs its start plus its coarse design. A start
   costs what this machine measured for that model (the per-machine cache `engine-costs-<machine>.json`, the
   median of the last starts recorded, so one cold-compile start does not price every later one; else the slowest
   other model's on this machine, a model's first start compiling cold), or `DEFAULT_START_S` when nothing is
   cached; a request costs its measured mean (scaled by length), else a measured model's scaled by the FLOPs
   estimates' ratio, else the dry run's FLOPs estimate. Configs are
   taken coverage first (every value of the first engine axis, the tier ladder, at the other engine axes' first
   values; then the other values) while their cost fits; the rest are skipped and named in the manifest. After
   each config, the configs not yet started are chosen again with the costs measured since and the time left.
2. **Coarse design**, per engine config: at least 4 distinct `text_tokens` from the spec's axis (spread over it)
   for every sampling config, each with the spec's distinct prompts and same-prompt repeats (Experiment 1's
   groups).
3. **Refinement** while the engine still runs (harness/drivers/adaptive.py): a fit, then more lengths where the
   prediction interval is widest relative to the noise floor, until the config's share of the budget is spent or
   every interval lies within the floor.

The manifest's `adaptive` section records the plan, each point chosen and why, and the time each phase spent.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.drivers.plan import ESTIMATE, Plan
from harness.rundata.spec import Point, SpecError, engine_axes

DEFAULT_START_S = {"cpu": 80.0, "cuda": 120.0}  # no start measured yet: the slowest first start seen (AVX2 EPYC)
COARSE_LENGTHS = 4  # distinct text_tokens per sampling config in the coarse design
KEEP_STARTS = 5  # starts remembered per model in the cost cache


def cost_cache_path() -> Path:
    """This machine's engine-cost cache (beside the dtype probe's)."""
    from harness.engine.cpu_dtype import cache_dir
    from harness.engine.device import cpu_model

    return cache_dir() / f"engine-costs-{hashlib.sha1(cpu_model().encode()).hexdigest()[:12]}.json"


@dataclass
class CostCache:
    """Measured costs on this machine, keyed by `device|model`: the model's first start (`first_start_s`, when:
    `first_at`), its last later starts (`later_start_s`), its last starts in order (`start_s`, for a reader), and
    the mean seconds per request (with the mean text_tokens it was measured at)."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None) -> CostCache:
        path = path or cost_cache_path()
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        return cls(path, data if isinstance(data, dict) else {})

    def first_start(self, key: str) -> tuple[float, float] | None:
        """This model's first start on this machine (its compile cold): (seconds, when as a UNIX time)."""
        entry = self.data.get(key, {})
        return (float(entry["first_start_s"]), float(entry["first_at"])) if "first_start_s" in entry else None

    def later_start_s(self, key: str) -> float | None:
        """The median of this model's last starts after its first (compiled kernels reused), None if none."""
        later = self.data.get(key, {}).get("later_start_s")
        return float(statistics.median(later)) if later else None

    def request_s(self, key: str, text_tokens: float) -> float | None:
        """Seconds per request at `text_tokens`, scaled linearly from the measured mean (None: none measured)."""
        entry = self.data.get(key, {})
        if not entry.get("request_s"):
            return None
        at = max(float(entry.get("request_text_tokens", text_tokens)), 1.0)
        return float(entry["request_s"]) * max(text_tokens / at, 0.25)

    def record(
        self,
        key: str,
        start_s: float | None = None,
        request_s: float | None = None,
        request_text_tokens: float | None = None,
    ) -> None:
        """Add a measured start and/or request cost, merged into what the file holds now (another process may
        have written it since this one was loaded)."""
        self.data = {**self.data, **CostCache.load(self.path).data}
        entry = self.data.setdefault(key, {})
        if start_s is not None:
            if "first_start_s" not in entry:
                entry["first_start_s"], entry["first_at"] = round(start_s, 2), time.time()
            else:
                entry["later_start_s"] = [*entry.get("later_start_s", []), round(start_s, 2)][-KEEP_STARTS:]
            entry["start_s"] = [*(entry.get("start_s") or []), round(start_s, 2)][-KEEP_STARTS:]
        if request_s is not None:
            entry["request_s"], entry["request_text_tokens"] = round(request_s, 4), round(request_text_tokens or 0, 1)
        try:  # an unwritable cache only means the next plan uses the defaults
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError:
            pass


def cost_key(plan: Plan, tier: int) -> str:
    """The cost cache's key for a tier's model (the cache is this machine's, whose dtype choice is fixed)."""
    return f"{plan.spec.device}|{plan.models[tier].name}"


@dataclass
class GroupPlan:
    """One engine config under the budget: its coarse points and what they are expected to cost."""

    engine_config_id: str
    engine_values: dict[str, Any]
    coarse: list[Point]
    start_s: float
    start_source: str  # where start_s comes from (start_cost's labels: "measured", ..., "default")
    coarse_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine_config_id": self.engine_config_id,
            **self.engine_values,
            "start_s": round(self.start_s, 1),
            "start_cost": self.start_source,
            "coarse_points": len(self.coarse),
            "coarse_s": round(self.coarse_s, 1),
        }


@dataclass
class BudgetPlan:
    """The engine configs measured within `budget_s` (in order) and those skipped; `plan` is the sweep's plan over
    the chosen configs' coarse points (refinement adds to its points as it goes)."""

    budget_s: float
    chosen: list[GroupPlan]
    skipped: list[GroupPlan]
    plan: Plan
    grid: Plan  # the full grid's plan the configs come from

    def select(self, groups: list[GroupPlan], left_s: float, keep: list[GroupPlan] | None = None) -> None:
        """Choose, in order, the `groups` whose start and coarse design fit `left_s` (after `keep`)."""
        self.chosen, self.skipped, spent = list(keep or []), [], 0.0
        for g in groups:
            if spent + g.start_s + g.coarse_s <= left_s:
                self.chosen.append(g)
                spent += g.start_s + g.coarse_s
            else:
                self.skipped.append(g)

    def sync_plan(self) -> None:
        """The sweep's plan over the chosen configs: their coarse points, then the refinement points added."""
        coarse = [p for g in self.chosen for p in g.coarse]
        ids = {p.point_id for p in coarse}
        every_coarse = {p.point_id for g in self.chosen + self.skipped for p in g.coarse}
        added = [p for p in self.plan.points if p.point_id not in every_coarse and p.point_id not in ids]
        self.plan.points[:] = coarse + added
        self.plan.groups[:] = [list(g.coarse) for g in self.chosen]

    def replan(self, started: set[str], left_s: float, cache: CostCache) -> None:
        """After an engine config is done: re-choose the configs not yet started with the costs measured since
        and the time left (a first run plans with the default start cost, then learns this machine's)."""
        keep = [g for g in self.chosen if g.engine_config_id in started]
        rest = [g for g in self.chosen + self.skipped if g.engine_config_id not in started]
        order = {g[0].engine_config_id: i for i, g in enumerate(coverage_order(self.grid))}
        rest = sorted(rest, key=lambda g: order[g.engine_config_id])
        by_id = {g[0].engine_config_id: g for g in self.grid.groups}
        self.select([_costed(self.grid, cache, by_id[g.engine_config_id]) for g in rest], left_s, keep)
        self.sync_plan()

    @property
    def planned_s(self) -> float:
        return sum(g.start_s + g.coarse_s for g in self.chosen)

    def as_dict(self) -> dict[str, Any]:
        return {
            "budget_s": self.budget_s,
            "planned_s": round(self.planned_s, 1),
            "chosen": [g.as_dict() for g in self.chosen],
            "skipped": [g.as_dict() for g in self.skipped],
        }


def coarse_lengths(lengths: list[int], k: int = COARSE_LENGTHS) -> list[int]:
    """k lengths spread over the sorted axis (its ends included); all of them when it has k or fewer."""
    ordered = sorted(lengths)
    if len(ordered) <= k:
        return ordered
    return sorted({ordered[round(i * (len(ordered) - 1) / (k - 1))] for i in range(k)})


def _flops_estimate_s(plan: Plan, tier: int, text_tokens: int) -> float:
    est, m = ESTIMATE[plan.spec.device], plan.models[tier]
    work = text_tokens + plan.spec.max_new_tokens
    return 2 * m.params * work / est["flops"] + plan.spec.max_new_tokens * est["step_overhead_s"]


def request_cost(plan: Plan, cache: CostCache, tier: int, text_tokens: int) -> float:
    """Seconds per request of this tier's model at `text_tokens`: measured on this machine, else a measured model's
    cost scaled by the two models' FLOPs estimates (the nearest in size: this machine's speed, the size ratio), else
    the dry run's FLOPs estimate alone (calibrated on a slow CPU: conservative)."""
    measured = cache.request_s(cost_key(plan, tier), text_tokens)
    if measured is not None:
        return measured
    known = [
        (abs(plan.models[t].params - plan.models[tier].params), t, s)
        for t in plan.models
        if (s := cache.request_s(cost_key(plan, t), text_tokens)) is not None
    ]
    if known:
        _, other, seconds = min(known)
        return seconds * _flops_estimate_s(plan, tier, text_tokens) / _flops_estimate_s(plan, other, text_tokens)
    return _flops_estimate_s(plan, tier, text_tokens)


def start_cost(plan: Plan, cache: CostCache, tier: int) -> tuple[float, str]:
    """A start's expected seconds and where the figure comes from. A model's first start on a machine compiles its
    kernels cold (20-28 s of a 35-55 s start on a 2-core CPU); later starts reuse them (18-23 s). So: this model's
    later starts; else, after its first start, other models' later starts (a later start is mostly imports, not
    the model's size), else that first start; a model never started costs the most recent first start of another
    model (the machine's very first start also pays cold imports: 20 s against 7), else the conservative default."""
    key = cost_key(plan, tier)
    later = cache.later_start_s(key)
    if later is not None:
        return later, "measured"
    others = [k for k in cache.data if k.startswith(f"{plan.spec.device}|") and k != key]
    others_later = [s for k in others if (s := cache.later_start_s(k)) is not None]
    first = cache.first_start(key)
    if first is not None:
        if others_later:
            return float(statistics.median(others_later)), "another model's later starts"
        return first[0], "measured (its first start)"
    firsts = [f for k in others if (f := cache.first_start(k)) is not None]
    if firsts:
        return max(firsts, key=lambda f: f[1])[0], "another model's first start"
    return DEFAULT_START_S[plan.spec.device], "default"


def _costed(plan: Plan, cache: CostCache, group: list[Point]) -> GroupPlan:
    spec = plan.spec
    coarse_n = set(coarse_lengths(list(spec.axes["text_tokens"])))
    tier = int(group[0].axes["tier"])
    coarse = [p for p in group if p.text_tokens in coarse_n]
    start_s, source = start_cost(plan, cache, tier)
    coarse_s = sum(spec.requests_per_point * request_cost(plan, cache, tier, p.text_tokens) for p in coarse)
    coarse_s += spec.warmup_requests * request_cost(plan, cache, tier, max(coarse_n))
    eng = engine_axes(spec)
    return GroupPlan(group[0].engine_config_id, {a: group[0].axes[a] for a in eng}, coarse, start_s, source, coarse_s)


def coverage_order(plan: Plan) -> list[list[Point]]:
    """The grid's engine configs, coverage first: every tier at the other engine axes' first values, then the
    configs leaving one of them, and so on (the spec's order within each)."""
    eng = engine_axes(plan.spec)
    first = {a: plan.spec.axes[a][0] for a in eng}
    lead = "tier" if "tier" in eng else eng[0]

    def off_first(group: list[Point]) -> int:
        return sum(group[0].axes[a] != first[a] for a in eng if a != lead)

    return [plan.groups[i] for i in sorted(range(len(plan.groups)), key=lambda i: (off_first(plan.groups[i]), i))]


def plan_budget(plan: Plan, budget_s: float, cache: CostCache, chosen_ids: list[str] | None = None) -> BudgetPlan:
    """The engine configs that fit `budget_s`, coverage first; SpecError when not even the first one fits.
    `chosen_ids` (a resumed run's plan) takes those configs instead, in that order."""
    groups = [_costed(plan, cache, g) for g in coverage_order(plan)]
    budget = BudgetPlan(budget_s, [], [], Plan(plan.spec, [], [], plan.models), plan)
    if chosen_ids is not None:
        budget.chosen = sorted(
            (g for g in groups if g.engine_config_id in chosen_ids), key=lambda g: chosen_ids.index(g.engine_config_id)
        )
        budget.skipped = [g for g in groups if g.engine_config_id not in chosen_ids]
    else:
        budget.select(groups, budget_s)
    if not budget.chosen:
        g = budget.skipped[0]
        raise SpecError(
            f"budget {budget_s:.0f} s holds no engine config: the first needs {g.start_s:.0f} s to start "
            f"({g.start_source}) and about {g.coarse_s:.0f} s for its coarse design; raise --budget or use "
            "--budget off for the full grid"
        )
    budget.sync_plan()
    return budget


@dataclass
class BudgetClock:
    """The budget's clock across a sweep: when it ends, and the mandatory cost still ahead (the starts and coarse
    designs of the engine configs not yet measured), so each config's refinement gets a fair share of the rest."""

    budget: BudgetPlan
    spent_before_s: float = 0.0  # a resumed run's earlier attempts
    t0: float = field(default_factory=time.monotonic)

    def left_s(self) -> float:
        return self.budget.budget_s - self.spent_before_s - (time.monotonic() - self.t0)

    def refine_share_s(self, later: list[GroupPlan]) -> float:
        """Seconds this config may refine for: what is left after the later configs' mandatory cost, shared evenly
        between it and them."""
        spare = self.left_s() - sum(g.start_s + g.coarse_s for g in later)
        return max(0.0, spare / (len(later) + 1))

    def spent_s(self) -> float:
        return self.spent_before_s + (time.monotonic() - self.t0)
