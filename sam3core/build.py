"""Building a ready-to-run backbone: configuration, weights, device, dtype, compilation."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection, Mapping
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
    with_text_projection,
)
from .compile import apply_compile, compile_plan
from .config import AUTO, Sam3Config, get_config
from .deferred import DEFERRABLE, DeferredWeights, parameters_under
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
    defer: Collection[str] = (),
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

    defer: parts left unmade until their first call or `model.materialize_weights()` (`sam3core.deferred`):
    "trunk" (the trunk's blocks, most of the model: for a caller that will run the trunk from a compiled package),
    "text" (the text encoder: for a caller that will embed no caption). The checkpoint is still checked whole now.
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
    unknown = sorted(set(defer) - set(DEFERRABLE))
    if unknown:
        raise ValueError(f"defer: {unknown} cannot wait; choose among {sorted(DEFERRABLE)}")
    # part -> the module whose weights wait
    deferred = {} if shapes_only else {part: name for part, name in DEFERRABLE.items() if part in defer}
    with torch.device("meta"):
        model = _assemble(cfg, imgsz, tokenizer, add_sam2_neck)
    fill: Callable[[nn.Module, str], None] | None = None
    if weights is not None:
        load_backbone_weights(model, weights, source, defer=deferred.values())
        fill = _checkpoint_fill(checkpoint, storage_options, cfg, source)
    elif not shapes_only:
        seed = int(torch.randint(0, 2**62, ()))  # from torch's generator: deterministic under torch.manual_seed
        model.to(dtype=_as_dtype(dtype))  # drawn in the final dtype: half the memory to touch in bfloat16
        _apply_outside(model, deferred.values(), _empty_on_cpu)  # what nn.Module.to_empty does
        init_random_weights(model, seed, skip=deferred.values())
        fill = _random_fill(seed)
    _apply_outside(model, deferred.values(), _converter(device, _as_dtype(dtype)))
    for part, name in deferred.items():
        assert fill is not None  # nothing is deferred when only shapes are built
        model.get_submodule(name).to(dtype=_as_dtype(dtype))  # still on the meta device
        model.deferred_weights[part] = DeferredWeights(model, name, torch.device(device or "cpu"), fill)
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


def init_random_weights(model: nn.Module, seed: int, *, only: str | None = None, skip: Collection[str] = ()) -> None:
    """A tame random initialisation: normal (std 0.02) weights, zero biases, unit LayerNorms. (Normal, not
    `trunc_normal_`: its default cut at +-2 is 100 standard deviations away, and drawing it cost twice as long.)

    Each parameter draws from its own generator, seeded by `seed` and its name, so any part of the model (`only`
    the module of that name, or all but the modules named in `skip`) gets the same values alone as in a whole
    model."""
    for module_name, module in model.named_modules():
        outside = only is not None and not _is_under(module_name, only)
        if outside or any(_is_under(module_name, name) for name in skip):
            continue
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(param) if name == "weight" else nn.init.zeros_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
            elif param.device.type == "cpu":
                nn.init.normal_(param, std=0.02, generator=_generator(seed, f"{module_name}.{name}"))
            else:  # drawn on the CPU: another device's generator gives other values for the same seed
                values = torch.empty(param.shape, dtype=param.dtype)
                nn.init.normal_(values, std=0.02, generator=_generator(seed, f"{module_name}.{name}"))
                param.copy_(values)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _apply_outside(model: nn.Module, skip: Collection[str], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """`fn` applied to every parameter and buffer of `model` (as `nn.Module._apply` does), except those of the
    submodules named in `skip`."""
    if not skip:
        model._apply(fn)
        return
    skipped = [model.get_submodule(name) for name in skip]

    def visit(module: nn.Module) -> None:
        if not any(module is other for other in skipped):
            module._apply(fn, recurse=False)
            for child in module.children():
                visit(child)

    visit(model)


def _empty_on_cpu(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised, contiguous CPU tensor of `t`'s shape and dtype (every parameter and buffer of the model is
    contiguous). `torch.empty_like` did this, but on a meta tensor it runs torch's Python reference, whose first call
    imports sympy: 0.2 to 0.3 s of a tiny model's 0.5 s build (`bench/model_build.py`)."""
    return torch.empty(t.shape, dtype=t.dtype, device="cpu")


def _converter(device: str | torch.device | None, dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What `nn.Module.to(device, dtype)` does to each tensor: the dtype changes floating-point ones only."""

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device or t.device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    return convert


def _random_fill(seed: int) -> Callable[[nn.Module, str], None]:
    """Fills a deferred module with the values a whole model drawn from `seed` has there."""

    def fill(model: nn.Module, name: str) -> None:
        init_random_weights(model, seed, only=name)

    return fill


def _checkpoint_fill(
    checkpoint: str | os.PathLike | Mapping[str, Any] | None,
    storage_options: Mapping[str, Any] | None,
    cfg: Sam3Config,
    source: str,
) -> Callable[[nn.Module, str], None]:
    """Fills a deferred module from the checkpoint, read again (a state dict passed in is kept for it)."""

    def fill(model: nn.Module, name: str) -> None:
        if isinstance(checkpoint, Mapping):
            state = checkpoint_tensors(checkpoint, source)
        else:
            state = read_checkpoint(source, storage_options)
        weights = with_text_projection(model, backbone_state_dict(state, cfg.scale_factors, source))
        for key, param in parameters_under(model, name).items():
            param.copy_(weights[key])

    return fill


def _as_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]
