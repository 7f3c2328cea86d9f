"""Reliability: faults (kill -9, Ctrl-C, failing points, full or unwritable disk), bad input, security, fuzzing.

Each fault test asserts the message, the exit code and the files left behind (docs/errors.md is the table).
The `slow` ones run the real CPU engine: tier 0 (cpu-tiny), one block size, a few short points each.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
import psutil
import pyarrow as pa
import pynvml as real_nvml
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from harness.cli.app import app, resolve_spec
from harness.engine.settings import EngineSettings
from harness.rundata import store as store_module
from harness.rundata.prompts import Document, load_documents
from harness.rundata.spec import SpecError, SweepSpec, build_spec, expand, load_spec_file
from harness.rundata.store import RunStore, StoreError
from tests.conftest import run_profile

runner = CliRunner()
PRESET = Path(__file__).resolve().parents[3] / "harness" / "presets" / "cpu-tiny"
# every real-engine sweep here: one small model, one block size, 3 requests x 32 tokens per point. Requests
# run interleaved (all points of an engine start finish in its last round): 32 tokens (~70 ms) spread the
# points' completions over a few seconds, so a kill or a signal after the first one lands mid-sweep
SMALL = ["--tier", "0", "--blocks", "32", "--reps", "2", "--same-prompt-repeats", "1", "--max-new-tokens", "32",
         "--warmup", "1", "--quiet"]
ROWS_PER_POINT = 3 * 32


# --- helpers ----------------------------------------------------------------------------------------------


def _sweep(*args: str) -> tuple[int, str]:
    """`profile sweep` in this process (no engine may start: see `no_engine`)."""
    result = runner.invoke(app, ["sweep", *args])
    return result.exit_code, result.stdout + result.stderr


def _clean_error(code: int, output: str, message: str) -> None:
    assert code == 2, output
    assert message in output, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output


def _harness_traceback(text: str) -> bool:
    """A traceback through the harness's code. vLLM's engine-core process shares the terminal and logs its own
    when a signal reaches the whole process group (how its worker died): those run through vLLM only."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Traceback (most recent call last)" in line:
            for frame in lines[i + 1 :]:
                if not frame.startswith(" "):  # the frames are indented; the exception line ends them
                    break
                if "/harness/" in frame or "/typer/" in frame:
                    return True
    return False


def _empty(folder: Path) -> bool:
    return not folder.exists() or not any(folder.rglob("*"))


@pytest.fixture
def no_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any engine construction fails the test: bad input must be caught before an engine starts."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an engine was started")

    monkeypatch.setattr("harness.drivers.sweep.VllmEngine", refuse)


class _Sweep:
    """A `profile sweep` subprocess in its own process group, its output in files."""

    def __init__(self, tmp_path: Path, *args: str, resume: Path | None = None, tag: str = "") -> None:
        """A new run `tmp_path/results/run` with these flags, or `--resume` of the run folder `resume`; its output
        goes to tmp_path/TAG.stdout and .stderr (TAG: `run` or `resume` unless given)."""
        self.run = resume or tmp_path / "results" / "run"
        self.samples = self.run / "samples"
        where = ["--resume", str(resume)] if resume else ["--out", str(self.run.parent), "--name", self.run.name]
        tag = tag or ("resume" if resume else "run")
        self._stdout = tmp_path / f"{tag}.stdout"
        self._stderr = tmp_path / f"{tag}.stderr"
        env = {**os.environ, "COLUMNS": "200"}
        with self._stdout.open("w") as o, self._stderr.open("w") as e:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harness.cli", "sweep", *args, *where],
                stdout=o, stderr=e, env=env, start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self._stdout.read_text()

    @property
    def stderr(self) -> str:
        return self._stderr.read_text()

    def done(self) -> set[str]:
        return {p.stem for p in self.samples.glob("*.parquet")} if self.samples.is_dir() else set()

    def wait_for_points(self, n: int = 1, timeout_s: float = 400) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.done()) < n:
            if self.proc.poll() is not None:
                pytest.fail(f"sweep ended (exit {self.proc.returncode}) before {n} point(s): {self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {n} point(s) after {timeout_s} s: {self.stderr[-3000:]}")
            time.sleep(0.02)

    def wait_for_output(self, text: str, timeout_s: float = 400) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.stderr:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {text!r} on stderr: {self.stderr[-3000:]}")
            time.sleep(0.02)

    def engine_processes(self) -> list[psutil.Process]:
        procs = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if "VLLM::" in " ".join(p.cmdline()):
                    procs.append(p)
            except psutil.Error:
                continue
        return procs

    def kill(self) -> None:
        """SIGKILL the whole process group (the engine core and its worker too)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


def _gone(procs: list[psutil.Process], timeout_s: float = 10) -> list[psutil.Process]:
    """The processes still alive (zombies count as gone) after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in procs:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _point_ids(run: Path) -> set[str]:
    spec = build_spec(json.loads((run / "manifest.json").read_text())["spec"])
    return {p.point_id for p in expand(spec)}


