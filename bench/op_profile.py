"""Where one compiled `forward_image` of the "sam3" configuration spends its time, by operator (`torch.profiler`).

Builds the model with the SAM 2 twin neck, casts it to bfloat16, compiles it as `compile="auto"` decides, pays the
compilation on one call, then profiles one call and prints the operators by their own time.

    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor python bench/op_profile.py --imgsz 1008
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam3core import build_sam3_vl_backbone
from sam3core.compile import apply_compile, compile_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imgsz", type=int, default=1008)
    parser.add_argument("--rows", type=int, default=12, help="operators to print")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_sam3_vl_backbone(config="sam3", imgsz=args.imgsz, add_sam2_neck=True).to(torch.bfloat16)
    plan = compile_plan("auto", "cpu", torch.bfloat16)
    apply_compile(model.vision_backbone, plan)
    images = torch.randn(1, 3, args.imgsz, args.imgsz)
    with torch.inference_mode():
        start = time.perf_counter()
        model.forward_image(images)
        print(f"# {date.today()}, torch {torch.__version__}, {torch.get_num_threads()} threads, {plan.describe()}")
        print(f"first call (compilation): {time.perf_counter() - start:.1f} s")
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            start = time.perf_counter()
            model.forward_image(images)
            print(f"profiled call: {time.perf_counter() - start:.2f} s")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
