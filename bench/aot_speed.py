"""A packaged model against the same model compiled just in time, per batch, side by side in one process.

With `SAM3_COMPILE_ARTIFACT=aoti` the shared compile artifact is an AOTInductor package (`sam3core/aot_package.py`):
every actor that loads it runs the package's libraries instead of code inductor compiled just in time. Both are
inductor's code for the same graph with the same plan (freezing on a CPU); this checks that the packaged calls are
as fast, the measurement that would make the package the default.

Two copies of the model with the same random weights: one packaged (export and AOTInductor, as the publishing
actor does, both timed), one compiled just in time (`torch.compile` as `compile: auto` plans it, warm-up timed).
Then `--rounds` rounds call each on the same batch in turn, the order alternating, and keep each one's fastest
call; the outputs are compared by cosine similarity.

    python bench/aot_speed.py --imgsz 336 --dtype bfloat16 --batch-size 1 --rounds 5
    python bench/aot_speed.py --config tiny --imgsz 1008 --dtype bfloat16 --batch-size 1 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sam3core import build_sam3_vl_backbone  # noqa: E402
from sam3core.aot_package import build_package, install_package  # noqa: E402
from sam3core.cpu import cpu_features  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sam3")
    parser.add_argument("--imgsz", type=int, default=336)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"# {date.today()} torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_features().describe()}")

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return build_sam3_vl_backbone(config=args.config, imgsz=args.imgsz, dtype=args.dtype, compile_visual="on")

    packaged, jit = build(), build()
    started = time.monotonic()
    payload = build_package(
        packaged.vision_backbone, packaged.zero_batch_call(args.batch_size, True), packaged.compile_plan
    )
    install_package(packaged.vision_backbone, payload)
    package_s = time.monotonic() - started
    jit_s = jit.warm_up(args.batch_size, vision_features_only=True)
    print(f"package built in {package_s:.1f}s ({len(payload) / 1e6:.1f} MB); just in time: warm-up {jit_s:.1f}s")

    weight = jit.vision_backbone.trunk.patch_embed.proj.weight
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(args.batch_size, 3, args.imgsz, args.imgsz, generator=generator).to(weight.dtype)
    best = {"packaged": float("inf"), "just in time": float("inf")}
    outputs = {}
    models = {"packaged": packaged, "just in time": jit}
    with torch.inference_mode():
        for round_ in range(args.rounds):
            order = list(models) if round_ % 2 == 0 else list(reversed(models))
            for name in order:
                started = time.perf_counter()
                outputs[name] = models[name].forward_vision_features(images)
                best[name] = min(best[name], time.perf_counter() - started)
    a, b = (outputs[name].float().flatten() for name in models)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
    print(f"\n{args.config}, {args.imgsz} px, {args.dtype}, batch {args.batch_size}, fastest of {args.rounds}:")
    print("| variant | s/batch | vs just in time |")
    print("|---|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.3f} | {best['just in time'] / seconds:.2f}x |")
    print(f"cosine packaged vs just in time: {cosine:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
