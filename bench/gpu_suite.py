"""Every GPU measurement of the production path in one call: sam3core and `EmbedWorker` on CUDA, bfloat16.

Written for a GPU machine that is lent briefly (one call of at most 10 minutes): it needs only torch, numpy,
pillow and pyarrow (no Ray, nothing installed), writes its own checkpoint (the deterministic parity weights of
`tools/parity_weights.py`, in the official `sam3.pt` layout) and its own images, and gives every section a time
budget inside one overall budget (`--budget-s`). Sections run most important first; each figure is appended to
`<out>/gpu_suite.json` (rewritten after every figure, so a call cut short keeps what was measured) and printed as
a `docs/benchmarks.md` table row.

1. env: device, versions, whether a C compiler and Python headers are there (Triton needs both to compile), the
   bfloat16 matmul peak (the fastest of several 8192^3 products).
2. weights: the parity checkpoint written to disk; FLOPs per image counted on a meta copy.
3. eager: sam3core's pooled-embedding path (`forward_vision_features`) in bfloat16, batch 1 to 64: images/s,
   peak memory, fraction of the matmul peak.
4. correctness: float32 against the recorded official outputs (`tests/data/parity_<config>_<size>.json`, the
   tests' tolerance), bfloat16 and float16 cosine against float32.
5. worker_eager: `EmbedWorker` called directly on prepared Arrow batches (uint8 pixels, as the CPU stage makes
   them) against the same model's forward alone on tensors already on the device: the actor's overhead.
6. sdpa: each SDPA backend (flash, cuDNN, memory-efficient, math) on the trunk's window (576 tokens) and global
   (5184 tokens at 1008 px) attention shapes.
7. official: Meta's implementation side by side under bfloat16 autocast (`--official DIR`, see below).
8. rope: one window block; its rotary embedding as eager code runs it (one complex multiplication), written out
   in real arithmetic (what compiled graphs fuse) and compiled: the share of the block each costs.
9. memory: peak memory per image for the pooled path and for every feature, the largest batch that fits (from
   two measured batch sizes, then checked with one call), and what the actor does on CUDA out-of-memory (the
   allocator capped so that the batch cannot fit).
10. compiled: inductor's default mode at the working batch size (compile seconds, images/s, cosine to eager),
    then other batch sizes while the budget lasts.
11. worker_compiled: `EmbedWorker` with `compile: on`, i.e. the production plan (`sam3core.compile`), its
    warm-up (compilation) time, throughput against its own model alone, and pooled cosine to the eager worker.
12. cudagraphs: the model compiled with CUDA graphs (`mode="max-autotune"`, outputs copied out of the graph's
    pool before the next call, as a caller that keeps them must).

With `--device cpu --config tiny` the same code runs in seconds as a dry run (CI runs it:
`tests/test_gpu_suite.py`); there the compiled sections trace with Dynamo and run its graphs eagerly
(`--cpu-compile-backend eager`), because inductor's C++ compilation would take minutes on a small CPU.

The official implementation: Meta's `sam3` is not on the GPU machine. Unpack its wheel and the pure-Python
packages its backbone modules import into a git-ignored folder (see docs/benchmarks.md, "GPU suite"), carry that
folder and pass it as `--official .official/site`; without it that section is skipped with the reason printed.

    python bench/gpu_suite.py --out /tmp/gpu-suite --device cpu --config tiny       # dry run, seconds
    python bench/gpu_suite.py --out "$OUT" --official .official/site                # on the GPU machine
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # before bench/, whose pipeline.py would shadow the package

from pipeline.dataset import schema  # noqa: E402
from pipeline.model.embed import EmbedSettings, EmbedWorker, pixel_array  # noqa: E402
from sam3core import build_sam3_vl_backbone, get_config, normalize_images  # noqa: E402
from sam3core.build import _assemble  # noqa: E402
from sam3core.compile import CompilePlan, apply_compile, compile_fallback, is_compiled, remove_compile  # noqa: E402
from sam3core.rope import rotate_real  # noqa: E402
from sam3core.tokenizer import Sam3Tokenizer  # noqa: E402
from tools.parity_record import flatten_outputs, sample_indices  # noqa: E402
from tools.parity_weights import deterministic_state_dict, parity_images  # noqa: E402

DATA_DIR = REPO_ROOT / "tests" / "data"
RESULT_FILE = "gpu_suite.json"
PARITY_RTOL = 1e-5  # tests/test_parity.py's tolerance, for the float32 check
PARITY_NOISE_FACTOR = 2.0
GOAL_IMAGES_PER_S = 100.0
MAX_PROBE_BATCH = 384  # the largest batch the memory section runs (a 1008 px batch of 384 takes seconds)
COLUMNS = ["section", "variant", "batch", "figure", "unit", "peak GiB", "check", "note"]

# Seconds each section may take on an H100/H200 (the overall budget cuts them further), and the least it needs
# to be worth starting (a compilation cannot be interrupted, so compiled sections need room).
SECTION_BUDGETS: dict[str, tuple[float, float]] = {
    "env": (20, 0),
    "weights": (60, 0),
    "eager": (45, 5),
    "correctness": (40, 5),
    "worker_eager": (40, 5),
    "sdpa": (20, 3),
    "rope": (15, 3),
    "memory": (45, 5),
    "official": (45, 10),
    "compiled": (110, 40),
    "worker_compiled": (170, 60),
    "cudagraphs": (90, 40),
}


# --- recording ---------------------------------------------------------------------------------------------------


class Recorder:
    """The figures so far, as JSON on disk (rewritten after each one) and as printed table rows."""

    def __init__(self, out_dir: Path, meta: dict[str, Any]) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / RESULT_FILE
        self.data: dict[str, Any] = {"meta": meta, "rows": [], "skipped": {}, "errors": {}, "sections": {}}
        self.flush()

    def row(self, section: str, variant: str, batch: int | None, figure: float | str | None, unit: str, **extra: Any):
        entry = {"section": section, "variant": variant, "batch": batch, "figure": figure, "unit": unit, **extra}
        self.data["rows"].append(entry)
        self.flush()
        print(markdown_row(entry), flush=True)
        return entry

    def note(self, key: str, value: Any) -> None:
        self.data["meta"][key] = value
        self.flush()

    def skip(self, section: str, reason: str) -> None:
        self.data["skipped"][section] = reason
        self.flush()
        print(f"# {section}: skipped: {reason}", flush=True)

    def error(self, section: str, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        self.data["errors"][section] = {"error": text[:2000], "traceback": traceback.format_exc()[-4000:]}
        self.flush()
        print(f"# {section}: FAILED: {text[:500]}", flush=True)

    def section_done(self, section: str, seconds: float) -> None:
        self.data["sections"][section] = round(seconds, 1)
        self.flush()

    def flush(self) -> None:
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(partial, self.path)


def markdown_row(entry: dict[str, Any]) -> str:
    figure = entry.get("figure")
    if isinstance(figure, float):
        figure = f"{figure:.4g}" if abs(figure) < 1000 else f"{figure:.0f}"
    peak = entry.get("peak_gib")
    cells = [
        entry["section"],
        entry["variant"],
        "" if entry.get("batch") is None else str(entry["batch"]),
        "" if figure is None else str(figure),
        entry.get("unit", ""),
        "" if peak is None else f"{peak:.2f}",
        str(entry.get("check", "")),
        str(entry.get("note", "")),
    ]
    return "| " + " | ".join(cells) + " |"


class Clock:
    """The overall deadline and each section's share of what is left."""

    def __init__(self, total_s: float, scale: float) -> None:
        self.start = time.monotonic()
        self.total = total_s
        self.scale = scale
        self.section_end = self.start + total_s

    def left(self) -> float:
        return self.start + self.total - time.monotonic()

    def open_section(self, name: str) -> tuple[bool, float]:
        budget, least = SECTION_BUDGETS[name]
        budget, least = budget * self.scale, least * self.scale
        allowed = min(budget, self.left())
        self.section_end = time.monotonic() + allowed
        return allowed >= least and allowed > 0, allowed

    def section_left(self) -> float:
        return self.section_end - time.monotonic()


