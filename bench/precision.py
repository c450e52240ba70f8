"""Cosine similarity of half-precision outputs against float32, on the full "sam3" configuration.

The weights are the deterministic parity weights of `tools/parity_weights.py` (scaled like trained weights, so
activations have realistic ranges); the input is `parity_images`. Prints one Markdown row per dtype.

    python bench/precision.py --imgsz 336
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sam3core import build_sam3_vl_backbone, get_config  # noqa: E402
from tools.parity_weights import PARITY_CAPTIONS, deterministic_tensor, parity_images  # noqa: E402


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imgsz", type=int, default=336)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    args = parser.parse_args(argv)

    config = get_config("sam3")
    model = build_sam3_vl_backbone(config="sam3", imgsz=args.imgsz)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(deterministic_tensor("detector.backbone." + name, tensor.shape, tensor.dtype))
    images = parity_images(config, args.imgsz)
    captions = list(PARITY_CAPTIONS)
    with torch.inference_mode():
        reference = model(images, captions)
    print(f"# {date.today()}, sam3 config at {args.imgsz} px, CPU, torch {torch.__version__}")
    print("| dtype | vision_features | backbone_fpn[0] | language_features | language_embeds |")
    print("|---|---|---|---|---|")
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for dtype_name in args.dtypes:
        model.load_state_dict(weights)  # a round trip through a half dtype would round the weights
        model.to(getattr(torch, dtype_name))
        with torch.inference_mode():
            low = model(images, captions)
        cells = [
            cosine(reference["vision_features"], low["vision_features"]),
            cosine(reference["backbone_fpn"][0], low["backbone_fpn"][0]),
            cosine(reference["language_features"], low["language_features"]),
            cosine(reference["language_embeds"], low["language_embeds"]),
        ]
        print(f"| {dtype_name} | " + " | ".join(f"{c:.6f}" for c in cells) + " |")
        model.to(torch.float32)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
