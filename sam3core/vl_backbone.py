"""SAM 3's vision-language backbone: the image neck and the text encoder side by side, without fusion."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .compile import CompilePlan, apply_compile, warm_up
from .config import Sam3Config
from .deferred import DeferredWeights
from .neck import Sam3DualViTDetNeck
from .text_encoder import VETextEncoder
from .tokenizer import Sam3Tokenizer


class SAM3VLBackbone(nn.Module):
    """Returns dictionaries with the keys, shapes and conventions of the official backbone.

    `scalp` drops that many of the lowest-resolution pyramid levels (the official model uses 1).
    """

    def __init__(
        self,
        visual: Sam3DualViTDetNeck,
        text: VETextEncoder,
        compile_visual: bool = False,
        act_ckpt_whole_vision_backbone: bool = False,
        act_ckpt_whole_language_backbone: bool = False,
        scalp: int = 0,
    ) -> None:
        super().__init__()
        # Compiles the modules' calls in place, so parameter names stay those of the checkpoint.
        self.compile_plan = CompilePlan(enabled=bool(compile_visual))
        apply_compile(visual, self.compile_plan)
        self.vision_backbone = visual
        self.language_backbone = text
        self.scalp = scalp
        self.act_ckpt_whole_vision_backbone = act_ckpt_whole_vision_backbone
        self.act_ckpt_whole_language_backbone = act_ckpt_whole_language_backbone
        self.config: Sam3Config | None = None  # set by build_sam3_vl_backbone
        # parts whose weights wait for their first call ("trunk", "text"): build_sam3_vl_backbone(defer=...)
        self.deferred_weights: dict[str, DeferredWeights] = {}

    @property
    def tokenizer(self) -> Sam3Tokenizer:
        return self.language_backbone.tokenizer

    @property
    def imgsz(self) -> int:
        return self.vision_backbone.trunk.imgsz

    def materialize_weights(self, *parts: str) -> None:
        """Makes the weights `build_sam3_vl_backbone(defer=...)` left for later ("trunk", "text"; all when none is
        named), those not made yet."""
        for part, deferred in self.deferred_weights.items():
            if not parts or part in parts:
                deferred.materialize()

    def pending_weights(self) -> list[str]:
        """The parts whose weights are still to be made."""
        return [part for part, deferred in self.deferred_weights.items() if deferred.pending]

    def forward(
        self,
        samples: Tensor,
        captions: list[str] | Tensor,
        input_boxes: Tensor | None = None,
        additional_text: list[str] | Tensor | None = None,
    ) -> dict[str, Any]:
        output = self.forward_image(samples)
        output.update(self.forward_text(captions, input_boxes, additional_text))
        return output

    def _scalped(self, levels: list[Tensor]) -> list[Tensor]:
        return levels[: -self.scalp] if self.scalp > 0 else levels

    def _as_model_input(self, samples: Tensor) -> Tensor:
        weight = self.vision_backbone.trunk.patch_embed.proj.weight
        # contiguous: compiled code is specialised on strides, and callers hand over permuted [B, S, S, 3] batches
        return samples.to(device=weight.device, dtype=weight.dtype).contiguous()

    def _trunk_input(self, trunk_map: Tensor) -> Tensor:
        """A stored map (any float dtype, any device) as the neck's input; only its channel count is fixed."""
        width = self.vision_backbone.trunk.channel_list[-1]
        if trunk_map.ndim != 4 or trunk_map.shape[1] != width:
            raise ValueError(f"expected a trunk map of shape [B, {width}, g, g], got {list(trunk_map.shape)}")
        weight = self.vision_backbone.convs[0].conv_1x1.weight
        return trunk_map.to(device=weight.device, dtype=weight.dtype)

    def forward_trunk(self, samples: Tensor) -> Tensor:
        """samples [B, 3, S, S] -> the ViT trunk's last map [B, width, S/14, S/14]: everything the necks read."""
        x = self._as_model_input(samples)
        if self.act_ckpt_whole_vision_backbone and self.training:
            return checkpoint(self.vision_backbone.trunk, x, use_reentrant=False)[-1]
        return self.vision_backbone.trunk(x)[-1]

    def forward_image_from_trunk(self, trunk_map: Tensor) -> dict[str, Any]:
        """The neck half of `forward_image`: a trunk map [B, width, g, g] -> the same dictionary.

        The map is cast to the neck's device and dtype first (a float16 cache feeds a float32 or bfloat16 model).
        """
        x = self._trunk_input(trunk_map)
        if self.act_ckpt_whole_vision_backbone and self.training:
            levels = checkpoint(self.vision_backbone.forward_from_trunk, x, use_reentrant=False)
        else:
            levels = self.vision_backbone.forward_from_trunk(x)
        sam3_features, sam3_pos, sam2_features, sam2_pos = levels
        sam3_features, sam3_pos = self._scalped(sam3_features), self._scalped(sam3_pos)
        sam2_output = None
        if sam2_features is not None and sam2_pos is not None:
            sam2_features, sam2_pos = self._scalped(sam2_features), self._scalped(sam2_pos)
            sam2_output = {
                "vision_features": sam2_features[-1],
                "vision_pos_enc": sam2_pos,
                "backbone_fpn": sam2_features,
            }
        return {
            "vision_features": sam3_features[-1],
            "vision_pos_enc": sam3_pos,
            "backbone_fpn": sam3_features,
            "sam2_backbone_out": sam2_output,
        }

    def forward_image(self, samples: Tensor) -> dict[str, Any]:
        """samples [B, 3, S, S] -> the last kept level as `vision_features` plus all kept levels and encodings.

        Trunk then neck, through the two public halves, so that a cached trunk map gives exactly this dictionary.
        """
        return self.forward_image_from_trunk(self.forward_trunk(samples))

    def forward_vision_features(self, samples: Tensor) -> Tensor:
        """samples [B, 3, S, S] -> `forward_image(samples)["vision_features"]` [B, d_model, S/p, S/p], computing only
        that pyramid level (the other levels and the position encodings are skipped)."""
        x = self.forward_trunk(samples)  # [B, width, g, g]
        kept = len(self.vision_backbone.convs) - max(self.scalp, 0)
        return self.vision_backbone.convs[kept - 1](x)

    def warm_up(self, batch_size: int, vision_features_only: bool = False) -> float:
        """Runs a zero batch of `batch_size` images through the vision path, under `torch.inference_mode`, so that
        compilation (if any) happens now, at the shapes real batches will have; falls back to eager with a warning
        if compiling fails. Returns the seconds it took."""
        run = self.zero_batch_call(batch_size, vision_features_only)
        return warm_up(run, self.vision_backbone, f"on a padded batch of {batch_size}")

    def zero_batch_call(self, batch_size: int, vision_features_only: bool = False) -> Callable[[], Any]:
        """What `warm_up` calls (under `torch.inference_mode`): a zero batch of `batch_size` images through the
        vision path real batches take; `sam3core.aot_package` exports what it reaches."""
        weight = self.vision_backbone.trunk.patch_embed.proj.weight
        forward = self.forward_vision_features if vision_features_only else self.forward_image

        def run() -> None:
            # made under inference mode, like real batches: compiled code is guarded on whether its input is an
            # inference tensor, and a mismatch would compile again
            forward(torch.zeros(batch_size, 3, self.imgsz, self.imgsz, device=weight.device, dtype=weight.dtype))

        return run

    def forward_image_sam2(self, samples: Tensor) -> dict[str, Any]:
        """Only the SAM 2 pyramid (requires a backbone built with add_sam2_neck=True)."""
        neck = self.vision_backbone
        if neck.sam2_convs is None:
            raise RuntimeError("this backbone has no SAM2 neck; build it with add_sam2_neck=True")
        features, positions = neck.sam_forward_feature_levels(self.forward_trunk(samples), neck.sam2_convs)
        features, positions = self._scalped(features), self._scalped(positions)
        return {"vision_features": features[-1], "vision_pos_enc": positions, "backbone_fpn": features}

    def forward_text(
        self,
        captions: list[str] | Tensor,
        input_boxes: Tensor | None = None,
        additional_text: list[str] | Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Captions (strings or token ids [N, L]) -> sequence-first features, padding mask True where padded."""
        encoder = self.language_backbone
        tokens = encoder.tokenize(captions)
        count = tokens.shape[0]
        if additional_text is not None:
            # Encoded in the same forward, split off again below.
            tokens = torch.cat([tokens, encoder.tokenize(additional_text)])
        if self.act_ckpt_whole_language_backbone and self.training:
            mask, memory, embeds = checkpoint(encoder, tokens, input_boxes, use_reentrant=False)
        else:
            mask, memory, embeds = encoder(tokens, input_boxes)
        output: dict[str, Tensor] = {}
        if additional_text is not None:
            output["additional_text_features"] = memory[:, count:]
            output["additional_text_mask"] = mask[count:]
        output["language_features"] = memory[:, :count]  # [L, N, d_model]
        output["language_mask"] = mask[:count]  # [N, L]
        output["language_embeds"] = embeds[:, :count]  # [L, N, width], before the transformer
        return output

    def set_imgsz(self, imgsz: list[int] | tuple[int, int] = (1008, 1008)) -> None:
        self.vision_backbone.set_imgsz(imgsz)
