"""From a fresh process to its first batch: compiling cold, with a warm local cache, and loading shared artifacts.

For each image size and each kind of shared artifact (`--artifacts`: "aoti", an AOTInductor package, and
"caches", torch's portable caches with the built kernels; `sam3core.compile_cache`), fresh processes play model
actors (`pipeline.model.compile_share.warm_up_shared`, as `EmbedWorker` calls it: build the model, warm it up,
then embed one real batch), each timed from before its start to its first batch done:

1. cold: an empty inductor cache directory and an empty shared root: it compiles everything and publishes (for
   "aoti" that is exporting and compiling the package ahead of time, for "caches" compiling just in time);
2. warm local cache ("caches" only): the same inductor directory again, sharing off (a second actor on the same
   node before sharing existed; a package does not use the local cache);
3. fresh node: a new, empty inductor directory with the shared root from 1: it loads the artifact; with a package,
   it builds the model without the trunk's weights, as a model actor does (`sam3core.deferred`);
4. ("aoti" only) the same fresh node building the trunk's weights anyway, as actors did before: side by side.

Each actor's time is given when it is ready (before its first batch) and when its first batch is done.
`--no-captions` builds every actor as for an input without captions (no text encoder, as a run's actors then do).

The goal (issue 16): 3 reaches its first batch in at most 20% of the time a cold compile takes. Each kind's own cold
row is one reference; the "caches" cold row (a just-in-time compilation, what every actor paid before sharing) is
the other, and the line "aoti fresh node vs caches cold" gives that ratio. Random weights (drawing them makes the
"build" column 2 to 5 s longer than mapping a checkpoint would: `bench/model_build.py`), `compile: auto` for the
dtype (inductor with freezing for bfloat16 on a CPU).

`--pipeline` runs the same through the pipeline instead: `sam3-embed run` with two model actors on the demo
dataset (or `--rows` distinct random images: enough rows keep the run going until the second actor is ready), an
empty inductor cache and an empty shared root, once per `--artifacts` kind, and prints each actor's "model ready"
line (which says whether it compiled and published or loaded, and its warm-up time).

    python bench/startup.py --sizes 336 1008 --dtype bfloat16 --batch-size 1
    python bench/startup.py --sizes 336 1008 --dtype bfloat16 --batch-size 1 --no-captions
    python bench/startup.py --config tiny --sizes 336 1008 --dtype bfloat16 --batch-size 1
    python bench/startup.py --pipeline --config tiny --sizes 336 --dtype bfloat16 --batch-size 1 --rows 400
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


def actor(args: argparse.Namespace) -> dict:
    """One model actor in this process: what EmbedWorker does before its first batch, then that batch."""
    started = time.time()
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from pipeline.model.compile_share import expects_package, warm_up_shared
    from sam3core import build_sam3_vl_backbone

    imported = time.time()
    torch.manual_seed(0)
    # as EmbedWorker does: no trunk weights where a package will hold them (unless --keep-trunk-weights)
    dtype = getattr(torch, args.dtype)
    trunk = not args.keep_trunk_weights and expects_package(args.share or None, torch.device("cpu"), dtype, "auto")
    # --no-captions: every actor as for an input without captions (no text encoder)
    defer = ("trunk",) * trunk + ("text",) * args.no_captions
    model = build_sam3_vl_backbone(
        config=args.config, imgsz=args.imgsz, dtype=args.dtype, compile_visual="auto", defer=defer
    )
    built = time.time()
    warm_s, outcome = warm_up_shared(
        model,
        batch_size=args.batch_size,
        vision_features_only=True,
        checkpoint_id="random:0",
        cache_uri=args.share or None,
        storage_options=None,
        wait_s=3600,
    )
    weight = model.vision_backbone.trunk.patch_embed.proj.weight
    with torch.inference_mode():
        images = torch.rand(args.batch_size, 3, args.imgsz, args.imgsz, dtype=weight.dtype)
        batch_started = time.time()
        model.forward_vision_features(images)
    done = time.time()
    from torch._dynamo.utils import counters

    deferred = model.deferred_weights.get("trunk")
    return {
        "ready_at": batch_started,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "trunk_weights": "built" if deferred is None else ("left to the package" if deferred.pending else "made"),
        "import_s": imported - started,
        "build_s": built - imported,
        "warm_up_s": warm_s,
        "batch_s": done - batch_started,
        "done_at": done,
        "how": outcome.how if outcome else "not shared",
        "fx_cache": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")},
    }


def run_actor(
    imgsz: int, args: argparse.Namespace, inductor_dir: str, share: str, artifact: str, keep_trunk_weights: bool = False
) -> dict:
    command = [sys.executable, __file__, "--child", "--imgsz", str(imgsz), "--config", args.config]
    command += ["--dtype", args.dtype, "--batch-size", str(args.batch_size), "--share", share]
    command += ["--keep-trunk-weights"] if keep_trunk_weights else []
    command += ["--no-captions"] if args.no_captions else []
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_dir, "PYTHONPATH": str(REPO_ROOT)}
    env["SAM3_COMPILE_ARTIFACT"] = artifact
    started = time.time()
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"actor failed: {out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["first_batch_s"] = result.pop("done_at") - started
    result["ready_s"] = result.pop("ready_at") - started  # before its first batch
    return result


def write_distinct_images(root: str, rows: int) -> str:
    """`rows` distinct random JPEGs and a manifest of them under `root` (distinct: the pipeline computes each
    distinct image once, so repeats would not reach the model); returns the manifest's path."""
    import numpy as np
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    manifest = os.path.join(root, "manifest.jsonl")
    with open(manifest, "w") as f:
        for i in range(rows):
            path = os.path.join(root, f"img{i}.jpg")
            pixels = np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(path, quality=90)
            f.write(json.dumps({"id": f"img{i}", "image": path, "caption": f"picture {i}"}) + "\n")
    return manifest