# --- timing ------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


QUICK = {"on": False}  # a CPU dry run: one timed call each, the code paths matter, not the figures


def seconds_per_call(run: Callable[[], Any], device: torch.device, min_calls: int = 3, min_s: float = 0.5) -> float:
    """Mean seconds per call after one warm-up call: at least `min_calls` calls and `min_s` seconds."""
    if QUICK["on"]:
        min_calls, min_s = 1, 0.0
    run()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_s:
        run()
        calls += 1
        if calls >= 200:
            break
    synchronize(device)
    return (time.perf_counter() - start) / calls


def fastest_call(run: Callable[[], Any], device: torch.device, calls: int = 5) -> float:
    """The fastest of `calls` calls after a warm-up (for microbenchmarks: noise only ever slows a call)."""
    calls = 1 if QUICK["on"] else calls
    run()
    best = float("inf")
    for _ in range(calls):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """{'gib': the peak allocated during the block} on CUDA, None elsewhere."""
    result: dict[str, float | None] = {"gib": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


# --- the run's shared state ----------------------------------------------------------------------------------------


@dataclass
class Suite:
    args: argparse.Namespace
    device: torch.device
    record: Recorder
    clock: Clock
    workdir: Path
    config_name: str
    imgsz: int
    batch: int
    batches: list[int]
    checkpoint: Path | None = None
    reference: dict[str, Any] | None = None
    flops: dict[str, float] = field(default_factory=dict)
    peak_flops: float | None = None
    model: Any = None  # the eager bfloat16 model of section 3, reused by later sections
    eager_rate: dict[int, float] = field(default_factory=dict)
    eager_pooled: np.ndarray | None = None  # the eager worker's pooled embeddings, for the compiled worker
    worker: Any = None
    tables: list[pa.Table] = field(default_factory=list)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def cpu_plan(self) -> CompilePlan | None:
        """On a CPU dry run, the compiled sections trace with Dynamo and run on this backend instead."""
        if self.device.type == "cpu" and self.args.cpu_compile_backend != "inductor":
            return CompilePlan(enabled=True, backend=self.args.cpu_compile_backend)
        return None

    def build(self, dtype: torch.dtype, imgsz: int | None = None, sam2: bool = False) -> Any:
        return build_sam3_vl_backbone(
            self.checkpoint,
            config=self.config_name,
            imgsz=imgsz or self.imgsz,
            device=self.device,
            dtype=dtype,
            add_sam2_neck=sam2,
        )

    def images(self, batch: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        # drawn on the device: hundreds of 1008 px images are gigabytes, slow to draw and copy from the host
        generator = torch.Generator(device=self.device).manual_seed(batch)
        with torch.inference_mode():
            x = torch.rand(batch, 3, self.imgsz, self.imgsz, generator=generator, device=self.device)
            return (x * 2 - 1).to(dtype or self.compute_dtype)

    def fraction_of_peak(self, images_per_s: float, path: str = "pooled") -> float | None:
        if not self.peak_flops or path not in self.flops:
            return None
        return self.flops[path] * images_per_s / self.peak_flops


# --- sections ------------------------------------------------------------------------------------------------------


def section_env(suite: Suite) -> None:
    device = suite.device
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "c_compiler": shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),
        "python_headers": (Path(sysconfig.get_paths()["include"]) / "Python.h").exists(),
        "config": suite.config_name,
        "imgsz": suite.imgsz,
        "batch": suite.batch,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["device_name"] = f"cpu ({platform.processor() or platform.machine()})"
    for key, value in info.items():
        suite.record.note(key, value)
    print(f"# {info['date']} {info['device_name']}, torch {info['torch']}, triton {info['triton']}", flush=True)
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = fastest_call(lambda: a @ b, device, calls=10)
    suite.peak_flops = 2 * n**3 / best
    suite.record.row("env", f"bf16 matmul {n}^3, fastest of 10", None, suite.peak_flops / 1e12, "TFLOP/s")
    suite.record.row(
        "env",
        "C compiler and Python headers (Triton builds its launcher with them)",
        None,
        "yes" if info["c_compiler"] and info["python_headers"] else "NO",
        "",
        note=f"cc={info['c_compiler']}, Python.h={info['python_headers']}",
    )


def section_weights(suite: Suite) -> None:
    size = {"sam3": 336, "tiny": 224}.get(suite.config_name)
    reference_path = DATA_DIR / f"parity_{suite.config_name}_{size}.json"
    suite.reference = json.loads(reference_path.read_text())
    started = time.perf_counter()
    spec = {key: (entry["shape"], entry["dtype"]) for key, entry in suite.reference["checkpoint_spec"].items()}
    # one tensor per thread (torch releases the GIL): ~800M float64 draws take a while on one core
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        parts = pool.map(lambda item: deterministic_state_dict(dict([item])), spec.items())
        state = {key: value for part in parts for key, value in part.items()}
    suite.checkpoint = suite.workdir / "sam3.pt"
    torch.save({"model": state}, suite.checkpoint)
    del state
    seconds = time.perf_counter() - started
    suite.record.row("weights", "parity checkpoint generated and written (sam3.pt layout)", None, seconds, "s")
    config = get_config(suite.config_name)
    with torch.device("meta"):
        model = _assemble(config, suite.imgsz, Sam3Tokenizer(context_length=config.text.context_length), True)
    model.to("meta")  # the RoPE tables are built on the CPU by design
    from torch.utils.flop_counter import FlopCounterMode

    for path, call in (("pooled", model.forward_vision_features), ("all", model.forward_image)):
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            call(torch.zeros(1, 3, suite.imgsz, suite.imgsz, device="meta"))
        suite.flops[path] = float(counter.get_total_flops())
        label = "forward_vision_features (pooled path)" if path == "pooled" else "forward_image with SAM 2 neck"
        suite.record.row("weights", f"FLOPs per image, {label}", None, suite.flops[path] / 1e12, "TFLOP")
    if suite.peak_flops:
        ceiling = suite.peak_flops / suite.flops["pooled"]
        suite.record.row(
            "weights",
            "ceiling at the matmul peak (pooled path)",
            None,
            ceiling,
            "img/s",
            note=f"goal {GOAL_IMAGES_PER_S:g} img/s = {GOAL_IMAGES_PER_S / ceiling:.0%} of it",
        )


def section_eager(suite: Suite) -> None:
    suite.model = suite.build(suite.compute_dtype)
    for batch in suite.batches:
        if suite.clock.section_left() <= 0:
            suite.record.skip(f"eager batch {batch}", "section budget spent")
            break
        x = suite.images(batch)
        with torch.inference_mode(), peak_memory(suite.device) as peak:
            seconds = seconds_per_call(lambda x=x: suite.model.forward_vision_features(x), suite.device)
        rate = batch / seconds
        suite.eager_rate[batch] = rate
        fraction = suite.fraction_of_peak(rate)
        suite.record.row(
            "eager",
            "sam3core eager bf16, pooled path",
            batch,
            rate,
            "img/s",
            peak_gib=peak["gib"],
            check="" if fraction is None else f"{fraction:.0%} of matmul peak",
        )
    free_device_memory(suite.device)


def parity_problems(actual: torch.Tensor, recorded: dict[str, Any]) -> tuple[float, str]:
    """(worst difference over the tests' allowed difference, a description); <= 1 passes."""
    flat = actual.detach().reshape(-1).cpu()
    indices = sample_indices(flat.numel())
    values = flat[indices].to(torch.float64)
    expected = torch.tensor(recorded["samples"], dtype=torch.float64)
    if not actual.is_floating_point():
        return (0.0 if torch.equal(values, expected) else math.inf), "integers"
    mean_abs = recorded["abs_sum"] / max(1, math.prod(recorded["shape"]))
    atol = max(PARITY_RTOL * mean_abs, PARITY_NOISE_FACTOR * recorded.get("float64_max_abs_dev", 0.0))
    ratio = ((values - expected).abs() / (PARITY_RTOL * expected.abs() + atol)).max().item()
    return ratio, f"max |diff| {(values - expected).abs().max().item():.3g}, mean |official| {mean_abs:.3g}"


def section_correctness(suite: Suite) -> None:
    reference = suite.reference
    assert reference is not None
    imgsz = reference["imgsz"]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
    try:
        model = suite.build(torch.float32, imgsz=imgsz, sam2=True)
        images = parity_images(reference["config"], imgsz).to(suite.device)
        captions = torch.tensor(reference["caption_token_ids"], device=suite.device)
        additional = torch.tensor(reference["additional_text_token_ids"], device=suite.device)
        with torch.inference_mode():
            outputs = flatten_outputs(model(images, captions, additional_text=additional))
        worst, worst_name, description = 0.0, "", ""
        for name, recorded in reference["outputs"].items():
            ratio, text = parity_problems(outputs[name], recorded)
            if ratio > worst:
                worst, worst_name, description = ratio, name, text
        suite.record.row(
            "correctness",
            f"float32 vs official reference ({reference['config']} {imgsz} px)",
            2,
            worst,
            "x allowed",
            check="PASS" if worst <= 1 else "FAIL",
            note=f"worst: {worst_name}, {description}",
        )
        for dtype in (torch.bfloat16, torch.float16):
            model.to(dtype)
            with torch.inference_mode():
                half = flatten_outputs(model(images.to(dtype), captions, additional_text=additional))
            floats = {n: t for n, t in outputs.items() if t.is_floating_point() and n in half}
            cosines = {name: cosine(half[name], tensor) for name, tensor in floats.items()}
            name = min(cosines, key=cosines.get)
            suite.record.row(
                "correctness",
                f"{str(dtype).removeprefix('torch.')} vs float32, min cosine over outputs",
                2,
                cosines[name],
                "cosine",
                check="PASS" if cosines[name] >= 0.999 else "FAIL",
                note=f"at {name}",
            )
        del model
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
        free_device_memory(suite.device)


def prepared_tables(suite: Suite, batch: int, count: int, captions: bool) -> list[pa.Table]:
    """`count` batches as the CPU stage hands them to the model actor: photos decoded and resized by
    `pipeline.input.decode.decode_image`, captions as token ids (the parity captions)."""
    import io

    from PIL import Image

    from pipeline.input.decode import decode_image

    rng = np.random.default_rng(0)
    pixels = []
    for index in range(min(batch, 8)):  # a few distinct photos, repeated
        coarse = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        photo = Image.fromarray(coarse).resize((1600, 1200), Image.BICUBIC)
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=90)
        decoded = decode_image(buffer.getvalue(), suite.imgsz, uri=f"photo-{index}.jpg")
        pixels.append(decoded.pixels)
    assert suite.reference is not None
    token_rows = suite.reference["caption_token_ids"]
    context = len(token_rows[0])
    token_type = pa.list_(pa.list_(pa.int32(), context))
    tables = []
    for b in range(count):
        ids = [f"{b}-{i}" for i in range(batch)]
        if captions:
            tokens = pa.array([[token_rows[i % len(token_rows)]] for i in range(batch)], token_type)
        else:
            tokens = pa.nulls(batch, token_type)
        tables.append(
            pa.table(
                {
                    schema.ID: pa.array(ids, pa.string()),
                    schema.STATUS: pa.array([schema.STATUS_OK] * batch, pa.string()),
                    schema.ERROR: pa.nulls(batch, pa.string()),
                    schema.PIXELS: pa.array([pixels[i % len(pixels)] for i in range(batch)], pa.binary()),
                    schema.TOKENS: tokens,
                }
            )
        )
    return tables


