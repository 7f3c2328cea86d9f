"""A budgeted sweep's refinement of one engine config on its running engine (the `refine` hook of
harness/drivers/measure.py's `measure_group`): rounds of fit → choose → measure where the bootstrap interval of
the per-config curve (harness/drivers/adaptive.py) is widest against the noise floor, within the share of the
budget (harness/drivers/budget.py) this config is given."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from harness.drivers.adaptive import choose, per_request, rank
from harness.drivers.budget import BudgetClock, BudgetPlan, CostCache, GroupPlan, cost_key, request_cost
from harness.drivers.measure import PassOutcome
from harness.rundata.spec import Point, engine_axes, expand


def request_wall_s(samples: pd.DataFrame) -> pd.DataFrame:
    """Wall seconds per request (first step's start to last step's end) with its text_tokens."""
    g = samples.groupby(["point_id", "rep"])
    return pd.DataFrame({"text_tokens": g.text_tokens.first(), "wall_s": g.t_end_s.max() - g.t_start_s.min()})


class GroupRefiner:
    """The refinement of one engine config within its share of the budget (the `refine` hook of
    harness/drivers/measure.py's `measure_group`): rounds of fit → choose → measure on the running engine.
    Everything it decides goes to `log` (the manifest's record of this config)."""

    def __init__(
        self,
        budget: BudgetPlan,
        clock: BudgetClock,
        group: GroupPlan,
        store: Any,
        log: dict[str, Any],
        save: Any,
        replan: Any,
        report: Any,
    ) -> None:
        self.budget, self.clock, self.group, self.store = budget, clock, group, store
        self.log, self.save, self.replan, self.report = log, save, replan, report
        spec = budget.plan.spec
        self.config_axes = [a for a in spec.axes if a != "text_tokens" and a not in engine_axes(spec)]

    def _measured(self) -> pd.DataFrame:
        table = self.store.read_table("samples")
        samples = table.to_pandas() if table is not None else pd.DataFrame()
        return samples[samples.engine_config_id == self.group.engine_config_id] if len(samples) else samples

    def __call__(self, dtype: str, run: Any) -> Any:  # dtype: the engine's (the hook's signature)
        spec, plan = self.budget.plan.spec, self.budget.plan
        t0 = time.monotonic()
        samples = self._measured()
        walls = request_wall_s(samples)
        tier = int(self.group.engine_values["tier"])
        cache = CostCache.load()  # with this start's cost, just measured (record() merges the file again)
        if len(walls):
            cache.record(
                cost_key(plan, tier),
                request_s=float(walls.wall_s.mean()),
                request_text_tokens=float(walls.text_tokens.mean()),
            )
        self.replan()  # the configs still to come, with what this start has taught about the machine
        ids = [g.engine_config_id for g in self.budget.chosen]
        share = self.clock.refine_share_s(self.budget.chosen[ids.index(self.group.engine_config_id) + 1 :])
        deadline = t0 + share
        self.log.update(refine_share_s=round(share, 1), fit_s=0.0, refine_s=0.0, rounds=0)
        axis = [int(n) for n in spec.axes["text_tokens"]]
        requests = per_request(samples, self.config_axes) if len(samples) else pd.DataFrame()
        failed, stopped = 0, "no lengths left to measure"
        tried: set[tuple[tuple[tuple[str, Any], ...], int]] = set()

        def cost(n: int) -> float:
            return spec.reps * request_cost(plan, cache, tier, n)

        while len(requests):
            tf = time.monotonic()
            ranked = rank(requests, self.config_axes, axis, spec.seed + int(self.log["rounds"]), tried)
            picked = choose(ranked, lambda c: time.monotonic() + cost(c.length) <= deadline)
            self.log["fit_s"] = round(self.log["fit_s"] + time.monotonic() - tf, 3)
            if not picked:
                if not ranked:
                    stopped = "no lengths left to measure"
                elif ranked[0].ratio <= 1:
                    stopped = "every interval within the noise floor"
                else:
                    stopped = "budget spent"
                break
            points = []
            for c in picked:
                axes = {**self.group.engine_values, **dict(c.config), "text_tokens": c.length}
                point = refine_point(spec, axes)
                points.append(point)
                tried.add((c.config, c.length))
                plan.points.append(point)
                self.log["points"].append(
                    {"point_id": point.point_id, **axes, "why": "refine", "round": self.log["rounds"], **c.why()}
                )
            self.log["rounds"] += 1
            self.report(
                "log",
                {
                    "message": f"refine round {self.log['rounds']}: "
                    + "; ".join(
                        f"text_tokens {c.length} ({', '.join(f'{k}={v}' for k, v in c.config)}): {c.target} interval "
                        f"±{c.halfwidth_ms:.2f} ms vs floor {c.floor_ms:.2f} ms"
                        for c in picked
                    )
                },
            )
            self.store.update_manifest(points_total=len(plan.points))
            self.save()
            tr = time.monotonic()
            passed = run(points, 0)
            self.log["refine_s"] = round(self.log["refine_s"] + time.monotonic() - tr, 3)
            failed += passed.failed
            if passed.status is not None:
                self.log["stopped"] = passed.status
                self.save()
                return PassOutcome(passed.status, failed, [])
            if passed.written:
                new = pd.concat(passed.written, ignore_index=True)
                requests = pd.concat([requests, per_request(new, self.config_axes)], ignore_index=True)
        self.log["stopped"] = stopped
        self.report("log", {"message": f"refinement stopped after {self.log['rounds']} round(s): {stopped}"})
        self.save()
        return PassOutcome(None, failed, [])


def refine_point(spec: Any, axes: dict[str, Any]) -> Point:
    """The grid's Point for these axis values (same ids), whatever its text_tokens."""
    one = spec.model_copy(update={"axes": {a: [axes[a]] for a in spec.axes}})
    return expand(one)[0]
