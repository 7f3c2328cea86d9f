"""Check GPU telemetry on a real NVIDIA GPU: sampling rate and cost, SM clock and power idle vs loaded, the
energy counter against integrated power, and the clock-event (throttle) reasons seen.

Needs torch with CUDA and nvidia-ml-py, not vLLM. From the repository root (takes ~10 s):
    PYTHONPATH=. python scripts/gpu_telemetry_check.py [--gpu 0] [--seconds 4] [--interval-ms 25]
Add --lock-mhz N to check clock locking too (needs root). Add --noise to time decode-like CUDA steps with telemetry
off, sampled in a process of its own (the harness's default) and in a thread of the measuring process, interleaved
in rounds, and to join the samples to the steps as a sweep does (issue 18 item 4 on NVML: step-time ratio and CV p90
at equal position, telemetry on against off). `--noise --cpu` runs that part on the CPU with the host's counters
(a smoke check on a machine without a GPU; its figures mean nothing for NVML).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs without PYTHONPATH too

from harness.telemetry.sampler import TelemetrySampler  # noqa: E402
from harness.telemetry.sources import (  # noqa: E402
    TelemetryError,
    TelemetrySource,
    decode_throttle_reasons,
    lock_clocks,
    open_source,
)


def _median(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(values) if values else None


def _load_gpu(torch: Any, gpu: int, seconds: float) -> tuple[float, float, float]:
    """bf16 matrix products on cuda:`gpu` for `seconds` s; returns start and end (perf_counter s), TFLOP/s."""
    device = torch.device(f"cuda:{gpu}")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    products = 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize(device)
        products += 20
    t1 = time.perf_counter()
    return t0, t1, 2 * n**3 * products / (t1 - t0) / 1e12


def check(torch: Any, source: TelemetrySource, args: argparse.Namespace) -> int:
    """Idle for a second, load the GPU, and print what telemetry saw. Returns the exit status."""
    info = source.info
    print(f"device: {info['device_name']} ({info['uuid']}), driver {info['driver_version']}, {source.reason}")
    props = torch.cuda.get_device_properties(args.gpu)
    torch_uuid = str(getattr(props, "uuid", ""))
    print(
        f"torch cuda:{args.gpu}: {props.name} uuid {torch_uuid or '?'} -> same device as NVML: "
        f"{bool(torch_uuid) and info['uuid'].endswith(torch_uuid)}"
    )
    print(
        f"power from {info['power_field']}, throttle from {info['throttle_field']}, "
        f"power limit {info.get('power_limit_w')} W, max SM clock {info.get('max_sm_clock_mhz')} MHz"
    )
    t = time.perf_counter()
    for _ in range(100):
        source.read()
    print(f"one read: {(time.perf_counter() - t) * 1e4:.0f} us; unsupported: {source.unsupported or 'none'}")

    torch.zeros(1, device=f"cuda:{args.gpu}")  # CUDA context up before the idle second
    with TelemetrySampler(source, args.interval_ms) as sampler:
        time.sleep(1.0)
        load0, load1, tflops = _load_gpu(torch, args.gpu, args.seconds)
        time.sleep(0.3)
    samples = sampler.drain()
    span = samples[-1]["t_s"] - samples[0]["t_s"]
    rate = (len(samples) - 1) / span
    gaps = sorted(b["t_s"] - a["t_s"] for a, b in zip(samples, samples[1:], strict=False))
    errors = [s["error"] for s in samples if "error" in s]
    print(
        f"\nsamples: {len(samples)} in {span:.2f} s = {rate:.1f}/s (asked {1000 / args.interval_ms:.1f}/s); "
        f"gap p50 {gaps[len(gaps) // 2] * 1e3:.1f} ms, max {gaps[-1] * 1e3:.1f} ms; errors {len(errors)}; "
        f"sampler CPU {sampler.cpu_seconds / span * 100:.2f}% of a core"
    )
    for message in sorted(set(errors))[:5]:
        print(f"  error: {message}")

    idle = [s for s in samples if load0 - 0.8 <= s["t_s"] <= load0]
    loaded = [s for s in samples if load0 + 0.5 <= s["t_s"] <= load1]
    print(f"load: {tflops:.0f} TFLOP/s bf16 for {load1 - load0:.1f} s")
    for key in ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temp_c", "gpu_util_pct", "pstate"):
        print(f"  {key:14s} idle {_median(idle, key)!s:>8}   loaded {_median(loaded, key)!s:>8}")

    window = [s for s in samples if load0 <= s["t_s"] <= load1 and s["energy_mj"] is not None and s["power_w"]]
    if len(window) >= 2:
        counter_j = (window[-1]["energy_mj"] - window[0]["energy_mj"]) / 1000
        integrated_j = sum(
            (b["t_s"] - a["t_s"]) * (a["power_w"] + b["power_w"]) / 2 for a, b in zip(window, window[1:], strict=False)
        )
        print(
            f"energy over the load: counter {counter_j:.1f} J, integrated power {integrated_j:.1f} J, "
            f"ratio {counter_j / integrated_j:.3f}"
        )
    else:
        print("energy: counter or power not available")

    seen: dict[str, int] = {}
    for s in samples:
        for name in decode_throttle_reasons(s["throttle_reasons"]):
            seen[name] = seen.get(name, 0) + 1
    print("clock-event reasons seen (samples): " + (", ".join(f"{k} ({v})" for k, v in seen.items()) or "none"))
    return 0 if samples and rate > 0.5 * 1000 / args.interval_ms else 1


def _decode_step(torch: Any, weights: list[Any], x: Any) -> Any:
    """One decode-like step: a (1, d) activation through each layer's (d, d) weight, as a batch-1 decode does."""
    for w in weights:
        x = torch.tanh(x @ w)
    return x