def worker_settings(suite: Suite, compile: str) -> EmbedSettings:
    return EmbedSettings(
        checkpoint=str(suite.checkpoint),
        model_config=suite.config_name,
        imgsz=suite.imgsz,
        dtype="bfloat16",
        compile=compile,
        bpe_path=None,
        features=("image_embedding", "text_embedding"),
        feature_dtype="float16",
        multi_caption=False,
        batch_size=suite.batch,
    )


def model_alone_rate(worker: EmbedWorker, tables: list[pa.Table], with_text: bool) -> float:
    """Rows per second of the forward calls the worker makes, on inputs already on the device."""
    inputs = []
    for table in tables:
        uint8 = pixel_array(table.column(schema.PIXELS), np.arange(table.num_rows), worker.settings.imgsz)
        images = normalize_images(torch.from_numpy(uint8).to(worker.device))
        tokens = None
        if with_text:
            rows = table.column(schema.TOKENS).to_pylist()
            tokens = torch.tensor([row[0] for row in rows], dtype=torch.long, device=worker.device)
        inputs.append((images, tokens))

    def run() -> None:
        for images, tokens in inputs:
            worker.backbone.forward_vision_features(images)
            if tokens is not None:
                worker.backbone.forward_text(tokens)

    with torch.inference_mode():
        seconds = seconds_per_call(run, worker.device, min_calls=2, min_s=0.5)
    return sum(t.num_rows for t in tables) / seconds


