from __future__ import annotations

from pathlib import Path

import pytest

from harness.rundata.spec import (
    CPU_LADDER,
    SpecError,
    Target,
    build_spec,
    expand,
    group_by_engine,
    load_spec_file,
    resolve_model,
)


def test_defaults_fill_every_axis_and_mapping() -> None:
    spec = build_spec({})
    assert spec.device == "cpu"
    assert set(spec.axes) == {"text_tokens", "tier", "top_k", "blocks"}
    assert spec.mapping["blocks"] == "engine:block_size"
    assert spec.mapping["top_k"] == "sampling:top_k"
    assert spec.ladder == CPU_LADDER


def test_grid_groups_points_by_engine_config() -> None:
    spec = build_spec({"axes": {"text_tokens": [64, 128], "tier": [0, 1], "top_k": [0, 5], "blocks": [32, 64]}})
    points = expand(spec)
    assert len(points) == 16
    groups = group_by_engine(points)
    assert len(groups) == 4  # tier x blocks: top_k and text_tokens need no restart
    for g in groups:
        assert len({p.engine_config_id for p in g}) == 1
        assert {(p.axes["tier"], p.axes["blocks"]) for p in g} == {(g[0].axes["tier"], g[0].axes["blocks"])}
    assert len({p.point_id for p in points}) == 16


def test_point_ids_are_stable_across_expansions() -> None:
    spec = {"axes": {"text_tokens": [64, 128], "tier": [0]}}
    assert [p.point_id for p in expand(build_spec(spec))] == [p.point_id for p in expand(build_spec(spec))]


def test_extra_axis_with_mapping_restarts_engine_only_for_engine_targets() -> None:
    spec = build_spec({"axes": {"tier": [0], "blocks": [32], "text_tokens": [64], "top_k": [0],
                                "layers": [2, 4], "temperature": [0.0, 1.0]},
                       "mapping": {"layers": "hf:num_hidden_layers", "temperature": "sampling:temperature"}})
    assert len(group_by_engine(expand(spec))) == 2


def test_targets_are_parsed_once_into_kind_and_key() -> None:
    spec = build_spec({"axes": {"tier": [0], "temperature": [0.0, 1.0], "layers": [2]},
                       "mapping": {"temperature": "sampling:temperature", "layers": "hf:num_hidden_layers"}})
    assert spec.target("blocks") == Target("engine", "block_size") and str(spec.target("blocks")) == "engine:block_size"
    assert spec.target("tier") == Target("model") and spec.target("tier").restarts_engine
    assert not spec.target("temperature").restarts_engine and spec.target("layers").restarts_engine
    assert spec.sampling_of({"top_k": 50, "temperature": 1.0, "tier": 0, "layers": 2}) == {"top_k": 50,
                                                                                         "temperature": 1.0}
    for bad in ("engine:", "engine", "gpu:x", "prompt:x", ""):
        with pytest.raises(ValueError, match="is not a target"):
            Target.parse(bad)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"colour": 1}, "colour"),
        ({"reps": "many"}, "reps"),
        ({"axes": {"text_tokens": []}}, "non-empty"),
        ({"axes": {"text_tokens": [0]}}, "positive"),
        ({"axes": {"text_tokens": [-5]}}, "positive"),
        ({"axes": {"tier": [7]}}, "unknown tier 7"),
        ({"axes": {"blocks": [48]}}, "multiples of 32"),
        ({"max_new_tokens": 1}, "max_new_tokens"),
        ({"axes": {"foo": [1, 2]}}, "no mapping"),
        ({"axes": {"text_tokens": [64, 64]}}, "repeated"),
    ],
)
def test_bad_specs_give_one_line_errors(data: dict, message: str) -> None:
    with pytest.raises(SpecError) as e:
        build_spec(data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_spec_files_toml_and_yaml(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('reps = 2\n[axes]\ntext_tokens = [32, 64]\ntier = [1]\n')
    yml = tmp_path / "s.yaml"
    yml.write_text("reps: 2\naxes:\n  text_tokens: [32, 64]\n  tier: [1]\n")
    a, b = build_spec(load_spec_file(toml)), build_spec(load_spec_file(yml))
    assert a == b
    assert a.axes["text_tokens"] == [32, 64] and a.reps == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("reps = [")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec_file(bad)
    with pytest.raises(SpecError, match="not found"):
        load_spec_file(tmp_path / "missing.toml")


def test_model_resolution(tmp_path: Path) -> None:
    assert resolve_model("cpu-tiny")[0] == "cpu-tiny"
    (tmp_path / "m").mkdir()
    with pytest.raises(SpecError, match="no config.json"):
        resolve_model(str(tmp_path / "m"))
    with pytest.raises(SpecError, match="neither a shipped preset"):
        resolve_model("org/some-model-to-download")
