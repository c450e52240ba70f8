"""Record what Meta's official SAM 3 backbone computes, for `tests/test_parity.py`.

Run it with the reference environment described in `tools/official_sam3.py` (Meta's `sam3` 0.1.4 wheel; CI
never has it), from the repository root:

    .refenv/bin/python tools/make_parity_reference.py                 # every case below
    .refenv/bin/python tools/make_parity_reference.py --case tiny:168 # one case

For each case (configuration, image size) it builds the official `SAM3VLBackbone` the way
`sam3/model_builder.py` wires the "sam3" model (ViT with tiled absolute positions, interpolated RoPE, windowed
and global blocks, `ln_pre`, no patch bias; `Sam3DualViTDetNeck` with the SAM 2 twin neck; `VETextEncoder`;
`scalp=1`), with the sizes of `sam3core/config.py` (read from the file, so the implementation under test is
never imported). Then it:

- sets every parameter and persistent buffer from `tools.parity_weights.deterministic_tensor`, keyed by its
  `sam3.pt` name (`detector.backbone.` + the module path); the official text tower leaves
  `positional_embedding` and `text_projection` as uninitialised memory, so nothing may be skipped. The
  complex RoPE tables (`*freqs_cis`) keep the values the official code computed for this image size, and
  the spec gives them the shapes of an official file (tables for the configuration's default size, as
  `sam3.pt` has them for 1008 px);
- runs `forward(images, captions, additional_text=...)` in float32, eval mode, under `torch.no_grad`, on
  `parity_images` and the fixed captions; the SAM 2 neck outputs come back as `sam2_backbone_out` (what
  `forward_image_sam2` returns);
- runs the same in float64 and stores, per output, the largest float32-vs-float64 difference: the scale of
  float32 rounding in this network, which the tests use to justify their tolerance;
- writes `tests/data/parity_<config>_<size>.json`: the checkpoint spec (every key, shape, dtype and the sum of
  the generated tensor, to tell a weight-generation drift apart from a model difference), the token ids, and
  per output tensor its shape, dtype, sums and sampled values (`tools.parity_record`).

The official ViT sizes its RoPE tables at construction, so each image size gets its own official model. The
tiny text tower keeps the official module but with a `text_projection` of the configured width (the official
class hard-codes 512; the tensor is stored, never used by the backbone).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.official_sam3 import load_official_modules, official_package_version  # noqa: E402
from tools.parity_record import dtype_name, flatten_outputs, summarize_tensor  # noqa: E402
from tools.parity_weights import (  # noqa: E402
    ADDITIONAL_TEXT,
    PARITY_CAPTIONS,
    ROPE_TABLE_SUFFIX,
    deterministic_tensor,
    parity_images,
)

CHECKPOINT_PREFIX = "detector.backbone."
BPE_PATH = REPO_ROOT / "sam3core" / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
DEFAULT_CASES = ("tiny:224", "tiny:168", "tiny:182", "sam3:336")
DATA_DIR = REPO_ROOT / "tests" / "data"

# Constants the official modules hard-code; the project configuration must agree with them.
OFFICIAL_ROPE_THETA = 10000.0
OFFICIAL_LAYER_NORM_EPS = 1e-5
OFFICIAL_TEXT_MLP_RATIO = 4.0
OFFICIAL_POSITION_TEMPERATURE = 10000


def load_project_config_module() -> ModuleType:
    """`sam3core/config.py` by path, so that `sam3core/__init__.py` (the code under test) never runs."""
    name = "_sam3core_config_for_reference"
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "sam3core" / "config.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load sam3core/config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def check_official_constants(config: Any) -> None:
    mismatches = []
    if config.vision.rope_theta != OFFICIAL_ROPE_THETA:
        mismatches.append(f"vision.rope_theta {config.vision.rope_theta} != {OFFICIAL_ROPE_THETA}")
    if config.vision.layer_norm_eps != OFFICIAL_LAYER_NORM_EPS:
        mismatches.append(f"vision.layer_norm_eps {config.vision.layer_norm_eps} != {OFFICIAL_LAYER_NORM_EPS}")
    if config.text.mlp_ratio != OFFICIAL_TEXT_MLP_RATIO:
        mismatches.append(f"text.mlp_ratio {config.text.mlp_ratio} != {OFFICIAL_TEXT_MLP_RATIO}")
    if mismatches:
        raise ValueError(f"config {config.name!r} cannot be built with the official modules: {mismatches}")


def build_official_backbone(official: Any, config: Any, imgsz: int) -> nn.Module:
    check_official_constants(config)
    vision = config.vision
    trunk = official.vitdet.ViT(
        img_size=imgsz,
        pretrain_img_size=vision.pretrain_img_size,
        patch_size=vision.patch_size,
        embed_dim=vision.width,
        depth=vision.depth,
        num_heads=vision.heads,
        mlp_ratio=vision.mlp_ratio,
        norm_layer="LayerNorm",
        drop_path_rate=0.1,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=tuple(vision.global_blocks),
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=vision.window_size,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
        compile_mode=None,
    )
    # Without `precompute_resolution`: the official pre-computation allocates on "cuda".
    position_encoding = official.position_encoding.PositionEmbeddingSine(
        num_pos_feats=config.d_model,
        normalize=True,
        scale=None,
        temperature=OFFICIAL_POSITION_TEMPERATURE,
    )
    neck = official.necks.Sam3DualViTDetNeck(
        trunk=trunk,
        position_encoding=position_encoding,
        d_model=config.d_model,
        scale_factors=list(config.scale_factors),
        add_sam2_neck=True,
    )
    text = config.text
    tokenizer = official.tokenizer_ve.SimpleTokenizer(bpe_path=str(BPE_PATH))
    text_encoder = official.text_encoder_ve.VETextEncoder(
        d_model=config.d_model,
        tokenizer=tokenizer,
        width=text.width,
        heads=text.heads,
        layers=text.layers,
        context_length=text.context_length,
        vocab_size=text.vocab_size,
    )
    if tuple(text_encoder.encoder.text_projection.shape) != (text.width, text.projection_dim):
        text_encoder.encoder.text_projection = nn.Parameter(torch.empty(text.width, text.projection_dim))
    backbone = official.vl_combiner.SAM3VLBackbone(visual=neck, text=text_encoder, scalp=config.scalp)
    return backbone.eval()


def official_file_rope_shape(config: Any, name: str) -> list[int]:
    """Shape of a block's `freqs_cis` in an official file, whose tables are sized for `default_imgsz`.

    `sam3.pt` carries tables for 1008 px whatever size a user runs at; recording those shapes (not the ones of
    this run) makes the test checkpoint as awkward as the real one for a loader.
    """
    vision = config.vision
    block = int(name.split(".blocks.")[1].split(".")[0])
    grid = config.default_imgsz // vision.patch_size
    side = grid if block in vision.global_blocks else vision.window_size
    return [side * side, vision.width // vision.heads // 2]


def fill_deterministic(model: nn.Module, config: Any, imgsz: int) -> dict[str, dict[str, Any]]:
    """Overwrite every parameter and persistent buffer but the RoPE tables; return the checkpoint spec."""
    spec: dict[str, dict[str, Any]] = {}
    covered_parameters = set()
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            key = CHECKPOINT_PREFIX + name
            shape = list(tensor.shape)
            if name.endswith(ROPE_TABLE_SUFFIX):
                shape = official_file_rope_shape(config, name)
                if imgsz == config.default_imgsz and shape != list(tensor.shape):
                    raise RuntimeError(
                        f"{key}: expected a table of shape {shape}, the official model has one of {list(tensor.shape)}"
                    )
            value = deterministic_tensor(key, shape, tensor.dtype)
            if not name.endswith(ROPE_TABLE_SUFFIX):
                tensor.data.copy_(value)
            covered_parameters.add(id(tensor))
            spec[key] = {
                "shape": shape,
                "dtype": dtype_name(tensor.dtype),
                "sum": value.to(torch.complex128 if value.is_complex() else torch.float64).sum().real.item(),
            }
    missing = [name for name, parameter in model.named_parameters() if id(parameter) not in covered_parameters]
    if missing:
        raise RuntimeError(f"parameters outside the state dict would keep their random init: {missing}")
    return spec


def run_official(model: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        return model(images, list(PARITY_CAPTIONS), additional_text=list(ADDITIONAL_TEXT))


def float32_rounding_scale(
    model: nn.Module, images: torch.Tensor, outputs32: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Largest |float32 - float64| per floating output (the official RoPE itself stays complex64)."""
    model.double()
    outputs64 = flatten_outputs(run_official(model, images.double()))
    model.float()
    deviations = {}
    for path, value in outputs32.items():
        if value.is_floating_point():
            deviations[path] = (value.double() - outputs64[path]).abs().max().item()
    return deviations


