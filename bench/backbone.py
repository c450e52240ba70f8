"""Images per second through the vision backbone: sam3core against Meta's official implementation, side by side.

Both run in the same process, on the same machine, on the same input, with the official "sam3" configuration
(weights do not change the cost, so both get the same random weights). For each image size and dtype it times
`forward_image` (ViT trunk + FPN neck + position encodings) at batch size 1 after a warm-up:

- float32: both models as built;
- bfloat16: sam3core cast with `.to(torch.bfloat16)` (its RoPE tables stay float32 by design), the official model
  under `torch.autocast` (casting it would silently drop the imaginary part of its complex RoPE buffers).

The official modules come from Meta's `sam3` wheel in a separate environment (see `tools/official_sam3.py`):

    /work/refenv/bin/python bench/backbone.py --sizes 336 1008 --dtypes float32 bfloat16 --iters 2

`--device cuda` runs the same comparison on a GPU.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import date
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from sam3core import build_sam3_vl_backbone  # noqa: E402


def official_backbone(imgsz: int, device: str) -> torch.nn.Module | None:
    try:
        from tools.make_parity_reference import build_official_backbone, load_project_config_module
        from tools.official_sam3 import load_official_modules
    except ImportError as exc:
        print(f"official implementation not importable here ({exc}); timing sam3core only", file=sys.stderr)
        return None
    official = load_official_modules()
    config = load_project_config_module().CONFIGS["sam3"]
    return build_official_backbone(official, config, imgsz).to(device).eval()


def time_forward(run: Callable[[], object], iters: int, device: str) -> float:
    """Seconds per call, after one warm-up call."""
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def compare_at(
    imgsz: int, dtypes: list[str], iters: int, device: str, with_official: bool
) -> list[tuple[int, str, float, float | None]]:
    torch.manual_seed(0)
    # the official builder adds the SAM 2 twin neck; give ours the same work
    ours = build_sam3_vl_backbone(config="sam3", imgsz=imgsz, device=device, add_sam2_neck=True)
    theirs = official_backbone(imgsz, device) if with_official else None
    if theirs is not None:
        # same names on both sides; only the official complex RoPE tables are not in ours
        missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
        assert not unexpected and all(name.endswith("freqs_cis") for name in missing), (missing, unexpected)
    images = torch.randn(1, 3, imgsz, imgsz, device=device)
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        ours.to(dtype)
        with torch.inference_mode():
            ours_s = time_forward(lambda: ours.forward_image(images), iters, device)
        theirs_s = None
        if theirs is not None:
            autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
            with torch.inference_mode(), autocast:
                theirs_s = time_forward(lambda: theirs.forward_image(images), iters, device)
        rows.append((imgsz, dtype_name, ours_s, theirs_s))
        official = f"{1 / theirs_s:8.3f} img/s ({theirs_s:6.2f} s)" if theirs_s else "n/a"
        print(f"{imgsz:5d} px {dtype_name:9s} sam3core {1 / ours_s:8.3f} img/s ({ours_s:6.2f} s)  official {official}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[336, 1008])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-official", action="store_true", help="time sam3core only")
    args = parser.parse_args(argv)

    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or 'cpu'}"
    print(f"# {date.today()} torch {torch.__version__} on {machine}, {torch.get_num_threads()} threads")
    rows = []
    for imgsz in args.sizes:
        rows += compare_at(imgsz, args.dtypes, args.iters, args.device, with_official=not args.no_official)

    print("\n| size | dtype | sam3core img/s | official img/s | ratio |")
    print("|---|---|---|---|---|")
    for imgsz, dtype_name, ours_s, theirs_s in rows:
        theirs_cell = f"{1 / theirs_s:.3f}" if theirs_s else "n/a"
        ratio = f"{theirs_s / ours_s:.2f}x" if theirs_s else "n/a"
        print(f"| {imgsz} | {dtype_name} | {1 / ours_s:.3f} | {theirs_cell} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