def noise(torch: Any, source: TelemetrySource, device: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time `args.requests` requests of `args.steps` decode-like steps per mode and round, modes shuffled per
    round; telemetry is drained at request boundaries, outside the timed steps, as the harness does. Prints and
    returns per mode: median step time, decode CV p90 at equal position (CV over the requests of a round, p90
    over positions, median over rounds), ratios to `off`, sampler CPU, and the share of steps joined to a sample."""
    import random

    import numpy as np
    import pandas as pd

    from harness.telemetry.tables import join_snapshots, telemetry_frame

    d, layers = (4096, 24) if device.startswith("cuda") else (256, 8)
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [torch.randn(d, d, device=device, generator=gen) / d**0.5 for _ in range(layers)]
    x0 = torch.randn(1, d, device=device, generator=gen)
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    for _ in range(50):  # warm-up: kernels loaded, clocks up
        _decode_step(torch, weights, x0)
    sync()
    modes = ["off", "process", "thread"]
    per_mode: dict[str, dict[str, list[float]]] = {
        m: {"step_ms": [], "cv_p90": [], "joined": [], "cpu": []} for m in modes
    }
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = modes[:]
        rng.shuffle(order)
        for mode in order:
            sampler = None if mode == "off" else TelemetrySampler(source, args.interval_ms, mode=mode)  # type: ignore[arg-type]
            times = np.zeros((args.requests, args.steps))
            rows: list[dict[str, Any]] = []
            samples: list[dict[str, Any]] = []
            if sampler is not None:
                sampler.start()
            t_wall = time.perf_counter()
            for r in range(args.requests):
                x = x0
                for k in range(args.steps):
                    t0 = time.perf_counter()
                    x = _decode_step(torch, weights, x)
                    sync()
                    t1 = time.perf_counter()
                    times[r, k] = (t1 - t0) * 1e3
                    rows.append({"point_id": 0, "rep": r, "t_start_s": t0, "t_end_s": t1})
                if sampler is not None:
                    samples += sampler.drain()
            span = time.perf_counter() - t_wall
            if sampler is not None:
                sampler.stop()
                samples += sampler.drain()
                per_mode[mode]["cpu"].append(sampler.cpu_seconds / span * 100)
                joined = join_snapshots(pd.DataFrame(rows), telemetry_frame(samples, source.name), max_gap_s=0.1)
                clock = "tel_sm_clock_mhz" if "tel_sm_clock_mhz" in joined else "tel_cpu_freq_mhz"
                per_mode[mode]["joined"].append(float(joined[clock].notna().mean()))
            cv = times.std(axis=0, ddof=1) / times.mean(axis=0) * 100
            per_mode[mode]["step_ms"].append(float(np.median(times)))
            per_mode[mode]["cv_p90"].append(float(np.percentile(cv, 90)))
    out: dict[str, Any] = {}
    base_step = statistics.median(per_mode["off"]["step_ms"])
    base_cv = statistics.median(per_mode["off"]["cv_p90"])
    print(
        f"\nnoise: {args.rounds} rounds x {args.requests} requests x {args.steps} steps per mode, "
        f"{layers} layers of {d}x{d} on {device}, sampling every {args.interval_ms:g} ms"
    )
    print(
        f"  {'mode':8s} {'step ms':>8s} {'ratio':>6s} {'CV p90 %':>9s} {'ratio':>6s} {'joined':>7s} "
        f"{'sampler CPU %':>14s} (with its start)"
    )
    for mode in modes:
        m = per_mode[mode]
        step, cvp = statistics.median(m["step_ms"]), statistics.median(m["cv_p90"])
        steps = [v / b for v, b in zip(m["step_ms"], per_mode["off"]["step_ms"], strict=True)]
        out[mode] = {
            "step_ms": step,
            "step_ratio": step / base_step,
            "step_ratio_rounds": steps,
            "cv_p90_pct": cvp,
            "cv_p90_ratio": cvp / base_cv,
            "joined": statistics.median(m["joined"]) if m["joined"] else None,
            "sampler_cpu_pct": statistics.median(m["cpu"]) if m["cpu"] else None,
        }
        joined = f"{out[mode]['joined'] * 100:6.1f}%" if m["joined"] else "      -"
        cpu = f"{out[mode]['sampler_cpu_pct']:14.2f}" if m["cpu"] else "             -"
        print(
            f"  {mode:8s} {step:8.3f} {step / base_step:6.3f} {cvp:9.2f} {cvp / base_cv:6.2f} {joined} {cpu}"
            f"   step ratio per round {min(steps):.3f}-{max(steps):.3f}"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, default=0, help="CUDA device index, as for `profile sweep --gpu`")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of matrix products")
    parser.add_argument("--interval-ms", type=float, default=25.0)
    parser.add_argument("--lock-mhz", type=int, default=None, help="also check clock locking (needs root)")
    parser.add_argument("--noise", action="store_true", help="also time decode-like steps with telemetry on/off")
    parser.add_argument("--cpu", action="store_true", help="only the --noise part, on the CPU with host counters")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None, help="write the --noise figures here")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("this check needs torch with CUDA (pip install torch)", file=sys.stderr)
        return 2
    if args.cpu:
        import os

        from harness.telemetry.sources import open_host_source

        with open_host_source(os.getpid()) as source:
            result = noise(torch, source, "cpu", args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return 0
    if not torch.cuda.is_available():
        print(
            "no CUDA GPU visible to torch (torch.cuda.is_available() is False): nothing to check",
            file=sys.stderr,
        )
        return 2
    try:
        with open_source(args.gpu) as source, lock_clocks(source, args.lock_mhz):
            status = check(torch, source, args)
            if args.noise:
                result = noise(torch, source, f"cuda:{args.gpu}", args)
                if args.json:
                    args.json.write_text(json.dumps(result, indent=1))
            return status
    except TelemetryError as exc:
        print(f"telemetry: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
