"""Rows per second per core of the CPU stage's decoding on real-sized photos, with and without JPEG draft mode,
and what draft mode does to pixels and embeddings.

Writes N 3000 x 4000 JPEG files (quality 90; smooth colour fields with edges and fine noise, so that the encoded
size, about 2-4 MB, is that of a phone photo), then times `pipeline.decode.decode_image` (decode, EXIF
orientation, RGB, resize to imgsz) in one process with one torch thread, i.e. one core:

- full decode (the default), then resize;
- `draft=k`: libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 scale while both sides stay >= k * imgsz.

For each draft setting it prints the mean and max absolute pixel difference to the full decode, and the cosine
similarity of the pooled image embedding (float32 model) to the full-decode one, next to the same image's
bfloat16-vs-float32 cosine: the bfloat16 noise that bounds what draft mode may change.

    python bench/decode.py --images 6 --imgsz 336 1008 --embed-imgsz 336
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipeline.decode import decode_image  # noqa: E402
from sam3core import build_sam3_vl_backbone, normalize_images  # noqa: E402
from tools.parity_weights import deterministic_tensor  # noqa: E402


def photo(seed: int, width: int = 3000, height: int = 4000) -> bytes:
    """A photo-sized JPEG: upsampled colour fields (smooth regions and edges) plus sensor-like noise."""
    import io

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 100, width // 100, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noisy = np.clip(base + rng.normal(0, 6, size=base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def rows_per_second(images: list[bytes], imgsz: int, draft: int, repeats: int = 2) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for data in images:
            decode_image(data, imgsz, draft=draft)
    return repeats * len(images) / (time.perf_counter() - start)


def pixels(data: bytes, imgsz: int, draft: int) -> np.ndarray:
    decoded = decode_image(data, imgsz, draft=draft)
    return np.frombuffer(decoded.pixels, dtype=np.uint8).reshape(imgsz, imgsz, 3)


def pooled(model: torch.nn.Module, batch: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    model.to(dtype)
    with torch.inference_mode():
        vision = model.forward_vision_features(normalize_images(torch.from_numpy(batch)))
    return F.normalize(vision.float().mean(dim=(2, 3)), dim=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--imgsz", type=int, nargs="+", default=[336, 1008])
    parser.add_argument("--drafts", type=int, nargs="+", default=[0, 2, 1])
    parser.add_argument("--embed-imgsz", type=int, default=336, help="0: skip the embedding comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core, as one decoding task has
    images = [photo(seed) for seed in range(args.images)]
    mb = np.mean([len(d) for d in images]) / 1e6
    print(f"# {date.today()}: {args.images} JPEGs 3000x4000, {mb:.1f} MB each on average, 1 thread")
    print("| imgsz | decode | rows/s per core | mean abs pixel diff | max abs pixel diff |")
    print("|---|---|---|---|---|")
    for imgsz in args.imgsz:
        exact = [pixels(d, imgsz, 0) for d in images]
        for draft in args.drafts:
            rate = rows_per_second(images, imgsz, draft)
            diffs = [np.abs(pixels(d, imgsz, draft).astype(np.int16) - e) for d, e in zip(images, exact, strict=True)]
            label = "full" if draft == 0 else f"draft >= {draft}x imgsz"
            mean = np.mean([d.mean() for d in diffs])
            print(f"| {imgsz} | {label} | {rate:.2f} | {mean:.3f} | {max(int(d.max()) for d in diffs)} |", flush=True)
    if args.embed_imgsz:
        imgsz = args.embed_imgsz
        torch.set_num_threads(os.cpu_count() or 1)
        model = build_sam3_vl_backbone(config="sam3", imgsz=imgsz)
        with torch.no_grad():  # weights scaled like trained ones (see tools/parity_weights.py)
            for name, tensor in model.state_dict().items():
                tensor.copy_(deterministic_tensor("detector.backbone." + name, tensor.shape, tensor.dtype))
        exact = np.stack([pixels(d, imgsz, 0) for d in images])
        reference = pooled(model, exact, torch.float32)
        bf16 = (pooled(model, exact, torch.bfloat16) * reference).sum(-1)
        others = (reference @ reference.T)[~torch.eye(len(images), dtype=torch.bool)]
        print(f"\nembeddings at {imgsz} px (sam3, parity weights), cosine to the full decode in float32:")
        print("| decode | min cosine | mean cosine |")
        print("|---|---|---|")
        print(f"| full, bfloat16 model (the bf16 noise) | {bf16.min():.6f} | {bf16.mean():.6f} |")
        print(f"| (two different photos, float32) | {others.min():.6f} | {others.mean():.6f} |")
        for draft in args.drafts:
            if draft == 0:
                continue
            batch = np.stack([pixels(d, imgsz, draft) for d in images])
            cosine = (pooled(model, batch, torch.float32) * reference).sum(-1)
            print(f"| draft >= {draft}x imgsz, float32 model | {cosine.min():.6f} | {cosine.mean():.6f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
