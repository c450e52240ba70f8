"""Stopping a run's local Ray cluster: Ray's own `ray.shutdown()` against `pipeline.run.console.stop_ray`.

    python bench/ray_stop.py --rounds 3

Each round starts two fresh processes, one per way, alternating. Each starts a local cluster as a run does
(`console.start_ray`, 2 CPUs), runs a small Ray Data pipeline (tasks and an actor pool, so the cluster has the
worker processes of a run), then times the stop alone. Prints one JSON line per stop and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import ray
from pipeline.run import console

ray.init = (lambda init: lambda **kw: init(num_cpus=2, **kw))(ray.init)
console.start_ray()

class Double:
    def __call__(self, batch):
        return {"x": batch["id"] * 2}

rows = ray.data.range(2000).map_batches(Double, compute=ray.data.ActorPoolStrategy(size=1), batch_size=100)
assert rows.count() == 2000
started = time.monotonic()
console.stop_ray() if sys.argv[1] == "stop_ray" else ray.shutdown()
print(json.dumps({"way": sys.argv[1], "stop_s": round(time.monotonic() - started, 3)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    times: dict[str, list[float]] = {"ray.shutdown": [], "stop_ray": []}
    for _ in range(args.rounds):
        for way in times:
            with tempfile.TemporaryDirectory(prefix="rs-", dir="/tmp") as ray_tmp:  # short: Ray's socket paths
                result = subprocess.run(
                    [sys.executable, "-c", CHILD, way],
                    capture_output=True,
                    text=True,
                    env={**env, "RAY_TMPDIR": ray_tmp},
                    timeout=300,
                )
            if result.returncode != 0:
                raise SystemExit(result.stderr[-3000:])
            line = result.stdout.strip().splitlines()[-1]
            print(line, flush=True)
            times[way].append(json.loads(line)["stop_s"])
    print(json.dumps({way: {"median_s": statistics.median(v), "all_s": v} for way, v in times.items()}))


if __name__ == "__main__":
    main()
