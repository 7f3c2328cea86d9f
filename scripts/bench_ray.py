"""The same small Ray sweep on 1 and on 2 workers: wall time, and points and engine starts per worker.

    .venv/bin/python scripts/bench_ray.py [--out /tmp/bench-ray]

Prints figures; not a timed test. The sweep: the tiny preset, 2 engine configs (block sizes 32 and 64), 2 prompt
lengths, 3 requests per point, 9 tokens each. Two workers on one machine share its cores (`--ray-share-device`,
one core each): on a 2-core machine the two engines compete for the same cores, so a speed-up shows only that the
work is spread over the workers, not what two devices would give.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = ["--tier", "0", "--blocks", "32,64", "--text-tokens", "64,256", "--top-k", "0", "--reps", "2",
         "--same-prompt-repeats", "1", "--max-new-tokens", "9", "--warmup", "2", "--quiet"]
SETUPS = {
    "1 worker (2 cores)": ["--ray", "--ray-workers", "1"],
    "2 workers (1 core each, shared device)": ["--ray", "--ray-workers", "2", "--ray-cpus-per-worker", "1",
                                                "--ray-share-device"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="where the two run folders go (default: a temp folder)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    print(f"machine: {os.cpu_count()} cores; run folders under {out}")
    for i, (label, flags) in enumerate(SETUPS.items()):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "harness.cli", "sweep", *SWEEP, *flags, "--out", str(out),
                               "--name", f"run{i}"], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"{label}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        m = json.loads((out / f"run{i}" / "manifest.json").read_text())
        per = ", ".join(f"{w}: {p['points_done']} points, {p['engine_starts']} engine start(s)"
                        for w, p in m["cluster_progress"].items())
        starts = ", ".join(f"{s['worker']} {s['seconds']:.0f} s" for s in m["engine_starts"])
        print(f"{label}: wall {wall:.0f} s (Ray start and worker imports included); {per}; engine start times: "
              f"{starts}")
    print("note: the workers of the 2-worker run share this machine's cores, so its speed-up shows only that the "
          "work is spread over the workers")


if __name__ == "__main__":
    main()
