"""The `vllm serve` process that `profile serve-bench` drives (harness/drivers/serve.py): its model folder and
command line, its start, `/health`, `/metrics` and CPU time, and its bounded stop that leaves nothing running."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.engine.reaper import Reaper, descendants, stop_processes
from harness.rundata.prompts import FALLBACK_TOKENIZER

# engine arguments that are the harness engine's own business, not a server's
NOT_FOR_SERVER = {"skip_tokenizer_init", "enable_logging_iteration_details", "model", "trust_remote_code"}


class ServeError(RuntimeError):
    """The server or the client failed (one line; the run folder keeps the logs)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_model_dir(model_path: str, folder: Path) -> Path:
    """A model folder a server can load with dummy weights: the config, and a tokenizer (the model's own, else
    the shipped one) with a `tokenizer_config.json` naming PreTrainedTokenizerFast (docs/vllm-notes.md)."""
    folder.mkdir(parents=True, exist_ok=True)
    src = Path(model_path)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, folder / name)
    if not (folder / "tokenizer.json").is_file():
        shutil.copy2(FALLBACK_TOKENIZER, folder / "tokenizer.json")
    if not (folder / "tokenizer_config.json").is_file():
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def server_command(engine_args: dict[str, Any], model_dir: Path, port: int, name: str) -> list[str]:
    """The API server's command line: the engine arguments as flags (`--no-x` for a false switch)."""
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-uvicorn-access-log",
    ]
    for key, value in engine_args.items():
        if key in NOT_FOR_SERVER or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict | list):
            cmd += [flag, json.dumps(value)]
        else:
            cmd += [flag, str(value)]
    if engine_args.get("trust_remote_code"):
        cmd.append("--trust-remote-code")
    return cmd


def _get(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (loopback only)
        return str(r.read().decode())


class Server:
    """A `vllm serve` process group on 127.0.0.1; `stop()` is bounded and leaves nothing running."""

    def __init__(self, cmd: list[str], log_path: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.cmd, self.log_path, self.port = cmd, log_path, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=self.env,
            )
        finally:
            log.close()
        Reaper.get().scan()

    def wait_healthy(self, timeout_s: float, stop: Callable[[], bool] = lambda: False) -> float:
        """Seconds until `/health` answered 200; ServeError if the server exits or `timeout_s` passes first."""
        assert self.proc is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise ServeError(
                    f"the server exited with code {self.proc.returncode} before it was healthy (see {self.log_path})"
                )
            if stop():
                raise ServeError("stopped before the server was healthy")
            with contextlib.suppress(OSError, urllib.error.URLError):
                _get(self.base_url + "/health", 2.0)
                Reaper.get().scan()
                return time.monotonic() - t0
            time.sleep(0.5)
        raise ServeError(f"the server was not healthy within {timeout_s:.0f} s (see {self.log_path})")

    def metrics(self) -> str:
        return _get(self.base_url + "/metrics", 10.0)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) so far of the API server process (the front end: HTTP, tokenizing,
        detokenizing, streaming) and of its descendants (the engine core and its workers); {} when unreadable."""
        import psutil

        if self.proc is None:
            return {}
        try:
            front = psutil.Process(self.proc.pid)
            t = front.cpu_times()
            engine = 0.0
            for child in front.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    engine += c.user + c.system
            return {"api_server": t.user + t.system, "engine": engine}
        except psutil.Error:
            return {}

    def models(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(_get(self.base_url + "/v1/models", 10.0))
        return data

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """SIGINT to the server's group (vLLM's clean shutdown), then SIGTERM/SIGKILL to any process of it left
        after `timeout_s`. Returns the pids that had to be signalled after SIGINT."""
        if self.proc is None:
            return []
        family = descendants([self.proc.pid])
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGINT)
        left = stop_processes(family, wait_s=timeout_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5.0)
        return left


def parse_metrics(text: str) -> dict[str, Any]:
    """From Prometheus text: the `vllm:cache_config_info` labels (num_gpu_blocks, block_size, ...) and each
    counter/histogram `_sum`/`_count` summed over labels (the engine's own queue, prefill, decode times)."""
    out: dict[str, Any] = {"cache_config": {}, "totals": {}}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{") if "{" in line.split(" ")[0] else (line.split(" ")[0], "", "")
        value_text = line.rsplit(" ", 1)[-1]
        if name == "vllm:cache_config_info":
            labels = rest.rsplit("}", 1)[0]
            for part in labels.split('",'):
                k, _, v = part.partition("=")
                out["cache_config"][k.strip()] = v.strip().strip('"')
            continue
        if name.endswith(("_sum", "_count", "_total")):
            with contextlib.suppress(ValueError):
                out["totals"][name] = out["totals"].get(name, 0.0) + float(value_text)
    return out


def async_scheduling(args: dict[str, Any], device: str) -> bool:
    """Whether the server schedules the next step before the last one's outputs are processed: never on the CPU
    build (vllm/platforms/cpu.py sets it off), else the argument given, else vLLM's default, on
    (vllm/config/vllm.py, for a generative model without speculative decoding)."""
    if device != "cuda":
        return False
    given = args.get("async_scheduling")
    return True if given is None else bool(given)
