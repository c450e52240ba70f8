"""Convert an official-layout (`sam3.pt`) backbone state dict to the transformers `model.safetensors` layout.

This is the parity tests' oracle for the safetensors path, written apart from sam3core's loader on purpose:
the tests convert the deterministic official checkpoint with it, save the result as safetensors, and require
sam3core to produce the official outputs from that file. The target names are the real transformers model's
(`tests/data/hf_keys_tiny.json`, recorded from `Sam3VideoModel` by `tools/make_hf_key_list.py`); the renaming
rules follow transformers' SAM 3 conversion scripts:

- prefix `detector.backbone.` becomes `detector_model.`; the SAM 2 twin neck (`sam2_convs`) goes to the
  top-level `tracker_neck.`;
- ViT: `pos_embed` loses its cls slot; `qkv` splits into `q_proj`/`k_proj`/`v_proj`; `attn.proj` becomes
  `attention.o_proj`; `norm1/2` become `layer_norm1/2`; `ln_pre` becomes `layer_norm`; the complex
  `freqs_cis` tables are dropped (transformers recomputes them);
- neck: `convs.N` becomes `fpn_layers.N` with `dconv_2x2(_0)`/`maxpool_2x2` as `scale_layers.0`,
  `dconv_2x2_1` as `scale_layers.2`, `conv_1x1` as `proj1`, `conv_3x3` as `proj2`;
- text tower in CLIP layout under `text_encoder.text_model.`: `in_proj_*` splits into `q/k/v_proj`,
  `ln_1/2` become `layer_norm1/2`, `c_fc/c_proj` become `fc1/fc2`, `ln_final` becomes `final_layer_norm`;
  the unused `text_projection` [width, proj] becomes `text_encoder.text_projection.weight`, transposed;
- the `resizer` (width to d_model) becomes the detector's `text_projection`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch

OFFICIAL_PREFIX = "detector.backbone."
DETECTOR_PREFIX = "detector_model."
TRACKER_NECK_PREFIX = "tracker_neck."

_NECK_STAGE_NAMES = {
    "dconv_2x2_0": "scale_layers.0",
    "dconv_2x2": "scale_layers.0",
    "maxpool_2x2": "scale_layers.0",
    "dconv_2x2_1": "scale_layers.2",
    "conv_1x1": "proj1",
    "conv_3x3": "proj2",
}
_VIT_BLOCK_PARTS = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.proj": "attention.o_proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TEXT_BLOCK_PARTS = {
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}

_TRUNK = "vision_backbone.trunk."
_TEXT = "language_backbone.encoder."
_VISION_OUT = "vision_encoder.backbone."
_TEXT_OUT = "text_encoder.text_model."

Converted = dict[str, torch.Tensor]


def _split_three(name_of: Callable[[str], str], tensor: torch.Tensor) -> Converted:
    query, key, value = torch.chunk(tensor, 3, dim=0)
    return {name_of("q"): query.clone(), name_of("k"): key.clone(), name_of("v"): value.clone()}


def _convert_trunk(rest: str, tensor: torch.Tensor) -> Converted:
    if rest == "pos_embed":
        return {_VISION_OUT + "embeddings.position_embeddings": tensor[:, 1:, :].clone()}
    if rest == "patch_embed.proj.weight":
        return {_VISION_OUT + "embeddings.patch_embeddings.projection.weight": tensor}
    match = re.fullmatch(r"ln_pre\.(weight|bias)", rest)
    if match:
        return {_VISION_OUT + f"layer_norm.{match[1]}": tensor}
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias|freqs_cis)", rest)
    if match is None:
        raise KeyError(rest)
    block, part, leaf = match.groups()
    layer = f"{_VISION_OUT}layers.{block}."
    if leaf == "freqs_cis" and part == "attn":
        return {}
    if part == "attn.qkv":
        return _split_three(lambda q: f"{layer}attention.{q}_proj.{leaf}", tensor)
    if part in _VIT_BLOCK_PARTS:
        return {f"{layer}{_VIT_BLOCK_PARTS[part]}.{leaf}": tensor}
    raise KeyError(rest)


def _convert_neck(prefix: str, rest: str, tensor: torch.Tensor) -> Converted:
    match = re.fullmatch(r"(\d+)\.(\w+)\.(weight|bias)", rest)
    if match is None or match[2] not in _NECK_STAGE_NAMES:
        raise KeyError(rest)
    level, stage, leaf = match.groups()
    return {f"{prefix}fpn_layers.{level}.{_NECK_STAGE_NAMES[stage]}.{leaf}": tensor}


def _convert_text(rest: str, tensor: torch.Tensor) -> Converted:
    if rest == "token_embedding.weight":
        return {_TEXT_OUT + "embeddings.token_embedding.weight": tensor}
    if rest == "positional_embedding":
        return {_TEXT_OUT + "embeddings.position_embedding.weight": tensor}
    if rest == "text_projection":
        return {"text_encoder.text_projection.weight": tensor.t().contiguous()}
    match = re.fullmatch(r"ln_final\.(weight|bias)", rest)
    if match:
        return {_TEXT_OUT + f"final_layer_norm.{match[1]}": tensor}
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", rest)
    if match:
        layer = f"{_TEXT_OUT}encoder.layers.{match[1]}."
        leaf = match[2]
        return _split_three(lambda q: f"{layer}self_attn.{q}_proj.{leaf}", tensor)
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", rest)
    if match is None or match[2] not in _TEXT_BLOCK_PARTS:
        raise KeyError(rest)
    block, part, leaf = match.groups()
    return {f"{_TEXT_OUT}encoder.layers.{block}.{_TEXT_BLOCK_PARTS[part]}.{leaf}": tensor}


def _convert_one(name: str, tensor: torch.Tensor) -> Converted:
    rest = name.removeprefix(OFFICIAL_PREFIX)
    if rest.startswith(_TRUNK):
        renamed = _convert_trunk(rest.removeprefix(_TRUNK), tensor)
        return {DETECTOR_PREFIX + key: value for key, value in renamed.items()}
    if rest.startswith("vision_backbone.convs."):
        return _convert_neck(
            DETECTOR_PREFIX + "vision_encoder.neck.", rest.removeprefix("vision_backbone.convs."), tensor
        )
    if rest.startswith("vision_backbone.sam2_convs."):
        return _convert_neck(TRACKER_NECK_PREFIX, rest.removeprefix("vision_backbone.sam2_convs."), tensor)
    if rest.startswith(_TEXT):
        renamed = _convert_text(rest.removeprefix(_TEXT), tensor)
        return {DETECTOR_PREFIX + key: value for key, value in renamed.items()}
    match = re.fullmatch(r"language_backbone\.resizer\.(weight|bias)", rest)
    if match:
        return {DETECTOR_PREFIX + f"text_projection.{match[1]}": tensor}
    raise KeyError(rest)


def official_to_hf(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers-layout tensors for every `detector.backbone.*` entry; other entries are ignored.

    Raises KeyError naming the entry for a backbone key it does not know, so a new official tensor cannot
    silently go missing from the converted file.
    """
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if not name.startswith(OFFICIAL_PREFIX):
            continue
        try:
            renamed = _convert_one(name, tensor)
        except KeyError:
            raise KeyError(f"no transformers name for official backbone key {name!r}") from None
        for key, value in renamed.items():
            if key in converted:
                raise KeyError(f"two official keys map to {key!r}")
            converted[key] = value.contiguous()
    return converted