def record_case(official: Any, configs: ModuleType, config_name: str, imgsz: int) -> dict[str, Any]:
    config = configs.get_config(config_name)
    started = time.perf_counter()
    model = build_official_backbone(official, config, imgsz)
    spec = fill_deterministic(model, config, imgsz)
    built = time.perf_counter()
    images = parity_images(config, imgsz)
    outputs = flatten_outputs(run_official(model, images))
    ran = time.perf_counter()
    deviations = float32_rounding_scale(model, images, outputs)
    tokenizer = model.language_backbone.tokenizer
    context = config.text.context_length
    summaries = {}
    for path, tensor in outputs.items():
        summary = summarize_tensor(tensor)
        if path in deviations:
            summary["float64_max_abs_dev"] = deviations[path]
        summaries[path] = summary
    return {
        "format": 1,
        "config": config_name,
        "config_values": config.to_dict(),
        "imgsz": imgsz,
        "add_sam2_neck": True,
        "captions": list(PARITY_CAPTIONS),
        "additional_text": list(ADDITIONAL_TEXT),
        "caption_token_ids": tokenizer(list(PARITY_CAPTIONS), context_length=context).tolist(),
        "additional_text_token_ids": tokenizer(list(ADDITIONAL_TEXT), context_length=context).tolist(),
        "checkpoint_spec": spec,
        "outputs": summaries,
        "provenance": {
            "generator": "tools/make_parity_reference.py",
            "official_package": f"sam3 {official_package_version()}",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "build_and_fill_seconds": round(built - started, 2),
            "float32_forward_seconds": round(ran - built, 2),
        },
    }


def parse_case(text: str) -> tuple[str, int]:
    name, _, size = text.partition(":")
    if not size.isdigit():
        raise argparse.ArgumentTypeError(f"expected CONFIG:SIZE, got {text!r}")
    return name, int(size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", type=parse_case, help="CONFIG:SIZE (repeatable)")
    parser.add_argument("--out-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    if hashlib.sha256(BPE_PATH.read_bytes()).hexdigest() != BPE_SHA256:
        raise SystemExit(f"{BPE_PATH} is not the CLIP BPE vocabulary the official tokenizer expects")
    torch.set_grad_enabled(False)
    official = load_official_modules()
    configs = load_project_config_module()
    cases = args.case or [parse_case(case) for case in DEFAULT_CASES]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for config_name, imgsz in cases:
        record = record_case(official, configs, config_name, imgsz)
        path = args.out_dir / f"parity_{config_name}_{imgsz}.json"
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{path.relative_to(REPO_ROOT)}: {path.stat().st_size} bytes, {record['provenance']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
