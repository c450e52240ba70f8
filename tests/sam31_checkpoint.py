"""SAM 3.1 checkpoints written by the tests, in the layout of the released `sam3.1_multiplex.pt`.

No 3.1 weights can be downloaded here, so the files are built from facts (`../shared/SAM3_FACTS.md`, "SAM 3.1";
Meta's `Sam3TriViTDetNeck` and `build_sam3_multiplex_video_predictor`): the backbone under `detector.backbone.`
with SAM 3's trunk and text names (the trunk's complex `freqs_cis` tables persisted), a neck of three heads with
three levels each (`convs`, `interactive_convs`, `propagation_convs`), the detector's heads under their own
`detector.*` names and the multiplex tracker under `tracker.model.`. The fp16 safetensors variant holds the same keys
as float16, minus every `freqs_cis` and `language_backbone.encoder.text_projection`, as the community file does.

Values come from the parity generator (`tools/parity_weights.py`): a function of each key and shape, so every head
gets different weights and a mapping that mixes two heads up changes the outputs far beyond float32 noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sam3core.build import _assemble
from sam3core.config import get_config
from sam3core.tokenizer import Sam3Tokenizer
from tools.parity_weights import deterministic_state_dict

BACKBONE = "detector.backbone."
# Names from Meta's 3.1 modules (detector heads of `Sam3Image`, the multiplex tracker): ignored by the loader.
DETECTOR_HEAD_ENTRIES: dict[str, tuple[int, ...]] = {
    "detector.transformer.encoder.layers.0.linear1.weight": (16, 8),
    "detector.transformer.decoder.query_embed.weight": (4, 8),
    "detector.geometry_encoder.img_pre_norm.weight": (8,),
    "detector.segmentation_head.pixel_decoder.conv_layers.0.weight": (8, 8, 3, 3),
    "detector.dot_prod_scoring.hs_proj.bias": (8,),
}
TRACKER_ENTRIES: dict[str, tuple[int, ...]] = {
    "tracker.model.maskmem_tpos_enc": (7, 1, 1, 8),
    "tracker.model.interactivity_no_mem_embed": (1, 1, 8),
    "tracker.model.no_obj_embed_spatial": (16, 8),
    "tracker.model.transformer.encoder.layers.0.self_attn.q_proj.weight": (8, 8),
    "tracker.model.maskmem_backbone.mask_downsampler.encoder.0.weight": (4, 32, 3, 3),
    "tracker.model.interactive_sam_mask_decoder.conv_s0.weight": (4, 8, 1, 1),
}


def backbone_spec(config: str, imgsz: int = 1008) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """`detector.backbone.*` key -> (shape, dtype) of the configuration, `freqs_cis` included (built on `meta`)."""
    cfg = get_config(config)
    with torch.device("meta"):
        model = _assemble(cfg, imgsz, Sam3Tokenizer(context_length=cfg.text.context_length), False)
    spec = {BACKBONE + k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    head_dim = cfg.vision.width // cfg.vision.heads
    for block in range(cfg.vision.depth):
        # the file stores each block's RoPE table (1008 px only); its values are never read, its key must be known
        spec[f"{BACKBONE}vision_backbone.trunk.blocks.{block}.attn.freqs_cis"] = (
            (cfg.vision.window_size**2, head_dim // 2),
            torch.complex64,
        )
    return spec


def sam31_state(config: str = "tiny-sam3.1") -> dict[str, torch.Tensor]:
    """A whole `sam3.1_multiplex.pt` state dict for `config`: backbone, detector heads, tracker."""
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = dict(backbone_spec(config))
    spec.update({k: (shape, torch.float32) for k, shape in {**DETECTOR_HEAD_ENTRIES, **TRACKER_ENTRIES}.items()})
    return deterministic_state_dict(spec)


def fp16_safetensors_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The community fp16 file: same keys minus `freqs_cis` and `text_projection`, float16."""
    return {
        key: value.to(torch.float16).contiguous()
        for key, value in state.items()
        if not key.endswith("freqs_cis") and not key.endswith("language_backbone.encoder.text_projection")
    }


def write_sam31(path: Path, state: dict[str, torch.Tensor]) -> Path:
    """`.safetensors` for the fp16 layout, else torch.save's zip under "model" as Meta's file is read."""
    if path.suffix == ".safetensors":
        save_file(fp16_safetensors_state(state), str(path))
    else:
        torch.save({"model": state}, path)
    return path
