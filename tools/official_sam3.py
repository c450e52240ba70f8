"""Import Meta's official SAM 3 backbone modules on a CPU-only machine without torchvision.

Only for the reference tools (`make_parity_reference.py`, `make_tokenizer_corpus.py`), run with the separate
reference environment, never by the project or its tests:

    pip download --no-deps sam3==0.1.4              # Meta's wheel, into this folder
    python -m venv .refenv
    .refenv/bin/pip install torch==2.13.0            # the CPU wheel
    .refenv/bin/pip install --no-deps sam3-0.1.4-py3-none-any.whl
    .refenv/bin/pip install ftfy regex iopath huggingface_hub einops "numpy<2.4" safetensors pillow
    .refenv/bin/pip install --no-deps timm

Two package initialisers stand between us and the backbone modules, and both import torchvision, which has no
CPU build for this torch:

- `sam3/__init__.py` imports `model_builder`, which imports the whole detector (its ROI-align decoder needs
  torchvision ops). The backbone modules themselves (`vitdet`, `necks`, `position_encoding`,
  `text_encoder_ve`, `tokenizer_ve`, `vl_combiner`) import only torch, timm layers and each other.
- `timm/__init__.py` and `timm/layers/__init__.py` import every layer, and the batch-norm ones import
  `torchvision.ops.misc.FrozenBatchNorm2d`. `vitdet` needs only `DropPath`, `Mlp` and `trunc_normal_`.

The workaround registers `sam3`, `timm` and `timm.layers` as bare packages (their directories, without running
their `__init__`), imports the three timm layer modules `vitdet` needs, and exposes those names on
`timm.layers`. Every line of model code that runs is the unmodified installed code; nothing is stubbed, and
torchvision is never imported (the loader checks).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

BACKBONE_MODULES = ("vitdet", "necks", "position_encoding", "text_encoder_ve", "tokenizer_ve", "vl_combiner")


def _installed_package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed in this environment ({sys.executable})")
    return Path(next(iter(spec.submodule_search_locations)))


def _register_bare_package(name: str, directory: Path) -> ModuleType:
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    spec = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
    spec.submodule_search_locations = [str(directory)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)
    return module


def load_official_modules() -> SimpleNamespace:
    """The official backbone modules, as `namespace.vitdet`, `namespace.necks`, ..."""
    timm_dir = _installed_package_dir("timm")
    sam3_dir = _installed_package_dir("sam3")
    _register_bare_package("timm", timm_dir)
    timm_layers = _register_bare_package("timm.layers", timm_dir / "layers")
    timm_layers.DropPath = importlib.import_module("timm.layers.drop").DropPath
    timm_layers.Mlp = importlib.import_module("timm.layers.mlp").Mlp
    timm_layers.trunc_normal_ = importlib.import_module("timm.layers.weight_init").trunc_normal_
    _register_bare_package("sam3", sam3_dir)
    modules = {name: importlib.import_module(f"sam3.model.{name}") for name in BACKBONE_MODULES}
    if "torchvision" in sys.modules:
        raise RuntimeError("torchvision was imported; the official modules loaded are not the ones expected")
    return SimpleNamespace(**modules)


def official_package_version() -> str:
    from importlib.metadata import version

    return version("sam3")
