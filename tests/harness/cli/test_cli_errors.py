"""Bad input: a one-line error naming the problem, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli.app import app
from tests.conftest import run_profile

runner = CliRunner()


def _sweep(tmp_path: Path, *args: str) -> tuple[int, str]:
    out = tmp_path / "results"
    result = runner.invoke(app, ["sweep", "--out", str(out), *args])
    return result.exit_code, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--text-tokens", "0"], "text_tokens must be positive"),
        (["--text-tokens", "64,abc"], "comma-separated integers"),
        (["--text-tokens", "5000"], "exceeds the context"),
        (["--tier", "9"], "unknown tier 9"),
        (["--blocks", "40"], "multiples of 32"),
        (["--max-new-tokens", "1"], "max_new_tokens"),
        (["--model", "/nonexistent/model"], "neither a shipped preset"),
        (["--prompts", "/nonexistent/prompts.jsonl"], "prompts file not found"),
        (["--resume", "/nonexistent/run"], "not a run folder"),
    ],
)
def test_bad_flags(tmp_path: Path, args: list[str], message: str) -> None:
    code, output = _sweep(tmp_path, *args)
    assert code == 2, output
    assert message in output
    assert "Traceback" not in output
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_bad_spec_files(tmp_path: Path) -> None:
    cases = {
        "unknown.toml": ('colour = "red"\n', "colour"),
        "type.toml": ('reps = "many"\n', "reps"),
        "empty_axis.toml": ("[axes]\ntext_tokens = []\n", "non-empty"),
        "syntax.yaml": ("axes: [unclosed\n", "not valid YAML"),
    }
    for name, (content, message) in cases.items():
        f = tmp_path / name
        f.write_text(content)
        code, output = _sweep(tmp_path, "--spec", str(f))
        assert code == 2 and message in output, (name, output)


def test_model_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    code, output = _sweep(tmp_path, "--model", str(tmp_path / "m"))
    assert code == 2 and "no config.json" in output


def test_bad_prompt_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    for f, message in ((empty, "empty"), (bad, "not valid JSON")):
        code, output = _sweep(tmp_path, "--prompts", str(f), "--dry-run")
        assert code == 2 and message in output


def test_resume_of_other_schema(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"schema_version": 0}))
    code, output = _sweep(tmp_path, "--resume", str(run))
    assert code == 2 and "schema_version 0" in output


def test_gpu_on_a_machine_without_one(tmp_path: Path) -> None:
    code, output = _sweep(tmp_path, "--gpu", "0", "--text-tokens", "64")
    assert code == 2
    assert "GPU" in output or "NVML" in output or "CUDA" in output


def test_dry_run_prints_plan_and_writes_nothing(tmp_path: Path) -> None:
    code, output = _sweep(tmp_path, "--dry-run")
    assert code == 0, output
    assert "engine-restart plan: 6 engine starts" in output
    assert "estimated duration" in output
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        ("[axes]\nblocks = [32, 128]\n[engine]\nblock_size = 64\n", ["block_size = 64", "axis 'blocks'"]),
        (
            '[axes]\nseqs = [1, 8]\n[mapping]\nseqs = "engine:max_num_seqs"\n[engine]\nmax_num_seqs = 4\n',
            ["max_num_seqs = 4", "axis 'seqs'"],
        ),
        (
            '[axes]\nlayers = [2, 4]\n[mapping]\nlayers = "hf:num_hidden_layers"\n'
            "[engine]\nhf_overrides = {num_hidden_layers = 3}\n",
            ["hf_overrides.num_hidden_layers = 3", "axis 'layers'"],
        ),
    ],
)
def test_engine_entry_contradicting_an_axis_is_bad_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str, names: list[str]
) -> None:
    monkeypatch.setattr("harness.drivers.sweep.VllmEngine", mock_refuse)
    f = tmp_path / "contradiction.toml"
    f.write_text(spec)
    code, output = _sweep(tmp_path, "--spec", str(f))
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(n in errors[0] for n in names), output
    assert "Traceback" not in output
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_engine_entry_contradicting_an_axis_from_the_command_line(tmp_path: Path) -> None:
    f = tmp_path / "contradiction.toml"
    f.write_text("[engine]\nblock_size = 64\n")
    proc = run_profile("sweep", "--spec", str(f), "--blocks", "32", "--out", str(tmp_path / "results"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: invalid spec: spec: [engine] block_size = 64 contradicts axis 'blocks' (mapped to "
        "engine:block_size, values [32]); set block_size in one place"
    ]


def mock_refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("an engine was started")