def worker_rate(worker: EmbedWorker, tables: list[pa.Table]) -> tuple[float, list[pa.Table]]:
    outputs: list[pa.Table] = []

    def run() -> None:
        outputs.clear()
        outputs.extend(worker(table) for table in tables)

    seconds = seconds_per_call(run, worker.device, min_calls=2, min_s=0.5)
    return sum(t.num_rows for t in tables) / seconds, outputs


def pooled_of(outputs: list[pa.Table]) -> np.ndarray:
    column = pa.concat_tables(outputs).column(schema.IMAGE_EMBEDDING).combine_chunks()
    return np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)


def measure_worker(suite: Suite, worker: EmbedWorker, section: str, label: str) -> np.ndarray:
    image_only = suite.tables
    rate, outputs = worker_rate(worker, image_only)
    alone = model_alone_rate(worker, image_only, with_text=False)
    statuses = set(pa.concat_tables(outputs).column(schema.STATUS).to_pylist())
    suite.record.row(
        section,
        f"{label}: EmbedWorker on prepared uint8 batches, images only",
        suite.batch,
        rate,
        "rows/s",
        check=f"{rate / alone:.1%} of the model alone ({alone:.4g} img/s)",
        note=f"statuses {sorted(statuses)}",
    )
    if suite.clock.section_left() > 0:
        with_text = prepared_tables(suite, suite.batch, len(image_only), captions=True)
        rate, _ = worker_rate(worker, with_text)
        alone = model_alone_rate(worker, with_text, with_text=True)
        suite.record.row(
            section,
            f"{label}: EmbedWorker, images and one caption each",
            suite.batch,
            rate,
            "rows/s",
            check=f"{rate / alone:.1%} of the model alone ({alone:.4g} rows/s)",
        )
    return pooled_of(outputs)


