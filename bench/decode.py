"""Rows per second per core of the CPU stage's decoding on real-sized photos, with and without JPEG draft mode,
and what draft mode does to pixels and embeddings.

Writes N 3000 x 4000 JPEG files (quality 90; smooth colour fields with edges and fine noise, so that the encoded
size, about 2-4 MB, is that of a phone photo), then times `pipeline.input.decode.decode_image` (decode, EXIF
orientation, RGB, resize to imgsz) in one process with one torch thread, i.e. one core:

- full decode (the default), then resize;
- `draft=k`: libjpeg's DCT scaling decodes at 1/2, 1/4 or 1/8 scale while both sides stay >= k * imgsz.

For each draft setting it prints the mean and max absolute pixel difference to the full decode, and the cosine
similarity of the pooled image embedding (float32 model) to the full-decode one, next to the same image's
bfloat16-vs-float32 cosine: the bfloat16 noise that bounds what draft mode may change.

    python bench/decode.py --images 6 --imgsz 336 1008 --embed-imgsz 336

`--photos WxH ...` times several photo sizes (2 to 12 megapixels, as phones and cameras write them) and prints,
per output size, the mix's rate per core and the cores one GPU needs to be fed at `--gpu-rate` images per second
(the CPU:GPU ratio written into infra/kuberay/*.yaml):

    python bench/decode.py --images 4 --imgsz 1008 --photos 1600x1200 2448x3264 3000x4000 --embed-imgsz 0
"""

from __future__ import annotations

import argparse
import os
import platform
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

from pipeline.input.decode import decode_image  # noqa: E402
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
    # best of `repeats` passes: a shared machine only ever slows a pass down
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for data in images:
            decode_image(data, imgsz, draft=draft)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def rows_per_cpu_second(images: list[bytes], imgsz: int, draft: int, repeats: int = 3) -> float:
    """Rows per second of this process's CPU time (one thread): what one core does, even on a machine whose
    other processes take turns on the same cores (wall-clock rates there fall with the load)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for data in images:
            decode_image(data, imgsz, draft=draft)
        best = min(best, time.process_time() - start)
    return len(images) / best


def cpu_flags() -> str:
    """The flags that decide decode speed (SIMD width), as /proc/cpuinfo names them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in flags if f in {"sse4_2", "avx", "avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_tile"}]
    return f"{model}; {' '.join(wanted)}"


def photo_mix(sizes: list[str], count: int, imgsz_list: list[int], drafts: list[int], gpu_rate: float) -> None:
    """Rows per second per core for each photo size and the mean time over the mix: cores per GPU."""
    print(f"\n# per photo size, {count} JPEGs each, 1 thread, rows per CPU-second ({cpu_flags()})")
    print("| photo | MB | imgsz | decode | rows/s per core | cores per GPU at " + f"{gpu_rate:g} img/s |")
    print("|---|---|---|---|---|---|")
    mix_seconds: dict[tuple[int, int], list[float]] = {}
    for size in sizes:
        width, height = (int(v) for v in size.lower().split("x"))
        images = [photo(seed, width, height) for seed in range(count)]
        mb = np.mean([len(d) for d in images]) / 1e6
        for imgsz in imgsz_list:
            for draft in drafts:
                rate = rows_per_cpu_second(images, imgsz, draft)
                mix_seconds.setdefault((imgsz, draft), []).append(1 / rate)
                label = "full" if draft == 0 else f"draft >= {draft}x imgsz"
                print(
                    f"| {width}x{height} ({width * height / 1e6:.1f} MP) | {mb:.1f} | {imgsz} | {label} | "
                    f"{rate:.2f} | {gpu_rate / rate:.1f} |",
                    flush=True,
                )
    for (imgsz, draft), seconds in mix_seconds.items():
        rate = 1 / float(np.mean(seconds))
        label = "full" if draft == 0 else f"draft >= {draft}x imgsz"
        print(f"| mix of the sizes above (equal shares) | | {imgsz} | {label} | {rate:.2f} | {gpu_rate / rate:.1f} |")


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
    parser.add_argument("--photos", nargs="*", default=[], help="photo sizes WxH for the per-size table")
    parser.add_argument("--gpu-rate", type=float, default=100.0, help="images/s one GPU embeds (the goal)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core, as one decoding task has
    if args.photos:
        photo_mix(args.photos, args.images, args.imgsz, args.drafts, args.gpu_rate)
        return 0
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
