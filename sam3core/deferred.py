"""Parts of the model made only when they are first run: the trunk's blocks, the text encoder.

Two kinds of model actor never read one part of the model's weights:
- one that runs the vision trunk from an AOTInductor package (`sam3core.aot_package`): the package holds the
  trunk's weights, frozen into its library. Building them anyway is most of the model (446M of `sam3`'s 808M
  parameters: 0.9 GB in bfloat16; 2.6 GB less peak memory from a checkpoint, 2.7 s less of random draws on 2 cores,
  `bench/model_build.py`) for a copy that only a failing or mismatched library would use;
- one whose input has no caption at all: the text encoder (354M parameters for `sam3`) never runs.

`build_sam3_vl_backbone(..., defer=("trunk", "text"))` leaves those parts on the meta device and hands each to a
`DeferredWeights`, which makes it from the same source as the rest of the model (the checkpoint, read again, or
the same random draws, which `sam3core.build.init_random_weights` seeds per parameter) on its first call, or when
asked (`SAM3VLBackbone.materialize_weights`). A caller that compiles the trunk just in time must make it first (a
first call under tracing would make the weights inside the traced graph).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# what can wait -> the module (under the backbone) whose weights wait
DEFERRABLE = {"trunk": "vision_backbone.trunk.blocks", "text": "language_backbone"}


class DeferredWeights:
    """The parameters of `model.<name>`, on the meta device until `materialize` fills them on `device`.

    `fill(model, name)` fills every parameter under `name` (already allocated, uninitialised) in place."""

    def __init__(
        self, model: nn.Module, name: str, device: torch.device, fill: Callable[[nn.Module, str], None]
    ) -> None:
        self.model = model
        self.name = name
        self.module = model.get_submodule(name)
        self.device = device
        self._fill = fill
        self.seconds: float | None = None  # how long making them took, once made
        # a list of blocks: whichever the eager trunk calls first makes them all
        blocks = list(self.module) if isinstance(self.module, nn.ModuleList) else [self.module]
        self._hooks = [block.register_forward_pre_hook(self._before_call) for block in blocks]

    @property
    def pending(self) -> bool:
        return self.seconds is None

    def _before_call(self, module: nn.Module, args: tuple) -> None:
        self.materialize()

    def materialize(self) -> None:
        if not self.pending:
            return
        started = time.monotonic()
        # outside inference mode even when the first call is inside it: parameters made as inference tensors could
        # not be exported or compiled later
        with torch.inference_mode(False), torch.no_grad():
            self.module.to_empty(device=self.device)
            self._fill(self.model, self.name)
        for hook in self._hooks:
            hook.remove()
        self.seconds = time.monotonic() - started
        logger.info("made the deferred weights of %s in %.1fs", self.name, self.seconds)

    def __repr__(self) -> str:
        state = "pending" if self.pending else f"made in {self.seconds:.1f}s"
        return f"DeferredWeights({self.name}, {state})"


def parameters_under(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Full name -> parameter, for the parameters of `model.<name>`."""
    return {f"{name}.{key}": param for key, param in model.get_submodule(name).named_parameters()}