def section_worker_eager(suite: Suite) -> None:
    started = time.perf_counter()
    worker = EmbedWorker(worker_settings(suite, "off"))
    suite.record.row(
        "worker_eager",
        "EmbedWorker built (checkpoint read, digest, warm-up)",
        None,
        time.perf_counter() - started,
        "s",
        note=f"device {worker.device}, {worker.dtype}",
    )
    suite.tables = prepared_tables(suite, suite.batch, 3, captions=False)
    suite.eager_pooled = measure_worker(suite, worker, "worker_eager", "eager")
    suite.worker = worker  # kept for the out-of-memory check


def section_sdpa(suite: Suite) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    vision = get_config(suite.config_name).vision
    grid = suite.imgsz // vision.patch_size
    windows = math.ceil(grid / vision.window_size) ** 2
    head_dim = vision.width // vision.heads
    batch = min(suite.batch, 8)
    shapes = {
        f"window {vision.window_size**2} tokens": (batch * windows, vision.window_size**2),
        f"global {grid * grid} tokens": (batch, grid * grid),
    }
    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    for label, (sequences, length) in shapes.items():
        shape = (sequences, vision.heads, length, head_dim)
        q, k, v = (torch.randn(shape, device=suite.device, dtype=suite.compute_dtype) for _ in range(3))
        flops = 4 * sequences * vision.heads * length * length * head_dim
        with torch.inference_mode():
            default = F.scaled_dot_product_attention(q, k, v)
            times = {}
            for name, backend in {"default": None, **backends}.items():
                if suite.clock.section_left() <= 0:
                    break
                if name == "math" and sequences * vision.heads * length * length * 2 > 8 * 2**30:
                    continue  # the math backend materialises the scores: over 8 GiB here
                try:
                    with sdpa_kernel([backend]) if backend is not None else nullcontext():
                        out = F.scaled_dot_product_attention(q, k, v)
                        seconds = fastest_call(
                            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), suite.device
                        )
                except RuntimeError as exc:
                    suite.record.row(
                        "sdpa", f"{label}, {name}", batch, "unsupported", "", note=str(exc).splitlines()[0][:120]
                    )
                    continue
                times[name] = seconds
                suite.record.row(
                    "sdpa",
                    f"{label}, {name}",
                    batch,
                    seconds * 1e3,
                    "ms",
                    check=f"cosine {cosine(out, default):.6f}",
                    note=f"{flops / seconds / 1e12:.1f} TFLOP/s",
                )
            if times:
                fastest = min((t, n) for n, t in times.items() if n != "default")[1] if len(times) > 1 else "default"
                suite.record.row(
                    "sdpa",
                    f"{label}: fastest backend",
                    batch,
                    fastest,
                    "",
                    note=f"default takes {times.get('default', float('nan')) * 1e3:.3g} ms",
                )
    free_device_memory(suite.device)


