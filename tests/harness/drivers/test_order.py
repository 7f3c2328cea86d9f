"""The request order within one engine start: seeded, and interleaving lengths, sampling configs and repeats."""

from __future__ import annotations

import pandas as pd

from harness.drivers.measure import request_order
from harness.rundata.spec import build_spec, expand, group_by_engine

AXES = {"text_tokens": [16, 64, 128, 256, 512, 1024], "tier": [0], "top_k": [0, 50], "blocks": [32]}


def _order(seed: int = 0, **spec: object) -> pd.DataFrame:
    s = build_spec({"axes": AXES, "seed": seed, **spec})
    (group,) = group_by_engine(expand(s))
    order = request_order(s, group, group[0].engine_config_id)
    return pd.DataFrame(
        [{"seq": r.seq, "point_id": r.point.point_id, "rep": r.rep, **r.point.axes} for r in order]
    )


def _spearman(a: pd.Series, b: pd.Series) -> float:
    return float(a.rank().corr(b.rank()))


def test_every_request_once_in_a_seeded_order() -> None:
    o = _order(reps=4, same_prompt_repeats=3)
    assert list(o.seq) == list(range(12 * 7))
    assert not o.duplicated(["point_id", "rep"]).any() and (o.groupby("point_id").size() == 7).all()
    assert o.equals(_order(reps=4, same_prompt_repeats=3))  # same seed, same order (resume relies on it)
    assert not o.equals(_order(seed=1, reps=4, same_prompt_repeats=3))


def test_order_interleaves_lengths_sampling_and_repeats() -> None:
    for seed in range(5):
        o = _order(seed, reps=4, same_prompt_repeats=3)
        assert abs(_spearman(o.seq, o.text_tokens)) < 0.2
        assert abs(_spearman(o.seq, o.top_k)) < 0.2
        assert abs(_spearman(o.seq, (o.rep >= 4).astype(int))) < 0.3  # same-prompt repeats are not bunched
        # every point spans the engine start: one request per round of 12
        assert (o.groupby("point_id").seq.min() < 12).all() and (o.groupby("point_id").seq.max() >= 6 * 12).all()
        # neighbours differ: lengths change between consecutive requests most of the time
        assert (o.text_tokens.diff().fillna(1) != 0).mean() > 0.7


def test_warm_up_covers_every_sampling_config_at_both_length_ends() -> None:
    from harness.drivers.plan import plan_sweep, prompt_sources
    from harness.drivers.session import warm_up

    spec = build_spec({"axes": {**AXES, "top_k": [0, 5, 50]}, "warmup_requests": 1, "max_new_tokens": 4})
    plan = plan_sweep(spec)
    (group,) = plan.groups
    calls: list[tuple[int, dict[str, object]]] = []

    class FakeEngine:
        def run_request(self, rid: str, token_ids: list[int], max_new: int, sampling: dict[str, object]) -> None:
            calls.append((len(token_ids), sampling))

    warm_up(FakeEngine(), next(iter(prompt_sources(plan).values())), plan, group)  # type: ignore[arg-type]
    assert {(n, s["top_k"]) for n, s in calls} == {(n, k) for n in (16, 1024) for k in (0, 5, 50)}
    calls.clear()
    none = plan_sweep(build_spec({"axes": AXES, "warmup_requests": 0}))
    warm_up(FakeEngine(), next(iter(prompt_sources(none).values())), none, none.groups[0])  # type: ignore[arg-type]
    assert calls == []  # --warmup 0: none
