"""Where loading a shared AOTInductor package goes: reading it, unpacking it, opening each module's library.

Builds the package once (`sam3core.aot_package.build_package`, random weights) into a scratch folder, then, each in
a fresh process: loads it into a freshly built model (what an actor on a fresh node does), in turn from its bytes
read whole (as actors did before 2026-12-02), from its file with each library copied out through Python (as
before `os.copy_file_range` was used) and from its file with the kernel copying (as now), and times
`install_package`, each library load and the process's peak resident memory; and loads the trunk's library twice
in a bare process (no model), to tell the loader's own work from the cost of memory the process has not touched
yet.

    python bench/aot_load.py --config sam3 --imgsz 336
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def model(args: argparse.Namespace):
    import torch

    from sam3core import build_sam3_vl_backbone

    torch.manual_seed(0)
    return build_sam3_vl_backbone(config=args.config, imgsz=args.imgsz, dtype=args.dtype, compile_visual="on")


def build(args: argparse.Namespace, path: Path) -> None:
    from sam3core.aot_package import build_package

    backbone = model(args)
    started = time.perf_counter()
    payload = build_package(backbone.vision_backbone, backbone.zero_batch_call(1, True), backbone.compile_plan)
    path.write_bytes(payload)
    print(json.dumps({"step": "build", "s": round(time.perf_counter() - started, 1), "bytes": len(payload)}))


def load_into_model(args: argparse.Namespace, path: Path, source: str) -> None:
    """Builds the model, then installs the package from its bytes read whole (the way before 2026-12-02) or
    from its file (`install_package` given the open file, as a model actor does): "file", each library copied
    out of it by the kernel (`aot_package.copy_member`, as now), or "file-python", through Python in chunks (as
    before `os.copy_file_range` was used)."""
    import sam3core.aot_package as aot_package

    if source == "file-python":
        del os.copy_file_range  # copy_member falls back to its chunked copy
    started = time.perf_counter()
    backbone = model(args)
    built = time.perf_counter() - started
    load = aot_package._load

    def timed(tar, info):
        began = time.perf_counter()
        library = load(tar, info)
        print(json.dumps({"step": "library", "s": round(time.perf_counter() - began, 2)}))
        return library

    aot_package._load = timed
    started = time.perf_counter()
    if source == "bytes":
        aot_package.install_package(backbone.vision_backbone, path.read_bytes())
    else:
        with open(path, "rb") as file:
            aot_package.install_package(backbone.vision_backbone, file)
    print(json.dumps({"step": f"load from {source}", "build_s": round(built, 1),
                      "s": round(time.perf_counter() - started, 2), "peak_rss_gb": _peak_rss_gb()}))  # fmt: skip


def _peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)


def load_bare_twice(path: Path) -> None:
    import sam3core.aot_package as aot_package

    with tarfile.open(path, mode="r") as tar:
        largest = max((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.size)
        for attempt in (1, 2):
            started, cpu = time.perf_counter(), time.process_time()
            library = aot_package._load(tar, largest)
            elapsed, cpu_s = round(time.perf_counter() - started, 2), round(time.process_time() - cpu, 2)
            print(json.dumps({"step": f"bare library load {attempt}", "member": largest.name, "s": elapsed,
                              "cpu_s": cpu_s, "peak_rss_gb": _peak_rss_gb()}))  # fmt: skip
            del library


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sam3")
    parser.add_argument("--imgsz", type=int, default=336)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rounds", type=int, default=2, help="loads from bytes and from the file, in turn")
    parser.add_argument("--step", choices=["build", "bytes", "file-python", "file", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--package", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "build":
        return build(args, args.package)
    if args.step in ("bytes", "file-python", "file"):
        return load_into_model(args, args.package, args.step)
    if args.step == "bare":
        return load_bare_twice(args.package)
    with tempfile.TemporaryDirectory(prefix="sam3-aot-load-") as scratch:
        package = Path(scratch) / "package.tar"
        common = ["--config", args.config, "--imgsz", str(args.imgsz), "--dtype", args.dtype, "--package", str(package)]
        for index, step in enumerate(("build", *["bytes", "file-python", "file"] * args.rounds, "bare")):
            # each step its own process with its own empty inductor cache, as a fresh node has
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(scratch) / f"inductor-{index}-{step}")}
            subprocess.run([sys.executable, __file__, "--step", step, *common], check=True, env=env)


if __name__ == "__main__":
    main()