def section_rope(suite: Suite) -> None:
    model = suite.model
    trunk = model.vision_backbone.trunk
    block = next(b for b in trunk.blocks if b.window)
    rope = block.attn.rope
    vision = get_config(suite.config_name).vision
    grid = suite.imgsz // vision.patch_size
    batch = min(suite.batch, 8)
    x = torch.randn(batch, grid, grid, vision.width, device=suite.device, dtype=suite.compute_dtype)
    windows = math.ceil(grid / vision.window_size) ** 2
    head_dim = vision.width // vision.heads
    q = torch.randn(
        batch * windows, vision.heads, vision.window_size**2, head_dim, device=suite.device, dtype=suite.compute_dtype
    )
    k = torch.randn_like(q)
    with torch.inference_mode():
        block_s = fastest_call(lambda: block(x), suite.device)
        eager_s = fastest_call(lambda: rope(q, k), suite.device)
        suite.record.row("rope", "one window block, eager", batch, block_s * 1e3, "ms")
        suite.record.row(
            "rope",
            "its RoPE on q and k, eager (the module: one complex multiplication)",
            batch,
            eager_s * 1e3,
            "ms",
            check=f"{eager_s / block_s:.1%} of the block",
        )
        expected = rope(q, k)
        real_s = fastest_call(
            lambda: (rotate_real(q, rope.cos, rope.sin), rotate_real(k, rope.cos, rope.sin)), suite.device
        )
        diff = (rotate_real(q, rope.cos, rope.sin).float() - expected[0].float()).abs().max().item()
        suite.record.row(
            "rope",
            "RoPE written out in real arithmetic (what compiled graphs fuse), eager",
            batch,
            real_s * 1e3,
            "ms",
            check=f"{real_s / block_s:.1%} of the block; the module is {real_s / eager_s:.2f}x faster",
            note=f"max |diff| {diff:.3g}",
        )
        plan = suite.cpu_plan()
        backend = plan.backend if plan is not None else "inductor"
        compiled = torch.compile(rope.forward, backend=backend, dynamic=False)
        compiled_s = fastest_call(lambda: compiled(q, k), suite.device)
        diff = (compiled(q, k)[0].float() - expected[0].float()).abs().max().item()
        suite.record.row(
            "rope",
            f"RoPE compiled ({backend})",
            batch,
            compiled_s * 1e3,
            "ms",
            check=f"{eager_s / compiled_s:.2f}x eager",
            note=f"max |diff| {diff:.3g}",
        )
    free_device_memory(suite.device)


def section_memory(suite: Suite) -> None:
    if suite.device.type != "cuda":
        suite.record.skip("memory", "needs CUDA memory statistics")
        return
    total = torch.cuda.get_device_properties(suite.device).total_memory / 2**30
    sam2 = suite.build(suite.compute_dtype, sam2=True)
    paths = {
        "pooled (forward_vision_features)": lambda x: suite.model.forward_vision_features(x),
        "every feature (forward_image, both necks)": lambda x: sam2.forward_image(x),
    }
    small, large = max(1, suite.batch // 4), max(2, suite.batch // 2)
    for label, call in paths.items():
        peaks = {}
        for batch in (small, large):
            x = suite.images(batch)
            free_device_memory(suite.device)
            with torch.inference_mode(), peak_memory(suite.device) as peak:
                call(x)
            peaks[batch] = peak["gib"]
        per_image = (peaks[large] - peaks[small]) / (large - small)
        if per_image <= 0:
            suite.record.row("memory", f"{label}: peak per image", None, per_image, "GiB", check="NOT MEASURABLE")
            continue
        fixed = peaks[small] - per_image * small
        largest = int((0.92 * total - fixed) / per_image)
        suite.record.row(
            "memory",
            f"{label}: peak per image",
            None,
            per_image,
            "GiB",
            note=f"fixed {fixed:.2f} GiB; from batches {small} and {large}",
        )
        check = "not checked (budget)"
        if suite.clock.section_left() > 20 and largest > 0:
            probe = min(largest, MAX_PROBE_BATCH)
            try:
                x = suite.images(probe)
                with torch.inference_mode(), peak_memory(suite.device) as peak:
                    call(x)
                check = f"batch {probe} ran, peak {peak['gib']:.1f} of {total:.0f} GiB"
            except torch.OutOfMemoryError:
                check = f"batch {probe} ran OUT OF MEMORY"
            x = None
            free_device_memory(suite.device)
        suite.record.row(
            "memory", f"{label}: largest batch at 1 GPU ({total:.0f} GiB)", largest, largest, "images", check=check
        )
    sam2 = None
    free_device_memory(suite.device)
    worker = suite.worker
    if worker is None or not suite.tables:
        suite.record.skip("memory out-of-memory behaviour", "no eager worker from worker_eager")
        return
    # Cap the allocator so the working batch cannot fit but a quarter of it can: the actor must split, not drop.
    held = torch.cuda.memory_allocated(suite.device) / 2**30  # the models alive now
    cap = held + per_image_pooled(suite) * suite.batch / 4
    fraction = min(0.95, cap / total)
    torch.cuda.set_per_process_memory_fraction(fraction, suite.device)
    try:
        free_device_memory(suite.device)
        out = worker(suite.tables[0])
        statuses = out.column(schema.STATUS).to_pylist()
        suite.record.row(
            "memory",
            f"EmbedWorker with memory capped at {cap:.1f} GiB (batch cannot fit)",
            suite.batch,
            f"{statuses.count('ok')} of {len(statuses)} rows ok",
            "",
            check="split" if statuses.count("ok") == len(statuses) else "rows lost",
        )
    except Exception as exc:  # what the actor raises is the figure here
        suite.record.row(
            "memory",
            f"EmbedWorker with memory capped at {cap:.1f} GiB",
            suite.batch,
            "raised",
            "",
            check="names compute.batch_size" if "compute.batch_size" in str(exc) else "UNCLEAR",
            note=str(exc).splitlines()[0][:200],
        )
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, suite.device)
        free_device_memory(suite.device)


def per_image_pooled(suite: Suite) -> float:
    rows = [r for r in suite.record.data["rows"] if r["section"] == "memory" and "pooled" in r["variant"]]
    return float(rows[0]["figure"]) if rows else 0.1


