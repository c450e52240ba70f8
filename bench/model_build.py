"""What building the model costs a model actor, whole and with the parts it will not run left unbuilt.

Each variant builds the model in a fresh process, as `EmbedWorker` does (`build_sam3_vl_backbone`, eager, on the
CPU), and reports the seconds the build took and the process's peak resident memory:

- whole: every weight made;
- no text encoder: `defer=("text",)`, what an actor of a run whose input has no caption builds;
- no trunk: `defer=("trunk",)`, what an actor that loads the shared AOTInductor package builds;
- neither: both.

Weights are random (seeded), or read from a checkpoint in the official `sam3.pt` layout that the benchmark writes
first (`--checkpoint`: about 3.2 GB for "sam3", in a temporary folder; the page cache then holds it, as it would on a
node that has just fetched it). Variants run in turn, `--rounds` times.

    python bench/model_build.py --config sam3 --dtype bfloat16 --rounds 2
    python bench/model_build.py --config sam3 --dtype bfloat16 --rounds 2 --checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"whole": (), "no text encoder": ("text",), "no trunk": ("trunk",), "neither": ("trunk", "text")}


def child(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from sam3core import build_sam3_vl_backbone

    torch.manual_seed(0)
    started = time.perf_counter()
    checkpoint = args.checkpoint_path or None
    model = build_sam3_vl_backbone(
        checkpoint, config=args.config, imgsz=args.imgsz, dtype=args.dtype, defer=VARIANTS[args.variant]
    )
    built = time.perf_counter() - started
    return {
        "build_s": built,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "pending": model.pending_weights(),
    }


def write_checkpoint(config: str, directory: str) -> str:
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from sam3core import build_sam3_vl_backbone
    from sam3core.checkpoint import OFFICIAL_PREFIX

    torch.manual_seed(0)
    model = build_sam3_vl_backbone(config=config, imgsz=1008)
    path = os.path.join(directory, "sam3.pt")
    torch.save({"model": {OFFICIAL_PREFIX + k: v for k, v in model.state_dict().items()}}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sam3")
    parser.add_argument("--imgsz", type=int, default=1008)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoint", action="store_true", help="load a checkpoint the benchmark writes first")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint-path", default="", help=argparse.SUPPRESS)
    parser.add_argument("--write-checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.write_checkpoint:
        print(write_checkpoint(args.config, args.write_checkpoint))
        return 0

    with tempfile.TemporaryDirectory(prefix="sam3-model-build-") as scratch:
        checkpoint = ""
        if args.checkpoint:  # in a process of its own: a child's peak memory starts from its parent's at the fork
            command = [sys.executable, __file__, "--write-checkpoint", scratch, "--config", args.config]
            checkpoint = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1]
        weights = f"checkpoint {os.path.getsize(checkpoint) / 1e9:.2f} GB" if checkpoint else "random weights"
        print(f"# {date.today()} {args.config}, {args.dtype}, {weights}", flush=True)
        results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name in VARIANTS:
                command = [sys.executable, __file__, "--child", "--variant", name, "--config", args.config]
                command += ["--imgsz", str(args.imgsz), "--dtype", args.dtype, "--checkpoint-path", checkpoint]
                env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
                out = subprocess.run(command, capture_output=True, text=True, env=env)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(name, results[name][-1], flush=True)
    print("\n| variant | build, s (each round) | peak memory, GB (each round) |")
    print("|---|---|---|")
    for name, runs in results.items():
        builds = ", ".join(f"{r['build_s']:.1f}" for r in runs)
        peaks = ", ".join(f"{r['peak_rss_gb']:.2f}" for r in runs)
        print(f"| {name} | {builds} | {peaks} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
