"""Run Meta's own segmentation head (sam3 0.1.4) on `backbone_out` from the feature cache and from pixels.

Meta's detector cannot be built on a CPU-only machine (its decoder imports torchvision; several paths hard-code
CUDA), so CI checks only what Meta's code reads from the dictionary (`tests/test_feature_cache.py`). This tool goes
one step further by hand: Meta's `UniversalSegmentationHead` with its `PixelDecoder` (`maskformer_segmentation.py`,
which imports only torch) runs on both dictionaries. Two steps, two environments:

    # 1. project venv: a run with `trunk` stored (e.g. bench/feature_cache.py's), a few of its images
    python tools/check_meta_heads.py export --output /tmp/sam3-feature-cache-bench/out_1008 \
        --checkpoint /tmp/sam3-feature-cache-bench/sam3_parity.pt --ids red_circle --out /tmp/meta_heads.pt
    # 2. reference venv with Meta's wheel (tools/official_sam3.py)
    .refenv/bin/python tools/check_meta_heads.py check /tmp/meta_heads.pt

The head gets random weights (seeded) and random object queries and encoder states; both dictionaries go through
the same head with the same inputs, so any difference comes from the dictionaries alone.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def export(output: str, checkpoint: str, ids: list[str], path: str) -> None:
    import json

    from PIL import Image

    from pipeline.cache.feature_cache import FeatureCache
    from pipeline.dataset.reader import read_embeddings
    from pipeline.heads import meta_backbone_out
    from sam3core import preprocess_images

    cache = FeatureCache(output, checkpoint=checkpoint)
    images = cache.load(ids)
    cached = meta_backbone_out(images)
    table = read_embeddings(output, columns=["id", "source_uri"])
    sources = dict(zip(table.column("id").to_pylist(), table.column("source_uri").to_pylist(), strict=True))
    pixels = preprocess_images([Image.open(sources[i]).convert("RGB") for i in ids], cache.backbone.imgsz)
    with torch.inference_mode():
        direct = cache.backbone.forward_image(pixels)
    keep = ("backbone_fpn", "vision_pos_enc")
    torch.save(
        {
            "cached": {k: [t.clone() for t in cached[k]] for k in keep},
            "direct": {k: [t.clone() for t in direct[k]] for k in keep},
            "meta": json.dumps({"output": output, "ids": ids, "feature_dtype": cache.metadata["feature_dtype"]}),
        },
        path,
    )
    print(f"wrote {path}")


def check(path: str) -> int:
    from tools.official_sam3 import _installed_package_dir, _register_bare_package

    _register_bare_package("sam3", _installed_package_dir("sam3"))
    segmentation = importlib.import_module("sam3.model.maskformer_segmentation")
    if "torchvision" in sys.modules:
        raise RuntimeError("torchvision was imported")
    data = torch.load(path)
    levels = data["cached"]["backbone_fpn"]
    batch, width = levels[0].shape[:2]
    torch.manual_seed(0)
    head = segmentation.UniversalSegmentationHead(
        hidden_dim=width,
        upsampling_stages=3,
        pixel_decoder=segmentation.PixelDecoder(hidden_dim=width, num_upsampling_stages=3),
    ).eval()
    side = levels[-1].shape[-1]
    queries = torch.randn(1, batch, 20, width)  # [decoder layers, B, queries, d]
    encoder = torch.randn(side * side, batch, width)  # [HW, B, d]: Meta replaces the last level with it
    outputs = {}
    with torch.inference_mode():
        for name in ("cached", "direct"):
            outputs[name] = head(
                backbone_feats=data[name]["backbone_fpn"],
                obj_queries=queries,
                image_ids=torch.arange(batch),
                encoder_hidden_states=encoder,
            )
    print(data["meta"])
    for key in ("pred_masks", "semantic_seg"):
        a, b = outputs["cached"][key], outputs["direct"][key]
        scale = float(b.abs().max())
        print(
            f"{key}: shape {list(a.shape)}, max |cached - direct| = {float((a - b).abs().max()):.3e} "
            f"(max |x| {scale:.3f})"
        )
    masks_a, masks_b = outputs["cached"]["pred_masks"] > 0, outputs["direct"]["pred_masks"] > 0
    iou = (masks_a & masks_b).sum((-2, -1)) / (masks_a | masks_b).sum((-2, -1)).clamp(min=1)
    print(f"smallest mask IoU: {float(iou.min()):.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    exporter = commands.add_parser("export")
    exporter.add_argument("--output", required=True)
    exporter.add_argument("--checkpoint", required=True)
    exporter.add_argument("--ids", nargs="+", required=True)
    exporter.add_argument("--out", required=True)
    checker = commands.add_parser("check")
    checker.add_argument("path")
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.output, args.checkpoint, args.ids, args.out)
        return 0
    return check(args.path)


if __name__ == "__main__":
    raise SystemExit(main())