def _assert_every_point_exactly_once(run: Path) -> None:
    expected = _point_ids(run)
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete", m["status"]
    assert m["points_done"] == m["points_total"] == len(expected) and m["points_failed"] == 0
    samples = pd.read_parquet(run / "samples")  # would fail on a half-written file
    assert set(samples.point_id) == expected
    assert (samples.groupby("point_id").size() == ROWS_PER_POINT).all()
    assert not samples.duplicated(["point_id", "rep", "step_index"]).any()
    prompts = pd.read_parquet(run / "prompts")
    assert set(prompts.point_id) == expected
    assert not prompts.duplicated(["point_id", "prompt_id"]).any()
    assert not list(run.rglob("*.tmp"))


# --- faults 1 and 2: kill -9 mid-sweep, Ctrl-C / SIGTERM, --resume ------------------------------------------


def _assert_interrupted(sweep: _Sweep, n_at_signal: int, engine: list[psutil.Process]) -> set[str]:
    """Exit 130 with the resume command, status interrupted, nothing half-written, the engine gone."""
    assert sweep.proc.wait(timeout=120) == 130, sweep.stderr[-3000:]
    stderr, stdout = sweep.stderr, sweep.stdout
    assert f"interrupted: resume with  profile sweep --resume {sweep.run}" in stderr
    assert not _harness_traceback(stderr) and not _harness_traceback(stdout)
    assert "status: interrupted" in stdout
    m = json.loads((sweep.run / "manifest.json").read_text())
    done = sweep.done()
    assert m["status"] == "interrupted" and m["ended_at"]
    assert m["points_done"] == len(done) and m["points_failed"] == 0
    # stopped after the request in flight: at most the point it belonged to was finished, not the sweep
    assert n_at_signal <= len(done) <= n_at_signal + 1 < m["points_total"]
    assert not (sweep.run / "failures.jsonl").exists()
    assert not list(sweep.run.rglob("*.tmp"))
    assert not _gone(engine), "the engine core outlived the harness: it was not shut down"
    return done


