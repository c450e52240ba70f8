"""Building a ready-to-run backbone: configuration, weights, device, dtype, compilation."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import backbone_state_dict, load_backbone_weights, read_checkpoint
from .compile import apply_compile, compile_plan
from .config import Sam3Config, get_config
from .neck import Sam3DualViTDetNeck
from .position_encoding import PositionEmbeddingSine
from .text_encoder import VETextEncoder
from .tokenizer import Sam3Tokenizer
from .vit import ViT
from .vl_backbone import SAM3VLBackbone


def build_sam3_vl_backbone(
    checkpoint: str | os.PathLike | None = None,
    *,
    config: str | Sam3Config = "sam3",
    imgsz: int = 1008,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compile_visual: bool | str = False,
    add_sam2_neck: bool = False,
    bpe_path: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> SAM3VLBackbone:
    """A SAM3VLBackbone in eval mode.

    checkpoint: None for random weights (deterministic under `torch.manual_seed`), a local path, an fsspec URI
    (`s3://…`, `file://…`; `storage_options` go to fsspec) or `hf://facebook/sam3[/<file>]`. Official `sam3.pt` and
    transformers `model.safetensors` layouts are both accepted.

    compile_visual: True/"on", False/"off" or "auto" (see `sam3core.compile`): compiles the vision trunk and the
    neck's pyramid levels in place, lazily; `model.warm_up(batch_size)` pays for it up front.
    """
    cfg = get_config(config)
    tokenizer = Sam3Tokenizer(bpe_path, context_length=cfg.text.context_length)
    weights = None
    if checkpoint is not None:
        source = os.fspath(checkpoint)
        weights = backbone_state_dict(read_checkpoint(source, storage_options), cfg.scale_factors, source)
    # With weights at hand, skip the random initialisation of ~800M parameters: build on the meta device and
    # adopt the loaded tensors.
    with torch.device("meta" if weights is not None else "cpu"):
        model = _assemble(cfg, imgsz, tokenizer, add_sam2_neck)
    if weights is not None:
        load_backbone_weights(model, weights, source)
    else:
        init_random_weights(model)
    model.to(device=device, dtype=_as_dtype(dtype))
    model.eval()
    weight = model.vision_backbone.trunk.patch_embed.proj.weight
    model.compile_plan = compile_plan(compile_visual, weight.device, weight.dtype)
    apply_compile(model.vision_backbone, model.compile_plan)
    return model


def _assemble(cfg: Sam3Config, imgsz: int, tokenizer: Sam3Tokenizer, add_sam2_neck: bool) -> SAM3VLBackbone:
    trunk = ViT(cfg.vision, imgsz)
    neck = Sam3DualViTDetNeck(
        trunk, PositionEmbeddingSine(cfg.d_model), cfg.d_model, cfg.scale_factors, add_sam2_neck=add_sam2_neck
    )
    text = VETextEncoder(cfg.text, cfg.d_model, tokenizer)
    model = SAM3VLBackbone(neck, text, scalp=cfg.scalp)
    model.config = cfg
    return model


def init_random_weights(model: nn.Module) -> None:
    """A tame random initialisation: truncated normal (std 0.02) weights, zero biases, unit LayerNorms."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            continue
        for name, param in module.named_parameters(recurse=False):
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.trunc_normal_(param, std=0.02)


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]