def section_official(suite: Suite) -> None:
    if not suite.args.official:
        suite.record.skip("official", "no --official folder given (Meta's sam3 is not installed here)")
        return
    folder = Path(suite.args.official).resolve()
    if not (folder / "sam3").is_dir():
        suite.record.skip("official", f"{folder} holds no unpacked sam3 package")
        return
    sys.path.insert(0, str(folder))
    from tools.make_parity_reference import build_official_backbone, load_project_config_module
    from tools.official_sam3 import load_official_modules

    official = load_official_modules()
    config = load_project_config_module().CONFIGS[suite.config_name]
    theirs = build_official_backbone(official, config, suite.imgsz).to(suite.device).eval()
    ours = suite.build(suite.compute_dtype, sam2=True)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("freqs_cis") for name in missing), (missing, unexpected)
    batch = min(suite.batch, 8)
    x = suite.images(batch, torch.float32)
    with torch.inference_mode():
        with torch.autocast(suite.device.type, dtype=torch.bfloat16):
            theirs_s = seconds_per_call(lambda: theirs.forward_image(x), suite.device, min_calls=2)
            reference = theirs.forward_image(x)["vision_features"]
        ours_s = seconds_per_call(lambda: ours.forward_image(x), suite.device, min_calls=2)
        similarity = cosine(ours.forward_image(x)["vision_features"], reference)
    suite.record.row("official", "official forward_image, bf16 autocast", batch, batch / theirs_s, "img/s")
    suite.record.row(
        "official",
        "sam3core eager forward_image, bf16",
        batch,
        batch / ours_s,
        "img/s",
        check=f"{theirs_s / ours_s:.2f}x the official",
        note=f"vision_features cosine {similarity:.6f}",
    )
    theirs = ours = x = None
    free_device_memory(suite.device)


def compile_model(suite: Suite, plan: CompilePlan, batch: int) -> tuple[Any, float]:
    model = suite.build(suite.compute_dtype)
    apply_compile(model.vision_backbone, plan)
    model.compile_plan = plan
    seconds = model.warm_up(batch, vision_features_only=True)
    return model, seconds


def section_compiled(suite: Suite) -> None:
    torch._dynamo.config.automatic_dynamic_shapes = False  # each batch size its own static graph, as in production
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    plan = suite.cpu_plan() or CompilePlan(enabled=True)  # inductor, default mode
    model, warm = compile_model(suite, plan, suite.batch)
    fallback = compile_fallback(model.vision_backbone)
    for batch in [suite.batch, *[b for b in suite.batches if b != suite.batch]]:
        if batch != suite.batch and suite.clock.section_left() < 60 * suite.clock.scale:
            suite.record.skip(f"compiled batch {batch}", "section budget spent")
            continue
        x = suite.images(batch)
        with torch.inference_mode(), peak_memory(suite.device) as peak:
            started = time.perf_counter()
            model.forward_vision_features(x)  # compiles this batch size
            synchronize(suite.device)
            first = time.perf_counter() - started if batch != suite.batch else warm
            seconds = seconds_per_call(lambda x=x: model.forward_vision_features(x), suite.device)
            similarity = cosine(model.forward_vision_features(x), suite.model.forward_vision_features(x))
        rate = batch / seconds
        fraction = suite.fraction_of_peak(rate)
        eager = suite.eager_rate.get(batch)
        suite.record.row(
            "compiled",
            f"{plan.describe()}, pooled path",
            batch,
            rate,
            "img/s",
            peak_gib=peak["gib"],
            check=("" if fraction is None else f"{fraction:.0%} of matmul peak")
            + ("" if eager is None else f", {rate / eager:.2f}x eager"),
            note=f"compile {first:.0f} s; cosine to eager {similarity:.6f}; "
            + f"compiled={is_compiled(model.vision_backbone)}"
            + (f"; FELL BACK: {fallback}" if fallback else ""),
        )
    remove_compile(model.vision_backbone)
    model = None
    torch._dynamo.reset()
    free_device_memory(suite.device)


def section_worker_compiled(suite: Suite) -> None:
    started = time.perf_counter()
    plan = suite.cpu_plan()
    if plan is None:
        worker = EmbedWorker(worker_settings(suite, "on"))  # the production plan for this device
    else:  # CPU dry run: the same worker, its model traced by Dynamo (inductor's C++ would take minutes here)
        worker = EmbedWorker(worker_settings(suite, "off"))
        apply_compile(worker.backbone.vision_backbone, plan)
        worker.backbone.compile_plan = plan
        worker.warm_up_seconds = worker.backbone.warm_up(suite.batch, vision_features_only=worker.vision_only)
        worker.compiled = is_compiled(worker.backbone.vision_backbone)
    fallback = compile_fallback(worker.backbone.vision_backbone)
    suite.record.row(
        "worker_compiled",
        f"EmbedWorker compile on: {worker.backbone.compile_plan.describe()}",
        suite.batch,
        worker.warm_up_seconds,
        "s warm-up (compilation)",
        check=f"compiled={worker.compiled}",
        note=f"built in {time.perf_counter() - started:.0f} s" + (f"; FELL BACK: {fallback}" if fallback else ""),
    )
    pooled = measure_worker(suite, worker, "worker_compiled", "compiled")
    if suite.eager_pooled is not None:
        similarity = float((pooled * suite.eager_pooled).sum(-1).min())
        suite.record.row(
            "worker_compiled",
            "pooled embedding, compiled vs eager worker, min cosine",
            suite.batch,
            similarity,
            "cosine",
            check="PASS" if similarity >= 0.999 else "FAIL",
        )
    del worker
    torch._dynamo.reset()
    free_device_memory(suite.device)


