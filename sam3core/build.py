"""Building a ready-to-run backbone: configuration, weights, device, dtype, compilation."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    backbone_state_dict,
    checkpoint_generation,
    checkpoint_layout,
    checkpoint_tensors,
    load_backbone_weights,
    read_checkpoint,
)
from .compile import apply_compile, compile_plan
from .config import AUTO, Sam3Config, get_config
from .neck import Sam3DualViTDetNeck
from .position_encoding import PositionEmbeddingSine
from .text_encoder import VETextEncoder
from .tokenizer import Sam3Tokenizer
from .tri_neck import Sam3TriViTDetNeck
from .vit import ViT
from .vl_backbone import SAM3VLBackbone
from .vl_backbone_tri import SAM3VLBackboneTri


def build_sam3_vl_backbone(
    checkpoint: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    config: str | Sam3Config = AUTO,
    imgsz: int = 1008,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    compile_visual: bool | str = False,
    add_sam2_neck: bool = False,
    bpe_path: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> SAM3VLBackbone:
    """A SAM3VLBackbone (SAM 3) or SAM3VLBackboneTri (SAM 3.1) in eval mode.

    checkpoint: None for random weights (deterministic under `torch.manual_seed`), a local path, an fsspec URI
    (`s3://…`, `file://…`; `storage_options` go to fsspec) or `hf://facebook/sam3[/<file>]`. Official `sam3.pt`,
    SAM 3.1 `sam3.1_multiplex.pt` (and its fp16 safetensors) and transformers `model.safetensors` layouts are accepted,
    and so is a state dict already in memory (what `torch.load` returned for one of them; the model may share its
    tensors' memory).

    config: "auto" (the default) picks the official configuration of the checkpoint's generation, `sam3` or
    `sam3.1`, from its keys (`sam3` for random weights); a name (`sam3`, `sam3.1`, `tiny`, `tiny-sam3.1`) or a
    Sam3Config overrides it, and a checkpoint of the other generation is refused before any weight is copied.
    add_sam2_neck: SAM 3 only (its optional `sam2_convs`); SAM 3.1's three heads are always built.

    compile_visual: True/"on", False/"off" or "auto" (see `sam3core.compile`): compiles the vision trunk and the
    neck's pyramid levels in place, lazily; `model.warm_up(batch_size)` pays for it up front.
    """
    weights, state, source = None, None, ""
    if isinstance(checkpoint, Mapping):
        source = "the state dict passed in"
        state = checkpoint_tensors(checkpoint, source)
    elif checkpoint is not None:
        source = os.fspath(checkpoint)
        state = read_checkpoint(source, storage_options)
    cfg = _resolve_config(config, state, source)
    tokenizer = Sam3Tokenizer(bpe_path, context_length=cfg.text.context_length)
    if state is not None:
        weights = backbone_state_dict(state, cfg.scale_factors, source)
        del state
    # Assembled on the meta device: the modules' own initialisation of ~800M parameters (about 10 s of CPU for
    # `sam3`) would only be overwritten, by the checkpoint's tensors or by `init_random_weights`.
    shapes_only = weights is None and device is not None and torch.device(device).type == "meta"
    with torch.device("meta"):
        model = _assemble(cfg, imgsz, tokenizer, add_sam2_neck)
    if weights is not None:
        load_backbone_weights(model, weights, source)
    elif not shapes_only:
        model.to(dtype=_as_dtype(dtype))  # drawn in the final dtype: half the memory to touch in bfloat16
        model.to_empty(device="cpu")
        init_random_weights(model)
    model.to(device=device, dtype=_as_dtype(dtype))
    model.eval()
    weight = model.vision_backbone.trunk.patch_embed.proj.weight
    model.compile_plan = compile_plan(compile_visual, weight.device, weight.dtype)
    apply_compile(model.vision_backbone, model.compile_plan)
    return model


_GENERATION_NAMES = {"sam3": "SAM 3", "sam3.1": "SAM 3.1"}


def _resolve_config(config: str | Sam3Config, state: dict | None, source: str) -> Sam3Config:
    """The configuration asked for, or the one of the checkpoint's generation; refuses a generation mismatch."""
    generation = None if state is None else checkpoint_generation(state)
    if isinstance(config, str) and config == AUTO:
        return get_config(generation or "sam3")
    cfg = get_config(config)
    if generation is not None and generation != cfg.generation:
        raise CheckpointError(
            f"{source} is a {_GENERATION_NAMES[generation]} checkpoint ({checkpoint_layout(state or {})} layout), "
            f"but the model config {cfg.name!r} is {_GENERATION_NAMES[cfg.generation]}: use config "
            f"{generation!r} (--model-config {generation}) or 'auto'"
        )
    return cfg


def _assemble(cfg: Sam3Config, imgsz: int, tokenizer: Sam3Tokenizer, add_sam2_neck: bool) -> SAM3VLBackbone:
    trunk = ViT(cfg.vision, imgsz)
    position = PositionEmbeddingSine(cfg.d_model)
    text = VETextEncoder(cfg.text, cfg.d_model, tokenizer)
    if cfg.generation == "sam3.1":
        tri = Sam3TriViTDetNeck(trunk, position, cfg.d_model, cfg.scale_factors)
        model: SAM3VLBackbone = SAM3VLBackboneTri(tri, text, scalp=cfg.scalp)
    else:
        neck = Sam3DualViTDetNeck(trunk, position, cfg.d_model, cfg.scale_factors, add_sam2_neck=add_sam2_neck)
        model = SAM3VLBackbone(neck, text, scalp=cfg.scalp)
    model.config = cfg
    return model


def init_random_weights(model: nn.Module) -> None:
    """A tame random initialisation: normal (std 0.02) weights, zero biases, unit LayerNorms. (Normal, not
    `trunc_normal_`: its default cut at +-2 is 100 standard deviations away, and drawing it cost twice as long.)"""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            continue
        for name, param in module.named_parameters(recurse=False):
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.normal_(param, std=0.02)


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]
