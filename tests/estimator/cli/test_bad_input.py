"""The estimator on bad input: runs too small for a split, damaged runs, edited or corrupted model folders,
out-of-range requests; and its security rules (no pickle anywhere). Each case: one line on stderr, exit 2."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from estimator import LatencyEstimator
from estimator.cli import app
from estimator.errors import EstimatorError

runner = CliRunner()
ESTIMATOR_SRC = Path(__file__).resolve().parents[3] / "estimator"
REQUEST = ["--tier", "1", "--top-k", "0", "--blocks", "32", "--text-tokens", "64", "--new-tokens", "4"]


def _one_line_error(result: Any, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return str(lines[0])


@pytest.fixture(scope="module")
def model(synthetic_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad-input") / "model"
    result = runner.invoke(app, ["train", str(synthetic_run), "--variant", "tokens", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def model_copy(model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    return copy


# --- runs too small for the requested split, damaged runs ----------------------------------------------------


def test_compare_on_too_few_samples_for_its_splits(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    few_prompts = run_writer(tmp_path / "a", tiers=(1,), top_ks=(0,), lengths=(16,), reps=2, same_repeats=0)
    _one_line_error(
        runner.invoke(app, ["compare", str(few_prompts), "--no-references"]),
        "too few distinct prompts for a by-prompt split: 2 (need 4)",
    )
    two_lengths = run_writer(tmp_path / "b", tiers=(1,), top_ks=(0,), lengths=(16, 32), reps=4, same_repeats=0)
    _one_line_error(
        runner.invoke(app, ["compare", str(two_lengths), "--no-references", "--variant", "tokens"]),
        "too few distinct text_tokens values for a length split: 2 (need at least 3)",
    )
    for run in (few_prompts, two_lengths):
        assert not (run / "compare").exists()  # nothing half-written


def test_train_on_a_single_sample(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    run = run_writer(tmp_path, tiers=(1,), top_ks=(0,), lengths=(16,), reps=1, same_repeats=0)
    out = tmp_path / "m"
    _one_line_error(runner.invoke(app, ["train", str(run), "--out", str(out)]), "too few distinct prompts")
    assert not out.exists()


def test_run_killed_before_its_first_point(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    run = run_writer(tmp_path)
    for f in (run / "samples").glob("*.parquet"):
        f.unlink()  # only the unfinished samples/*.tmp is left
    _one_line_error(runner.invoke(app, ["analyze", str(run)]), "no samples")


def test_damaged_samples_file(tmp_path: Path, run_writer: Callable[..., Path]) -> None:
    run = run_writer(tmp_path)
    victim = sorted((run / "samples").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    _one_line_error(runner.invoke(app, ["analyze", str(run)]), f"{victim}: unreadable parquet file")


# --- a model folder that does not match its meta.json ---------------------------------------------------------


def _edit_meta(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        meta = json.loads((folder / "meta.json").read_text())
        edit(meta)
        (folder / "meta.json").write_text(json.dumps(meta))

    return apply


def _swap(folder: Path) -> None:
    os.replace(folder / "prefill.txt", folder / "x")
    os.replace(folder / "decode.txt", folder / "prefill.txt")
    os.replace(folder / "x", folder / "decode.txt")


def _clear_digests(meta: dict[str, Any]) -> None:
    """A model saved before meta.json held file digests: the deeper checks must still catch damage."""
    for phase in meta["phases"].values():
        phase["sha256"] = None


def _then_clear_digests(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        damage(folder)
        _edit_meta(_clear_digests)(folder)

    return apply


MODEL_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "meta-truncated": (lambda f: (f / "meta.json").write_text((f / "meta.json").read_text()[:200]), "unreadable"),
    "meta-empty": (lambda f: (f / "meta.json").write_text(""), "unreadable"),
    "meta-not-an-object": (lambda f: (f / "meta.json").write_text("[]"), "invalid metadata"),
    "schema-version": (_edit_meta(lambda m: m.update(schema_version=4)), "results schema_version 4"),
    "format-version": (_edit_meta(lambda m: m.update(format_version=9)), "format_version 9"),
    "variant-edited": (_edit_meta(lambda m: m.update(variant="poly")), "does not match variant 'poly'"),
    "variant-unknown": (_edit_meta(lambda m: m.update(variant="bag")), "invalid metadata: variant"),
    "unknown-key": (_edit_meta(lambda m: m.update(colour="red")), "colour: Extra inputs are not permitted"),
    "features-edited": (_edit_meta(lambda m: m["phases"]["prefill"]["features"].append("zzz")), "feature list"),
    "axes-edited": (_edit_meta(lambda m: m.update(axes=["tier"])), "does not match variant"),
    "path-traversal": (
        _edit_meta(lambda m: m["phases"]["prefill"].update(model_file="../model/prefill.txt")),
        "missing model file '../model/prefill.txt'",
    ),
    "models-swapped": (_swap, "content does not match meta.json"),
    "models-swapped-no-digest": (_then_clear_digests(_swap), "differ from those in meta.json"),
    "model-missing": (lambda f: (f / "decode.txt").unlink(), "missing model file 'decode.txt'"),
    "model-garbage": (lambda f: (f / "decode.txt").write_text("garbage\n"), "content does not match meta.json"),
    "model-garbage-no-digest": (
        _then_clear_digests(lambda f: (f / "decode.txt").write_text("garbage\n")),
        "unreadable LightGBM model",
    ),
}


@pytest.mark.parametrize("case", sorted(MODEL_DAMAGE))
def test_damaged_model_folder(model_copy: Path, case: str) -> None:
    damage, message = MODEL_DAMAGE[case]
    damage(model_copy)
    _one_line_error(runner.invoke(app, ["predict", "--model", str(model_copy), *REQUEST]), message)
    with pytest.raises(EstimatorError, match=re.escape(message)):  # the library refuses it the same way
        LatencyEstimator.load(model_copy)


def test_truncated_model_file_is_an_error_not_a_crash(model_copy: Path) -> None:
    decode = model_copy / "decode.txt"
    decode.write_bytes(decode.read_bytes()[: decode.stat().st_size // 2])
    proc = subprocess.run(
        [sys.executable, "-m", "estimator.cli", "predict", "--model", str(model_copy), *REQUEST],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-500:]}"
    assert proc.stderr.strip().startswith("error: ") and "decode.txt" in proc.stderr


# --- predict with missing or out-of-range features -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tier", "1", "--top-k", "0", "--text-tokens", "64", "--new-tokens", "4"], "value(s) for blocks"),
        (["--top-k", "0", "--blocks", "32", "--text-tokens", "64", "--new-tokens", "4"], "value(s) for tier"),
        (["--tier", "1", "--top-k", "0", "--blocks", "32", "--text-tokens", "-5", "--new-tokens", "4"], "text_tokens"),
        (["--tier", "1", "--top-k", "0", "--blocks", "32", "--text-tokens", "64", "--new-tokens", "0"], "new_tokens"),
        ([*REQUEST, "--axis", "blocks"], "--axis needs NAME=VALUE"),
    ],
    ids=["no-blocks", "no-tier", "negative-text-tokens", "zero-new-tokens", "axis-without-value"],
)
def test_predict_missing_or_out_of_range_feature(model: Path, args: list[str], message: str) -> None:
    _one_line_error(runner.invoke(app, ["predict", "--model", str(model), *args]), message)


def test_predict_non_integer_feature_is_a_usage_error(model: Path) -> None:
    result = runner.invoke(app, ["predict", "--model", str(model), *REQUEST[:-4], "--text-tokens", "abc",
                                 "--new-tokens", "4"])
    assert result.exit_code == 2 and "Invalid value for '--text-tokens'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("flag", "value", "trained"),
    [("--tier", "9", "1, 2"), ("--top-k", "7", "0, 40"), ("--blocks", "33", "32")],
)
def test_predict_unseen_axis_value_is_refused(model: Path, flag: str, value: str, trained: str) -> None:
    # a tree would answer tier 9 as if it were tier 2: a confident, wrong number; refused unless asked for
    args = dict(zip(REQUEST[::2], REQUEST[1::2], strict=True))
    args[flag] = value
    argv = [x for kv in args.items() for x in kv]
    name = flag[2:].replace("-", "_")
    err = _one_line_error(runner.invoke(app, ["predict", "--model", str(model), *argv]), f"{name}={value}")
    assert f"trained values: {trained}" in err and "--allow-unseen" in err
    result = runner.invoke(app, ["predict", "--model", str(model), *argv, "--allow-unseen", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["unseen"] == [f"{name}={value}"] and report["total_ms"] > 0
    assert f"UNSEEN (a best guess, --allow-unseen): {name}={value}" in result.stderr


def test_predict_absurd_length_is_a_clean_error(model: Path) -> None:
    result = runner.invoke(app, ["predict", "--model", str(model), *REQUEST[:6], "--text-tokens", str(10**30),
                                 "--new-tokens", "4"])
    _one_line_error(result, "text_tokens")


# --- security: never pickle -----------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_model_folder_holds_no_pickle(model: Path) -> None:
    names = sorted(p.name for p in model.iterdir())
    assert names == ["decode.txt", "meta.json", "prefill.txt", "tables.npz"]  # tables.npz: a zip of .npy arrays
    for p in model.iterdir():
        assert not p.read_bytes().startswith(b"\x80"), f"{p.name} looks like a pickle"


def test_load_refuses_pickles(tmp_path: Path, model_copy: Path) -> None:
    marker = tmp_path / "unpickled"
    only_pickle = tmp_path / "pickled"
    only_pickle.mkdir()
    (only_pickle / "model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(EstimatorError, match="not a model folder"):
        LatencyEstimator.load(only_pickle)
    # a meta.json pointing at a pickle: read as a LightGBM text model, refused, never unpickled
    (model_copy / "prefill.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    _edit_meta(lambda m: m["phases"]["prefill"].update(model_file="prefill.pkl"))(model_copy)
    with pytest.raises(EstimatorError, match="content does not match meta.json"):
        LatencyEstimator.load(model_copy)
    _edit_meta(_clear_digests)(model_copy)
    with pytest.raises(EstimatorError, match="unreadable LightGBM model"):
        LatencyEstimator.load(model_copy)
    assert not marker.exists()


def test_estimator_code_never_imports_a_pickle_loader() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib|cloudpickle)\b|pd\.read_pickle|np\.load\(",
                         re.M)
    offenders = [p.name for p in ESTIMATOR_SRC.glob("*.py") if pattern.search(p.read_text())]
    assert not offenders