def section_cudagraphs(suite: Suite) -> None:
    plan = suite.cpu_plan() or CompilePlan(enabled=True, mode="max-autotune")
    model, warm = compile_model(suite, plan, suite.batch)
    x = suite.images(suite.batch)
    with torch.inference_mode():
        # a CUDA graph's outputs live in its pool and are overwritten by the next replay: copy them out
        seconds = seconds_per_call(lambda: model.forward_vision_features(x).clone(), suite.device)
        similarity = cosine(model.forward_vision_features(x).clone(), suite.model.forward_vision_features(x))
    rate = suite.batch / seconds
    eager = suite.eager_rate.get(suite.batch)
    suite.record.row(
        "cudagraphs",
        f"compiled ({plan.describe()}), pooled path, outputs cloned",
        suite.batch,
        rate,
        "img/s",
        check="" if eager is None else f"{rate / eager:.2f}x eager",
        note=f"compile {warm:.0f} s; cosine to eager {similarity:.6f}",
    )
    model = None
    torch._dynamo.reset()
    free_device_memory(suite.device)


SECTIONS: list[tuple[str, Callable[[Suite], None]]] = [
    ("env", section_env),
    ("weights", section_weights),
    ("eager", section_eager),
    ("correctness", section_correctness),
    ("worker_eager", section_worker_eager),
    ("sdpa", section_sdpa),
    # before anything compiles: Meta's loader refuses to run once torchvision is imported, which the GPU machine
    # has and a compiler could pull in
    ("official", section_official),
    ("rope", section_rope),
    ("memory", section_memory),
    ("compiled", section_compiled),
    ("worker_compiled", section_worker_compiled),
    ("cudagraphs", section_cudagraphs),
]
NEEDS = {  # sections that cannot run when an earlier one failed
    "eager": ("weights",),
    "correctness": ("weights",),
    "worker_eager": ("weights",),
    "rope": ("eager",),
    "memory": ("eager",),
    "official": ("weights",),
    "compiled": ("eager",),
    "worker_compiled": ("weights",),
    "cudagraphs": ("eager",),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help=f"folder for {RESULT_FILE} (on the GPU machine: $OUT)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--config", default="sam3", choices=["sam3", "tiny"])
    parser.add_argument("--imgsz", type=int, default=None, help="default: 1008 for sam3, the config's own for tiny")
    parser.add_argument("--batch", type=int, default=None, help="the working batch size (default 32; tiny: 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="eager sweep (default 1 8 16 32 64)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="overall wall-time budget in seconds")
    parser.add_argument("--official", default=None, help="folder holding the unpacked sam3 (and deps) packages")
    parser.add_argument("--only", nargs="+", default=None, choices=[name for name, _ in SECTIONS])
    parser.add_argument("--workdir", default=None, help="where the checkpoint is written (default: a temp dir)")
    parser.add_argument("--cpu-compile-backend", default="eager", help="Dynamo backend of compiled sections on CPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; use --device cpu for a dry run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    config = get_config(args.config)
    tiny = args.config == "tiny"
    imgsz = args.imgsz or (config.default_imgsz if tiny else 1008)
    batch = args.batch or (2 if tiny else 32)
    batches = args.batches or ([1, 2] if tiny else [1, 8, 16, 32, 64])
    if args.device == "cpu" and not tiny:
        print("# the sam3 configuration on a CPU takes minutes per section; budgets are for a GPU", flush=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SAM3_EMBED_CACHE", str(workdir / "cache"))  # the worker's checkpoint digest cache
    record = Recorder(Path(args.out), {"argv": sys.argv[1:], "command": " ".join(sys.argv)})
    # Budgets are seconds on an H100/H200; a CPU dry run of the tiny model scales them down to stay short.
    clock = Clock(args.budget_s, scale=1.0 if device.type == "cuda" else 0.25)
    QUICK["on"] = device.type == "cpu"
    suite = Suite(args, device, record, clock, workdir, args.config, imgsz, batch, batches)
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    failed: set[str] = set()
    # If a compilation overruns and the call is about to be cut, the log shows where it was.
    faulthandler.dump_traceback_later(args.budget_s + 60, exit=False)
    try:
        for name, run in SECTIONS:
            if args.only and name not in args.only and name not in ("env", "weights"):
                continue
            missing = [need for need in NEEDS.get(name, ()) if need in failed]
            if missing:
                record.skip(name, f"needs {', '.join(missing)}, which failed")
                failed.add(name)
                continue
            go, allowed = clock.open_section(name)
            if not go:
                record.skip(name, f"only {max(0.0, clock.left()):.0f} s of the overall budget left")
                continue
            print(f"# {name}: at {clock.total - clock.left():.0f} s, up to {allowed:.0f} s", flush=True)
            started = time.monotonic()
            try:
                run(suite)
            except Exception as exc:
                record.error(name, exc)
                failed.add(name)
                free_device_memory(device)
            record.section_done(name, time.monotonic() - started)
    finally:
        shutil.rmtree(workdir / "cache", ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    faulthandler.cancel_dump_traceback_later()
    print(f"\n# {len(record.data['rows'])} figures in {record.path}; sections failed: {sorted(failed) or 'none'}")
    print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for entry in record.data["rows"]:
        print(markdown_row(entry))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