@pytest.mark.slow
def test_kill_9_sigterm_and_ctrl_c_then_resume_measures_every_point_once(tmp_path: Path) -> None:
    """Three ways a sweep ends early, each followed by --resume, on one run (four engine starts in all):
    1. kill -9 of the harness alone at a random moment (what the OOM killer does): its orphaned engine core and
       worker die within seconds (the watchdog, harness/engine/reaper.py) and the run stays resumable;
    2. --resume discards the half-written files; SIGTERM to the whole process group (what systemd's stop sends)
       kills the engine core too, and that reads as an interruption, not as failed points;
    3. --resume again; Ctrl-C (SIGINT to the harness alone, so it must shut its engine down itself) stops it;
    4. a last --resume completes the run, every point exactly once."""
    # 18 points: room for three interruptions, each after at least one more point, with points left over
    sweep = _Sweep(tmp_path, *SMALL, "--text-tokens", "32,48,64", "--top-k", "0,1,2,5,10,50")
    sweep.wait_for_points(1)
    engine = sweep.engine_processes()
    assert any("EngineCore" in " ".join(p.cmdline()) for p in engine)
    delay = random.uniform(0.0, 0.5)  # a random moment: mid-request, mid-write or between points
    print(f"SIGKILL to the harness {delay:.3f} s after the first point landed")
    time.sleep(delay)
    os.kill(sweep.proc.pid, signal.SIGKILL)
    assert sweep.proc.wait(timeout=30) == -signal.SIGKILL
    assert not _gone(engine, timeout_s=15), "the engine outlived a kill -9 of the harness"
    run = sweep.run
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"  # the kill left it so
    before = {p.stem: p.stat().st_mtime_ns for p in sweep.samples.glob("*.parquet")}
    assert 1 <= len(before) < 12, "the kill came too late to test anything"
    # what a kill during a write leaves: a half-written samples file, and the prompts of a point whose
    # samples never landed (they are renamed into place first); plant both so every run checks them
    missing = sorted(_point_ids(run) - set(before))[0]
    some = next(iter(before))
    data = (sweep.samples / f"{some}.parquet").read_bytes()
    (sweep.samples / f"{missing}.parquet.tmp").write_bytes(data[: len(data) // 2])
    (run / "prompts" / f"{missing}.parquet").write_bytes((run / "prompts" / f"{some}.parquet").read_bytes())
    partial = sorted(str(p.relative_to(run)) for p in run.rglob("*.tmp")) + [f"prompts/{missing}.parquet"]

    termed = _Sweep(tmp_path, "--quiet", resume=run, tag="sigterm")
    termed.wait_for_points(len(before) + 1)
    engine = termed.engine_processes()
    n_at_signal = len(termed.done())
    os.killpg(termed.proc.pid, signal.SIGTERM)
    done = _assert_interrupted(termed, n_at_signal, engine)
    for rel in partial:
        assert f"discarded unfinished write {rel}" in termed.stderr
    assert f"({len(before)} already done)" in termed.stderr
    assert not (run / "samples" / f"{missing}.parquet.tmp").exists()

    resumed = _Sweep(tmp_path, "--quiet", resume=run, tag="sigint")
    resumed.wait_for_points(len(done) + 1)
    engine = resumed.engine_processes()
    assert any("EngineCore" in " ".join(p.cmdline()) for p in engine)
    n_at_signal = len(resumed.done())
    resumed.proc.send_signal(signal.SIGINT)  # in a terminal Ctrl-C reaches the engine core too: as SIGTERM above
    assert f"({len(done)} already done)" in resumed.stderr
    done = _assert_interrupted(resumed, n_at_signal, engine)

    proc = run_profile("sweep", "--resume", str(run), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"({len(done)} already done)" in proc.stderr
    assert "status: complete; points done 18, failed 0" in proc.stdout
    _assert_every_point_exactly_once(run)
    # the points finished before the kill were kept, not measured again
    assert {p.stem: p.stat().st_mtime_ns for p in sweep.samples.glob("*.parquet") if p.stem in before} == before
    m = json.loads((run / "manifest.json").read_text())
    assert m["resumed_at"] and len(m["engine_starts"]) == 4


# --- fault 3: failing points ----------------------------------------------------------------------------------


def _failing_spec(tmp_path: Path, seqs: list[int], ladder_alien: bool) -> Path:
    """A spec whose `seqs` axis maps onto engine:max_num_seqs (0 is invalid), optionally with a tier 1 whose
    config.json names an architecture vLLM does not know."""
    alien = tmp_path / "alien-model"
    alien.mkdir()
    cfg = json.loads((PRESET / "config.json").read_text())
    cfg["architectures"] = ["AlienForCausalLM"]
    (alien / "config.json").write_text(json.dumps(cfg))
    ladder = ["cpu-tiny", str(alien)] if ladder_alien else ["cpu-tiny"]
    spec = tmp_path / "failing.toml"
    spec.write_text(
        "reps = 2\nsame_prompt_repeats = 1\nmax_new_tokens = 32\nwarmup_requests = 1\n"
        f"ladder = {json.dumps(ladder)}\n"
        "[axes]\ntext_tokens = [32, 48, 64, 80]\n"
        f"tier = {json.dumps(list(range(len(ladder))))}\n"
        f"top_k = [0]\nblocks = [32]\nseqs = {json.dumps(seqs)}\n"
        '[mapping]\nseqs = "engine:max_num_seqs"\n'
    )
    return spec


@pytest.mark.slow
def test_failing_points_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    # groups in order: (cpu-tiny, seqs 8) good, (cpu-tiny, seqs 0), (alien, 8), (alien, 0): 4 points each
    sweep = _Sweep(tmp_path, "--spec", str(_failing_spec(tmp_path, [8, 0], ladder_alien=True)), "--quiet")
    # mid-pass: after the warm-up, before its points finish (12 interleaved requests, ~1 s)
    sweep.wait_for_output("measuring 12 requests of 4 points")
    time.sleep(0.3)
    cores = [p for p in sweep.engine_processes() if "EngineCore" in " ".join(p.cmdline())]
    assert len(cores) == 1
    cores[0].kill()  # the engine dies under the sweep (as an OOM kill would do it)
    assert sweep.proc.wait(timeout=400) == 1, sweep.stderr[-3000:]

    run = sweep.run
    stdout, stderr = sweep.stdout, sweep.stderr
    assert not _harness_traceback(stdout + stderr)
    spec = build_spec(json.loads((run / "manifest.json").read_text())["spec"])
    points = expand(spec)
    good = [p.point_id for p in points if p.axes["tier"] == 0 and p.axes["seqs"] == 8]
    failures = [json.loads(line) for line in (run / "failures.jsonl").read_text().splitlines()]
    by_id = {f["point_id"]: f for f in failures}
    assert len(failures) == len(by_id) == 13  # 1 killed + 4 invalid engine arg + 8 unknown architecture
    died = [f for f in failures if f["point_id"] in good]
    assert len(died) == 1 and "engine failed during request" in died[0]["error"]
    for p in points:
        if p.axes["tier"] == 1:
            assert "AlienForCausalLM" in by_id[p.point_id]["error"]
        elif p.axes["seqs"] == 0:
            assert "engine start failed" in by_id[p.point_id]["error"] and "max_num_seqs" in by_id[p.point_id]["error"]
    assert all(f["error_type"] == "EngineError" and f["axes"] and f["time"] for f in failures)
    # the dead engine was restarted for the rest of its points; the sweep went on to the next groups
    assert "restarting the engine for the rest of its points" in stderr
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "failed" and m["points_done"] == 3 and m["points_failed"] == 13
    assert len(m["engine_starts"]) == 2
    assert sweep.done() == set(good) - {died[0]["point_id"]}
    assert (pd.read_parquet(run / "samples").groupby("point_id").size() == ROWS_PER_POINT).all()
    for f in failures:  # the end summary lists every failure
        assert f"failed {f['point_id']}" in stdout
    assert "status: failed; points done 3, failed 13" in stdout


@pytest.mark.slow
def test_fail_fast_stops_at_the_first_failed_point(tmp_path: Path) -> None:
    spec = _failing_spec(tmp_path, [0, 8], ladder_alien=False)  # the invalid engine config comes first
    proc = run_profile("sweep", "--spec", str(spec), "--fail-fast", "--quiet", "--out", str(tmp_path / "r"),
                       "--name", "run")
    assert proc.returncode == 1, proc.stderr[-3000:]
    run = tmp_path / "r" / "run"
    failures = [json.loads(line) for line in (run / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 4 and all("max_num_seqs" in f["error"] for f in failures)
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "failed" and m["points_done"] == 0 and m["points_failed"] == 8
    assert m["engine_starts"] == [] and not list((run / "samples").iterdir())
    assert "status: failed; points done 0, failed 8" in proc.stdout
    assert "Traceback" not in proc.stderr
    # the engine's error stays one line, pointing at the engine's own output
    failed = [line for line in proc.stderr.splitlines() if "[failed]" in line]
    assert len(failed) == 4 and all(f"(engine output: {run / 'engine.log'})" in line for line in failed)
    assert (run / "engine.log").is_file()


# --- fault 4: full disk, unwritable folder --------------------------------------------------------------------


def _tiny_free(folder: Any) -> Any:
    return type("usage", (), {"total": 1 << 30, "used": (1 << 30) - (10 << 20), "free": 10 << 20})()


def test_unwritable_output_folder_fails_before_measuring(tmp_path: Path, no_engine: None) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, output = _sweep(*SMALL, "--text-tokens", "32", "--out", str(blocker / "results"))
    _clean_error(code, output, f"output folder {blocker / 'results'} is not writable")
    assert blocker.read_text() == "not a folder"


def test_full_disk_fails_before_measuring(
    tmp_path: Path, no_engine: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module.shutil, "disk_usage", _tiny_free)
    out = tmp_path / "results"
    code, output = _sweep(*SMALL, "--text-tokens", "32", "--out", str(out))
    _clean_error(code, output, f"only 10 MiB free under {out}; need at least 50 MiB")
    assert _empty(out)


def test_store_refuses_a_full_disk_and_survives_one_mid_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RunStore.create(tmp_path, {"status": "running"}, run_id="r")
    table = {"samples": pa.table({"point_id": ["a"], "latency_ms": [1.0]}), "prompts": pa.table({"prompt_id": ["p"]})}
    store.write_point("a", table)

    def enospc(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module.pq, "write_table", enospc)
    with pytest.raises(StoreError, match=r"cannot write prompts of point b under .*No space left on device.*--resume"):
        store.write_point("b", table)
    assert store.done_points() == {"a"} and not list(store.run_dir.rglob("*.tmp"))
    assert not (store.run_dir / "prompts" / "b.parquet").exists()
    monkeypatch.setattr(store_module.shutil, "disk_usage", _tiny_free)
    with pytest.raises(StoreError, match="only 10 MiB free"):
        RunStore.create(tmp_path / "more", {}, run_id="r2")
    assert not (tmp_path / "more" / "r2").exists()
    with pytest.raises(StoreError, match="only 10 MiB free"):  # resuming on a full disk: refused too
        RunStore.open(store.run_dir)


def test_a_failure_line_cut_by_a_kill_does_not_swallow_the_next(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, {}, run_id="r")
    with (store.run_dir / "failures.jsonl").open("a") as f:
        f.write('{"point_id": "a", "err')  # the kill landed mid-line
    store.record_failure({"point_id": "b", "error": "boom"})
    assert [f["point_id"] for f in store.failures()] == ["b"]


# --- bad input: exit 2, one line, nothing written, no engine ------------------------------------------------


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """pynvml patched where harness.telemetry.sources imports it: NVML works and sees exactly one GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with mock.patch("harness.telemetry.sources.pynvml", autospec=True) as m:
        for name in dir(real_nvml):
            if name.startswith(("NVMLError", "NVML_")):
                setattr(m, name, getattr(real_nvml, name))
        m.nvmlDeviceGetCount.return_value = 1
        yield m


@pytest.mark.parametrize(
    ("visible", "gpu", "message"),
    [
        (None, "3", "--gpu 3: NVML sees 1 GPU(s) (indices 0..0)"),
        ("0", "1", "--gpu 1: CUDA_VISIBLE_DEVICES='0' makes 1 GPU(s) visible (indices 0..0)"),
    ],
)
def test_gpu_that_does_not_exist(
    tmp_path: Path, no_engine: None, one_gpu: Any, monkeypatch: pytest.MonkeyPatch,
    visible: str | None, gpu: str, message: str,
) -> None:
    if visible is not None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    # checked before vLLM is even imported (the CUDA-build check imports it)
    monkeypatch.setattr("harness.engine.vllm_engine.engine_environment", lambda: pytest.fail("vLLM was imported"))
    code, output = _sweep("--gpu", gpu, "--tier", "0", "--text-tokens", "64", "--out", str(tmp_path / "r"))
    _clean_error(code, output, message)
    assert not (tmp_path / "r").exists()
    one_gpu.nvmlShutdown.assert_called()


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_prompts_file_too_short_fails_before_any_engine(tmp_path: Path, no_engine: None, dry_run: bool) -> None:
    prompts = tmp_path / "short.txt"
    prompts.write_text("A short prompt.\n\nAnother short one.\n")
    out = tmp_path / "results"
    code, output = _sweep(*SMALL, "--text-tokens", "32,64", "--prompts", str(prompts), "--out", str(out),
                          *(["--dry-run"] if dry_run else []))
    _clean_error(code, output, f"prompt text too short: prompts file {prompts} gives at most")
    assert "text_tokens 64 requested" in output
    assert _empty(out)


@pytest.mark.parametrize(
    "content",
    ["[" * 100_000, '{"text": "' + "9" * 10 + '", "n": ' + "9" * 5000 + "}", '[{"conversations": 5}]'],
    ids=["deep-nesting", "huge-int", "no-text"],
)
def test_hostile_json_prompts_file_is_a_clean_error(tmp_path: Path, content: str) -> None:
    prompts = tmp_path / "p.json"
    prompts.write_text(content)
    code, output = _sweep("--prompts", str(prompts), "--dry-run", "--out", str(tmp_path / "r"))
    _clean_error(code, output, f"prompts file {prompts}")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("date.yaml", "axes:\n  foo: [2001-02-30]\n", "not valid YAML: day is out of range"),
        ("deep.yaml", "axes: " + "[" * 5000, "not valid YAML"),
        ("cycle.yaml", "engine: &x {a: *x}\n", "not valid YAML"),
        ("binary.toml", b"\xff\xfe\x00reps = 2", "not valid TOML"),
        ("axis-date.yaml", "axes:\n  foo: [2001-02-03]\nmapping:\n  foo: 'engine:seed'\n", "not plain data"),
    ],
)
def test_odd_spec_files_are_a_clean_error(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    f = tmp_path / name
    if isinstance(content, bytes):
        f.write_bytes(content)
    else:
        f.write_text(content)
    code, output = _sweep("--spec", str(f), "--dry-run", "--out", str(tmp_path / "r"))
    _clean_error(code, output, message)


# --- security -------------------------------------------------------------------------------------------------


def test_trust_remote_code_only_with_the_flag(tmp_path: Path) -> None:
    settings = EngineSettings(model_name="m", model_path=str(PRESET), device="cpu", block_size=32, longest_prompt=256)
    assert settings.engine_args()["trust_remote_code"] is False
    settings.engine_kwargs = {"trust_remote_code": True}  # an engine kwarg cannot turn it on
    assert settings.engine_args()["trust_remote_code"] is False
    settings.trust_remote_code = True
    assert settings.engine_args()["trust_remote_code"] is True

    assert resolve_spec(None, None, {}).trust_remote_code is False
    assert resolve_spec(None, None, {"trust_remote_code": True}).trust_remote_code is True
    cases = {
        "top.toml": ("trust_remote_code = true\n", "runs only with --trust-remote-code"),
        "engine.toml": ("[engine]\ntrust_remote_code = true\n", "only be turned on with the --trust-remote-code flag"),
        "axis.toml": ('[axes]\ntrc = [true]\n[mapping]\ntrc = "engine:trust_remote_code"\n', "--trust-remote-code"),
    }
    for name, (content, message) in cases.items():
        f = tmp_path / name
        f.write_text(content)
        code, output = _sweep("--spec", str(f), "--dry-run")
        _clean_error(code, output, message)
    code, output = _sweep("--spec", str(tmp_path / "top.toml"), "--trust-remote-code", "--dry-run")
    assert code == 0, output


def test_paths_are_data_not_shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_engine: None) -> None:
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "s.toml"
    spec.write_text('prompts = "$(touch pwned-5)"\n')
    cases = [
        (["--prompts", "$(touch pwned-1).txt"], "prompts file not found: $(touch pwned-1).txt"),
        (["--prompts", "x.txt; touch pwned-2"], "prompts file not found: x.txt; touch pwned-2"),
        (["--model", "`touch pwned-3`"], "model '`touch pwned-3`' is neither a shipped preset"),
        (["--spec", "s.toml; touch pwned-4"], "spec file not found: s.toml; touch pwned-4"),
        (["--spec", str(spec)], "prompts file not found: $(touch pwned-5)"),
    ]
    for args, message in cases:
        code, output = _sweep(*args, "--text-tokens", "32", "--out", str(tmp_path / "r"))
        _clean_error(code, output, message)
    assert not list(tmp_path.glob("pwned*")) and not list(Path.cwd().glob("pwned*"))
    # and as a separate process, the way a user runs it
    proc = run_profile("sweep", "--prompts", "$(touch pwned-6); true", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "prompts file not found" in proc.stderr
    assert not list(tmp_path.glob("pwned*"))


# --- fuzzing: the spec parser and the prompt-file readers -----------------------------------------------------

SPEC_FIELDS = list(SweepSpec.model_fields)
AXES = ["text_tokens", "tier", "top_k", "blocks", "foo", ""]
TARGETS = ["model", "prompt", "engine:max_num_seqs", "engine:trust_remote_code", "hf:num_hidden_layers",
           "sampling:top_p", "bogus", "engine", ""]
scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-2, 5000)
    | st.floats(allow_nan=True) | st.text(max_size=12) | st.dates()
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.integers(0, 3), inner, max_size=3),
    max_leaves=12,
)
spec_dicts = st.fixed_dictionaries(
    {},
    optional={
        "axes": st.dictionaries(st.sampled_from(AXES) | st.text(max_size=6), st.lists(values, max_size=4) | values,
                                max_size=5),
        "mapping": st.dictionaries(st.sampled_from(AXES) | st.text(max_size=6), st.sampled_from(TARGETS) | values,
                                   max_size=4),
        "device": st.sampled_from(["cpu", "cuda", "tpu"]) | values,
        "ladder": st.lists(st.sampled_from(["cpu-tiny", "cpu-small", "/nonexistent", ""]) | values, max_size=3),
        "engine": st.dictionaries(st.text(max_size=8), values, max_size=3) | values,
        **{k: values for k in ("reps", "same_prompt_repeats", "max_new_tokens", "seed", "prompts",
                               "telemetry_interval_ms", "trust_remote_code", "colour")},
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=spec_dicts)
@example(data={"axes": {"foo": [{1: 1, "a": 2}]}, "mapping": {"foo": "engine:x"}})
@example(data={"axes": {"text_tokens": [float("nan")]}})
def test_fuzz_build_spec_gives_a_spec_or_a_spec_error(data: dict[str, Any]) -> None:
    try:
        spec = build_spec(data)
    except SpecError as e:
        assert str(e).startswith("invalid spec: ")
        return
    assert isinstance(spec, SweepSpec)
    points = expand(spec)  # a valid spec expands; --resume rebuilds it from the manifest's JSON
    assert len({p.point_id for p in points}) == len(points)
    assert build_spec(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


@settings(max_examples=150, deadline=None)
@given(
    suffix=st.sampled_from([".toml", ".yaml", ".yml"]),
    content=st.text(max_size=200)
    | st.binary(max_size=100)
    | st.sampled_from(
        ["reps = 2\n[axes]\ntier = [0]\n", "axes: {tier: [0, 0]}\n", "a: !!python/object:os.system [x]",
         "? [a, b]\n: c\n", "axes:\n  text_tokens: [.inf]\n"]
    ),
)
def test_fuzz_spec_files_give_a_spec_or_a_spec_error(suffix: str, content: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"spec{suffix}"
        if isinstance(content, bytes):
            f.write_bytes(content)
        else:
            f.write_text(content, encoding="utf-8")
        try:
            spec = build_spec(load_spec_file(f))
        except SpecError as e:
            assert "\n" not in str(e).strip()
            return
        assert isinstance(spec, SweepSpec)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["text", "prompt", "content", "value", "conversations", "from", "x"]), inner,
                      max_size=3),
    max_leaves=15,
)
prompt_contents = (
    st.text(max_size=300)
    | st.binary(max_size=200)
    | json_values.map(json.dumps)
    | st.lists(json_values.map(json.dumps), max_size=5).map("\n".join)
)


@settings(max_examples=200, deadline=None)
@given(suffix=st.sampled_from([".json", ".jsonl", ".txt"]), content=prompt_contents)
@example(suffix=".json", content="[" * 50_000)
@example(suffix=".jsonl", content='{"text": "a"}\n' + "[" * 3000)
@example(suffix=".json", content='{"conversations": [{"from": "human", "value": 3}, "x"]}')
@example(suffix=".jsonl", content='{"text": "a lone surrogate \\ud800 from a JSON escape"}')
def test_fuzz_prompt_files_give_documents_or_a_spec_error(suffix: str, content: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / f"prompts{suffix}"
        if isinstance(content, bytes):
            f.write_bytes(content)
        else:
            f.write_text(content, encoding="utf-8")
        try:
            docs = load_documents(str(f))
        except SpecError as e:
            assert str(f) in str(e) and "\n" not in str(e)
            return
        assert docs and all(isinstance(doc, Document) and doc.text.strip() for doc in docs)
        for doc in docs:
            doc.text.encode("utf-8")  # the tokenizer and Parquet need valid UTF-8