def run_pipeline(imgsz: int, artifact: str, args: argparse.Namespace) -> None:
    """`sam3-embed run` with two model actors, fresh caches; prints the actors' model-ready lines."""
    sys.path.insert(0, str(REPO_ROOT))
    from pipeline.run.demo import write_sample_dataset

    with tempfile.TemporaryDirectory(prefix="sam3-startup-pipeline-") as scratch:
        if args.rows:
            manifest = write_distinct_images(os.path.join(scratch, "data"), args.rows)
        else:
            manifest = str(write_sample_dataset(os.path.join(scratch, "data")).manifest)
        # -v: the actors' log lines ("model ready ...") reach the driver's stderr
        command = [sys.executable, "-m", "jobs.cli", "-v", "run", "--input", manifest]
        command += ["--output", os.path.join(scratch, "out"), "--random-weights", "--model-config", args.config]
        command += ["--imgsz", str(imgsz), "--dtype", args.dtype, "--batch-size", str(args.batch_size)]
        # compile on: `auto` would run a run this small eagerly on a CPU (sam3core.compile_pays_off)
        command += ["--num-actors", "2", "--set", "model.compile=on"]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(scratch, "inductor"), "PYTHONPATH": str(REPO_ROOT)}
        env["SAM3_COMPILE_ARTIFACT"] = artifact
        started = time.time()
        out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
        elapsed = time.time() - started
        wanted = ("model ready", "compile artifact", "compile claim")
        lines = [line for line in (out.stdout + out.stderr).splitlines() if any(w in line for w in wanted)]
        print(f"{imgsz} px pipeline, {artifact}, 2 actors: exit {out.returncode} in {elapsed:.0f}s")
        for line in lines:
            print("   ", line.strip()[:400])
        for line in out.stdout.strip().splitlines()[-3:]:  # the run's summary
            print("   ", line)
        if out.returncode:
            print(out.stderr[-3000:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[336, 1008])
    parser.add_argument("--config", default="sam3")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--artifacts", nargs="+", choices=["aoti", "caches"], default=["aoti", "caches"], help="what is shared"
    )
    parser.add_argument("--pipeline", action="store_true", help="through sam3-embed run with two model actors")
    parser.add_argument(
        "--rows", type=int, default=0, help="--pipeline: this many distinct random images (0: the 12-row demo)"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--imgsz", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--share", default="", help=argparse.SUPPRESS)
    parser.add_argument("--keep-trunk-weights", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-captions", action="store_true", help="actors as for an input without captions: no text encoder built"
    )
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(actor(args)))
        return 0

    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from sam3core.cpu import cpu_features

    print(f"# {date.today()} torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_features().describe()}")
    if args.pipeline:
        for imgsz in args.sizes:
            for artifact in args.artifacts:
                run_pipeline(imgsz, artifact, args)
        return 0
    rows = []
    for imgsz in args.sizes:
        jit_cold = None  # the "caches" cold actor: a just-in-time compilation, what an actor paid before sharing
        for artifact in args.artifacts:
            with tempfile.TemporaryDirectory(prefix="sam3-startup-") as scratch:
                first, second, share = (os.path.join(scratch, n) for n in ("inductor-a", "inductor-b", "share"))
                actors = [("cold", run_actor(imgsz, args, first, share, artifact))]
                if artifact == "caches":  # a warm local cache means nothing to a package: nothing traces
                    actors.append(("warm local cache", run_actor(imgsz, args, first, "", artifact)))
                actors.append(("fresh node, shared artifact", run_actor(imgsz, args, second, share, artifact)))
                if artifact == "aoti":  # side by side: the same fresh node building the trunk's weights anyway
                    kept = run_actor(imgsz, args, second, share, artifact, keep_trunk_weights=True)
                    actors.append(("fresh node, trunk weights built too", kept))
                artifact_bytes = sum(p.stat().st_size for p in Path(share).glob("*.artifact"))
            cold = actors[0][1]["first_batch_s"]
            jit_cold = cold if artifact == "caches" else jit_cold
            for name, result in actors:
                rows.append((imgsz, artifact, name, result, result["first_batch_s"] / cold))
                print(imgsz, artifact, name, json.dumps(result), flush=True)
            print(f"{imgsz} px, {artifact}: artifact {artifact_bytes / 1e6:.1f} MB", flush=True)
        if jit_cold is not None and "aoti" in args.artifacts:
            loaded = next(r for s, a, n, r, _ in rows if s == imgsz and a == "aoti" and n.startswith("fresh"))
            print(
                f"{imgsz} px: aoti fresh node vs caches cold (just in time): {loaded['first_batch_s'] / jit_cold:.0%}"
            )
    captions = ", no captions (no text encoder)" if args.no_captions else ""
    print(f"\n{args.config}, {args.dtype}, batch {args.batch_size}{captions}: seconds from the process start")
    print(
        "| size | artifact | actor | import | build | warm-up | ready | first batch | to first batch | vs its cold | "
        "vs a cold just-in-time compile (ready, first batch) | peak memory | trunk weights | how |"
    )
    print("|---" * 14 + "|")
    for imgsz, artifact, name, r, ratio in rows:
        jit = next((j for s, a, n, j, _ in rows if s == imgsz and a == "caches" and n == "cold"), None)
        vs_jit = f"{r['ready_s'] / jit['ready_s']:.0%}, {r['first_batch_s'] / jit['first_batch_s']:.0%}" if jit else ""
        print(
            f"| {imgsz} | {artifact} | {name} | {r['import_s']:.1f} | {r['build_s']:.1f} | {r['warm_up_s']:.1f} | "
            f"{r['ready_s']:.1f} | {r['batch_s']:.1f} | {r['first_batch_s']:.1f} | {ratio:.0%} | {vs_jit} | "
            f"{r['peak_rss_gb']:.2f} GB | {r['trunk_weights']} | {r['how']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
