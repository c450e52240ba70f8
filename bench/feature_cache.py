"""Feature cache on the full "sam3" configuration: bytes per image of every stored feature, the trunk map's range
in float16, and transformers' SAM 3 heads run from the cache against the whole model, side by side in one run.

1. Writes a checkpoint with the parity weights (`tools/parity_weights.py`, 1/sqrt(fan_in) scale; not trained
   weights) for the backbone with the SAM 2 neck, and runs the pipeline (`run_job`, local Ray, CPU, float32 compute)
   on the first `--images` images of the demo dataset with `trunk`, `vision_features`, `backbone_fpn` and
   `sam2_backbone_fpn` stored in float16.
2. Bytes per image of each stored column: raw (values x 2 bytes) and as written (zstd), from the Parquet footers.
3. transformers' `Sam3Model` at its default head sizes (random heads with the parity scale), its backbone loaded
   with the same weights (`tests/hf_sam3_model.py`). Per image, one prompt (the image's caption):
   - whole model: `get_vision_features(pixel_values)`, then the heads with `input_ids` (its own text encoder);
   - from the cache: `FeatureCache.load` (Parquet read, neck rebuilt, float16 -> float32), `FeatureCache.text`,
     then the heads with `vision_embeds` / `text_embeds`.
   Both in float32 on the CPU at torch's default thread count; the largest |value| of the float32 trunk map and the
   float16 storage error come from the same run, and so does the agreement of the two paths' outputs.

    python bench/feature_cache.py --images 3 --prepare-only  # checkpoint, pipeline run
    python bench/feature_cache.py --images 3                 # reuses them; timed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline import JobConfig, run_job  # noqa: E402
from pipeline.cache.feature_cache import FeatureCache  # noqa: E402
from pipeline.dataset.reader import open_embeddings  # noqa: E402
from pipeline.dataset.sizes import feature_sizes  # noqa: E402
from pipeline.heads import transformers_text_embeds, transformers_vision_embeds  # noqa: E402
from pipeline.run.demo import write_sample_dataset  # noqa: E402
from sam3core import build_sam3_vl_backbone, get_config, preprocess_images  # noqa: E402
from tests.hf_sam3_model import transformers_sam3_model  # noqa: E402
from tools.parity_weights import deterministic_tensor  # noqa: E402

FEATURES = ["trunk", "vision_features", "backbone_fpn", "sam2_backbone_fpn"]
FLOAT16_MAX = 65504.0


def write_parity_checkpoint(path: Path, imgsz: int) -> None:
    model = build_sam3_vl_backbone(config="sam3", imgsz=imgsz, add_sam2_neck=True)
    state = {}
    for name, tensor in model.state_dict().items():
        key = "detector.backbone." + name
        state[key] = deterministic_tensor(key, tensor.shape, tensor.dtype)
    del model
    torch.save(state, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=1008)
    parser.add_argument("--workdir", default="/tmp/sam3-feature-cache-bench")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the checkpoint and run the pipeline (kept in --workdir for the timed run), print sizes, stop",
    )
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    checkpoint = work / "sam3_parity.pt"
    if not checkpoint.exists():
        started = time.perf_counter()
        write_parity_checkpoint(checkpoint, args.imgsz)
        print(f"parity checkpoint written in {time.perf_counter() - started:.0f} s")
    dataset = write_sample_dataset(work / "data")
    rows = [json.loads(line) for line in dataset.manifest.read_text().splitlines()][: args.images]
    manifest = work / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    output = work / f"out_{args.imgsz}"
    if not (output / "_SUCCESS").exists():
        import shutil

        import ray

        shutil.rmtree(output, ignore_errors=True)
        started = time.perf_counter()
        run_job(
            JobConfig.from_dict(
                {
                    "input": {"uri": str(manifest)},
                    "output": {"uri": str(output), "features": FEATURES, "feature_dtype": "float16"},
                    "model": {"config": "sam3", "imgsz": args.imgsz, "checkpoint": str(checkpoint)},
                    "compute": {"batch_size": 1},
                }
            )
        )
        ray.shutdown()
        print(f"pipeline run: {len(rows)} images in {time.perf_counter() - started:.0f} s")

    print(f"\n### Bytes per image, `sam3` at {args.imgsz} px, float16\n")
    print("| column | per image | raw | in the files (zstd) | per million images (files) |")
    print("|---|---|---|---|---|")
    for size in feature_sizes(open_embeddings(str(output))):
        shape = " x ".join(str(d) for d in size.shape)
        print(
            f"| `{size.name}` | [{shape}] {size.dtype} | {size.raw_bytes / 1e6:.3f} MB | "
            f"{size.stored_bytes / 1e6:.3f} MB | {size.stored_bytes / 1e6:.3g} TB |"
        )

    if args.prepare_only:
        return 0
    config = get_config("sam3")
    cache = FeatureCache(str(output), checkpoint=str(checkpoint))
    state = torch.load(checkpoint, map_location="cpu", mmap=True)
    started = time.perf_counter()
    model = transformers_sam3_model(state, config, args.imgsz, small_heads=False)
    del state
    print(f"\ntransformers Sam3Model (default head sizes) built and loaded in {time.perf_counter() - started:.0f} s")
    heads = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("vision_encoder", "text_encoder")))
    print(f"head parameters: {heads / 1e6:.1f} M")

    from PIL import Image

    whole_s, cache_s, magnitudes, storage_errors, agreement = [], [], [], [], []
    with torch.inference_mode():
        # one untimed pass of both paths on the first image: first-call allocations and caches
        warm = cache.load([rows[0]["id"]])
        text_embeds, mask = transformers_text_embeds(cache.text([rows[0]["caption"]]))
        model(vision_embeds=transformers_vision_embeds(warm), text_embeds=text_embeds, attention_mask=mask)
        pixels = preprocess_images([Image.open(rows[0]["image"]).convert("RGB")], args.imgsz)
        model(pixel_values=pixels, text_embeds=text_embeds, attention_mask=mask)
        for row in rows:
            pixels = preprocess_images([Image.open(row["image"]).convert("RGB")], args.imgsz)
            tokens = cache.backbone.language_backbone.tokenize([row["caption"]])

            started = time.perf_counter()
            vision = model.get_vision_features(pixel_values=pixels)
            whole = model(
                vision_embeds=vision, input_ids=tokens, attention_mask=(tokens != 0).long()
            )  # pads are id 0; the start token never is
            whole_s.append(time.perf_counter() - started)

            started = time.perf_counter()
            images = cache.load([row["id"]])
            text_embeds, mask = transformers_text_embeds(cache.text([row["caption"]]))
            cached = model(
                vision_embeds=transformers_vision_embeds(images), text_embeds=text_embeds, attention_mask=mask
            )
            cache_s.append(time.perf_counter() - started)

            trunk = vision.last_hidden_state  # [1, g*g, width], float32, the whole model's own trunk
            stored = images.trunk.flatten(2).transpose(1, 2)
            magnitudes.append(float(trunk.abs().max()))
            storage_errors.append(float((stored - trunk).abs().max() / trunk.abs().max()))
            a, b = whole.pred_masks > 0, cached.pred_masks > 0
            iou = float(((a & b).sum((-2, -1)) / (a | b).sum((-2, -1)).clamp(min=1)).min())
            agreement.append(
                (
                    float((whole.pred_logits - cached.pred_logits).abs().max()),
                    float((whole.pred_boxes - cached.pred_boxes).abs().max()),
                    iou,
                )
            )
            print(f"{row['id']}: whole {whole_s[-1]:.2f} s, from the cache {cache_s[-1]:.2f} s")

    whole_mean, cache_mean = sum(whole_s) / len(whole_s), sum(cache_s) / len(cache_s)
    print(f"\n### transformers' SAM 3 heads, `sam3` at {args.imgsz} px, float32, CPU, one prompt per image\n")
    print(f"| path | s per image (mean of {len(rows)}) |")
    print("|---|---|")
    print(f"| whole model: pixels -> ViT + neck -> heads (own text encoder) | {whole_mean:.2f} |")
    print(f"| from the cache: Parquet -> neck -> heads (FeatureCache.text) | {cache_mean:.2f} |")
    print(f"\nspeed-up from the cache: {whole_mean / cache_mean:.1f}x")
    print(
        f"largest |trunk value| (parity weights): {max(magnitudes):.2f} "
        f"({max(magnitudes) / FLOAT16_MAX:.1e} of float16's range)"
    )
    print(f"float16 storage: largest |error| of the trunk map / its largest |value|: {max(storage_errors):.2e}")
    logits, boxes, iou = (max(a[0] for a in agreement), max(a[1] for a in agreement), min(a[2] for a in agreement))
    print(
        f"cache (float16) vs whole model: pred_logits {logits:.2e}, pred_boxes {boxes:.2e}, smallest mask IoU {iou:.4f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
