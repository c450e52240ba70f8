"""Record the backbone tensor names of the real transformers SAM 3 model, for `tests/test_parity.py`.

The Hub's `model.safetensors` for SAM 3 is the state dict of transformers' `Sam3VideoModel`: the detector
(`Sam3Model`) under `detector_model.`, the SAM 2 twin neck as `tracker_neck.`, plus heads the backbone does not
use. This tool builds that model with the "tiny" sizes of `sam3core/config.py` and writes
`tests/data/hf_keys_tiny.json`: every backbone key (`detector_model.vision_encoder.*`,
`detector_model.text_encoder.*`, `detector_model.text_projection.*`, `tracker_neck.*`) with its shape. The
test converts the official-layout checkpoint with `tests/hf_layout.py` and requires exactly these names and
shapes, so the converter that feeds sam3core's safetensors loader is checked against the real model, not
against itself.

Run with the reference environment (`tools/official_sam3.py`) plus transformers:

    .refenv/bin/pip install --no-deps transformers
    .refenv/bin/pip install "tokenizers>=0.23.1,<0.24" typer
    .refenv/bin/python tools/make_hf_key_list.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.make_parity_reference import load_project_config_module  # noqa: E402

BACKBONE_PREFIXES = (
    "detector_model.vision_encoder.",
    "detector_model.text_encoder.",
    "detector_model.text_projection.",
    "tracker_neck.",
)
OUTPUT = REPO_ROOT / "tests" / "data" / "hf_keys_tiny.json"


def transformers_detector_config(config: Any) -> dict[str, Any]:
    vision, text = config.vision, config.text
    return {
        "vision_config": {
            "backbone_config": {
                "model_type": "sam3_vit_model",
                "hidden_size": vision.width,
                "intermediate_size": int(vision.width * vision.mlp_ratio),
                "num_hidden_layers": vision.depth,
                "num_attention_heads": vision.heads,
                "image_size": config.default_imgsz,
                "patch_size": vision.patch_size,
                "window_size": vision.window_size,
                "global_attn_indexes": list(vision.global_blocks),
                "pretrain_image_size": vision.pretrain_img_size,
            },
            "fpn_hidden_size": config.d_model,
            "scale_factors": list(config.scale_factors),
        },
        "text_config": {
            "vocab_size": text.vocab_size,
            "hidden_size": text.width,
            "intermediate_size": int(text.width * text.mlp_ratio),
            "projection_dim": text.projection_dim,
            "num_hidden_layers": text.layers,
            "num_attention_heads": text.heads,
            "max_position_embeddings": text.context_length,
            "hidden_act": "gelu",
        },
        "detr_encoder_config": {"hidden_size": config.d_model},
    }


def main() -> int:
    import transformers
    from transformers import Sam3Config
    from transformers.models.sam3_video.configuration_sam3_video import Sam3VideoConfig
    from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoModel

    config = load_project_config_module().get_config("tiny")
    detector = Sam3Config(**transformers_detector_config(config))
    model = Sam3VideoModel(Sam3VideoConfig(detector_config=detector.to_dict()))
    keys = {
        name: list(tensor.shape) for name, tensor in model.state_dict().items() if name.startswith(BACKBONE_PREFIXES)
    }
    record = {
        "config": "tiny",
        "source": f"transformers {transformers.__version__} Sam3VideoModel state_dict, backbone keys only",
        "keys": keys,
    }
    OUTPUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{OUTPUT.relative_to(REPO_ROOT)}: {len(keys)} keys")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
