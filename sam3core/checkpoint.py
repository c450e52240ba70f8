"""Reading SAM 3 and SAM 3.1 checkpoints and mapping them onto this package's modules.

The layouts understood, all landing in the same modules:
- the official `sam3.pt` (a dict, bare or under "model"): backbone keys live under `detector.backbone.` and carry
  this package's names already; every other key (heads, tracker) is ignored;
- SAM 3.1's `sam3.1_multiplex.pt`, and the fp16 safetensors with the same keys: the same `detector.backbone.`
  names with the three-headed neck (`convs`, `interactive_convs`, `propagation_convs`, three levels each). Only
  keys recognised by name are ignored: the tracker (`tracker.model.`) and the detector's heads (`detector.transformer.`
  and the others in `SAM31_IGNORED_PREFIXES`); any other key is an error naming it, so a renamed neck can never
  be skipped silently and leave a head with random weights;
- the transformers `model.safetensors` (SAM 3): backbone under `detector_model.`, with the trunk's qkv split into
  q/k/v, CLIP-style text tower names, and the SAM 2 neck as `tracker_neck.`.
RoPE tables (`freqs_cis`) in a file are never used: they only fit 1008 px, and this package recomputes them. The text
tower's `text_projection` is never used either: a file without it (the SAM 3.1 fp16 safetensors) loads.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import zipfile
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from safetensors import SafetensorError

if TYPE_CHECKING:
    from torch import Tensor, nn

# torch is imported by the functions that load or convert tensors, not here: `probe_checkpoint` reads only a
# safetensors header or a zip's data.pkl, and a run's driver probes the checkpoint without importing torch.

OFFICIAL_PREFIX = "detector.backbone."
HF_PREFIX = "detector_model."
HF_SAM2_NECK_PREFIX = "tracker_neck."
NATIVE_PREFIXES = ("vision_backbone.", "language_backbone.")
HF_DEFAULT_FILE = "sam3.pt"
HF_DEFAULT_FILES = {"facebook/sam3.1": "sam3.1_multiplex.pt"}  # hf://<repo> without a file: the repo's checkpoint
TEXT_PROJECTION = "language_backbone.encoder.text_projection"

# Layout names (what `probe_checkpoint` reports) and the model generation each holds.
LAYOUT_SAM3 = "sam3.pt"
LAYOUT_SAM31 = "sam3.1_multiplex.pt"
LAYOUT_TRANSFORMERS = "transformers"
LAYOUT_NATIVE = "sam3core"
# Keys only a SAM 3.1 file has: its two new neck heads and the multiplex tracker, all under `tracker.model.`.
_SAM31_NECK_HEADS = ("vision_backbone.interactive_convs.", "vision_backbone.propagation_convs.")
SAM31_MARKERS = (*(OFFICIAL_PREFIX + head for head in _SAM31_NECK_HEADS), "tracker.model.")
# What a SAM 3.1 file holds besides the backbone, by name (Meta's `Sam3MultiplexDetector` and its tracker): ignored.
SAM31_IGNORED_PREFIXES = (
    "tracker.model.",
    "detector.transformer.",
    "detector.geometry_encoder.",
    "detector.segmentation_head.",
    "detector.semantic_seg_head.",
    "detector.dot_prod_scoring.",
    "detector.instance_dot_prod_scoring.",
    "detector.class_embed.",
    "detector.instance_class_embed.",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is not SAM 3's, or does not fit the model configuration."""


def read_checkpoint(source: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """Every tensor in the file at `source`: a local path, an fsspec URI, or hf://<repo>[/<file>]."""
    import torch
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import load_file as load_safetensors_file

    source = os.fspath(source)
    if source.startswith("hf://"):
        source = _download_from_hub(source)
    try:
        fs, path = fsspec.core.url_to_fs(source, **dict(storage_options or {}))
        local = isinstance(fs, LocalFileSystem)
        with fs.open(path, "rb") as f:
            head = f.read(16)
        if _looks_like_safetensors(head):
            return load_safetensors_file(path) if local else load_safetensors(fs.cat_file(path))
        if local:
            # mmap keeps a 3.4 GB file out of memory until the weights are copied into the model
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
        else:
            with fs.open(path, "rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {source}") from exc
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        ValueError,
        SafetensorError,
    ) as exc:
        raise CheckpointError(f"{source} is not a readable PyTorch or safetensors checkpoint: {exc}") from exc
    return checkpoint_tensors(state, source)


def checkpoint_tensors(state: Any, source: str) -> dict[str, Tensor]:
    """The tensors of a loaded checkpoint: its `model` entry when it has one (training checkpoints), else itself."""
    from torch import Tensor

    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source} holds a {type(state).__name__}, not a dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _looks_like_safetensors(head: bytes) -> bool:
    # safetensors: little-endian u64 header size, then a JSON object
    return len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _download_from_hub(uri: str) -> str:
    parts = uri.removeprefix("hf://").strip("/").split("/")
    if len(parts) < 2:
        raise CheckpointError(f"expected hf://<owner>/<repo>[/<file>], got {uri}")
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or HF_DEFAULT_FILES.get(repo_id, HF_DEFAULT_FILE)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise CheckpointError("hf:// checkpoints need huggingface_hub: pip install 'sam3-embed[hub]'") from exc
    return hf_hub_download(repo_id=repo_id, filename=filename)


@dataclass(frozen=True)
class CheckpointProbe:
    """What a cheap look at a checkpoint found: its container format, key layout and number of entries."""

    source: str
    format: str  # "safetensors" | "torch zip" | "torch legacy" | "hub" (hf:// files are not fetched to look)
    layout: str  # "sam3.pt" | "sam3.1_multiplex.pt" | "transformers" | "sam3core" | "unknown" (hub only)
    entries: int  # tensors (or other values) in the state dict; 0 when not inspected
    generation: str = "unknown"  # "sam3" | "sam3.1" | "unknown" (hub only)


def checkpoint_layout(keys: Iterable[str]) -> str | None:
    """Which of the understood key layouts these state-dict keys follow, or None."""
    keys = list(keys)
    if any(key.startswith(OFFICIAL_PREFIX) for key in keys):
        return LAYOUT_SAM31 if any(key.startswith(SAM31_MARKERS) for key in keys) else LAYOUT_SAM3
    if any(key.startswith(HF_PREFIX + "vision_encoder.") for key in keys):
        return LAYOUT_TRANSFORMERS
    if any(key.startswith(NATIVE_PREFIXES) for key in keys):
        return LAYOUT_NATIVE
    return None


def checkpoint_generation(keys: Iterable[str]) -> str | None:
    """The model generation of a SAM 3 state dict: "sam3.1" with SAM 3.1's neck heads or tracker, else "sam3"; None
    for keys that are not SAM 3's at all."""
    keys = list(keys)
    layout = checkpoint_layout(keys)
    if layout is None:
        return None
    if layout == LAYOUT_SAM31 or (layout == LAYOUT_NATIVE and any(key.startswith(_SAM31_NECK_HEADS) for key in keys)):
        return "sam3.1"
    return "sam3"


def probe_checkpoint(source: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> CheckpointProbe:
    """Decide cheaply whether `source` is a SAM 3 checkpoint this package can load, without reading its tensors.

    safetensors: the JSON header; a torch.save zip: its `data.pkl` only, unpickled without importing anything and
    without touching the storages (a 3.4 GB file costs a few range reads). hf:// files are checked for form only:
    they are downloaded where the model is built. Raises CheckpointError with one sentence saying what is wrong.
    """
    source = os.fspath(source)
    if source.startswith("hf://"):
        parts = source.removeprefix("hf://").strip("/").split("/")
        if len(parts) < 2 or not all(parts[:2]):
            raise CheckpointError(f"expected hf://<owner>/<repo>[/<file>], got {source}")
        return CheckpointProbe(source, "hub", "unknown", 0, "unknown")
    try:
        fs, path = fsspec.core.url_to_fs(source, **dict(storage_options or {}))
        if fs.isdir(path):
            raise CheckpointError(f"checkpoint {source} is a directory; name the file (sam3.pt or model.safetensors)")
        with fs.open(path, "rb") as f:
            head = f.read(16)
            f.seek(0)
            if _looks_like_safetensors(head):
                container, keys = "safetensors", _safetensors_keys(f)
            elif head.startswith(b"PK"):
                container, keys = "torch zip", _torch_zip_keys(f)
            elif head[:1] == b"\x80":
                container, keys = "torch legacy", _torch_legacy_keys(f)
            else:
                raise CheckpointError(
                    f"{source} is not a checkpoint: neither a PyTorch file (sam3.pt) nor safetensors "
                    f"(it starts with {head[:12]!r})"
                )
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint not found: {source}") from exc
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"{source} is not a readable PyTorch or safetensors checkpoint: {exc}") from exc
    layout, generation = checkpoint_layout(keys), checkpoint_generation(keys)
    if layout is None or generation is None:
        raise _not_a_sam3_checkpoint(source, keys)
    return CheckpointProbe(source, container, layout, len(keys), generation)


def _safetensors_keys(f: IO[bytes]) -> list[str]:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("the safetensors header is not a JSON object")
    return [key for key in header if key != "__metadata__"]


class _Placeholder:
    """Stands in for every class a checkpoint's pickle names (tensors, storages): nothing is imported or built."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _KeysUnpickler(pickle.Unpickler):
    """Rebuilds the dicts of a state dict and nothing else; storages (the tensor bytes) are never read."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return _Placeholder

    def persistent_load(self, pid: Any) -> Any:
        return None


def _state_keys(obj: Any) -> list[str]:
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"it holds a {type(obj).__name__}, not a dict of tensors")
    return [str(key) for key in obj]


def _torch_zip_keys(f: IO[bytes]) -> list[str]:
    with zipfile.ZipFile(f) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl") and name.count("/") == 1]
        if not pickles:
            raise ValueError("a zip archive without data.pkl is not a torch.save file")
        with archive.open(pickles[0]) as data:
            return _state_keys(_KeysUnpickler(data).load())


def _torch_legacy_keys(f: IO[bytes]) -> list[str]:
    """torch.save's pre-1.6 format: pickles of the magic number, protocol version and system info, then the data."""
    unpickler = _KeysUnpickler(f)
    if unpickler.load() != 0x1950A86A20F9469CFC6C:
        raise ValueError("a pickle that is not a torch.save file")
    unpickler.load()  # protocol version
    unpickler.load()  # system info
    return _state_keys(unpickler.load())


def backbone_state_dict(
    state: Mapping[str, Tensor], scale_factors: tuple[float, ...], source: str = "checkpoint"
) -> dict[str, Tensor]:
    """The backbone's tensors under this package's names, whatever the file's layout."""
    layout = checkpoint_layout(state)
    if layout == LAYOUT_SAM31:
        _refuse_unrecognised_sam31_keys(state, source)
    if layout in (LAYOUT_SAM3, LAYOUT_SAM31):
        return {
            key.removeprefix(OFFICIAL_PREFIX): value
            for key, value in state.items()
            if key.startswith(OFFICIAL_PREFIX) and not key.endswith("freqs_cis")
        }
    if layout == LAYOUT_TRANSFORMERS:
        return _from_transformers(state, scale_factors)
    if layout == LAYOUT_NATIVE:
        return {k: v for k, v in state.items() if k.startswith(NATIVE_PREFIXES) and not k.endswith("freqs_cis")}
    raise _not_a_sam3_checkpoint(source, state)


def _refuse_unrecognised_sam31_keys(state: Mapping[str, Tensor], source: str) -> None:
    """A SAM 3.1 file may hold the backbone, the tracker and the detector's heads; anything else is named."""
    unknown = sorted(k for k in state if not k.startswith((OFFICIAL_PREFIX, *SAM31_IGNORED_PREFIXES)))
    if unknown:
        raise CheckpointError(
            f"{source} (SAM 3.1 layout) holds keys outside the backbone, the tracker and the detector heads "
            f"({len(unknown)}): {_shorten(unknown)}"
        )


def _not_a_sam3_checkpoint(source: str, keys: Iterable[str]) -> CheckpointError:
    sample = ", ".join(sorted(keys)[:5]) or "no entries at all"
    return CheckpointError(
        f"{source} is not a SAM 3 checkpoint: no '{OFFICIAL_PREFIX}*' (sam3.pt) or '{HF_PREFIX}*' "
        f"(transformers) keys; it starts with {sample}"
    )


# transformers name (regex, after the `detector_model.` prefix) -> this package's name (a `Match.expand` template)
_TRUNK = r"vision_encoder\.backbone\."
_TEXT = r"text_encoder\.text_model\."
_HF_RENAMES = [
    (_TRUNK + r"embeddings\.patch_embeddings\.projection\.(\w+)", r"vision_backbone.trunk.patch_embed.proj.\1"),
    (_TRUNK + r"layer_norm\.(\w+)", r"vision_backbone.trunk.ln_pre.\1"),
    (_TRUNK + r"layers\.(\d+)\.layer_norm([12])\.(\w+)", r"vision_backbone.trunk.blocks.\1.norm\2.\3"),
    (_TRUNK + r"layers\.(\d+)\.attention\.o_proj\.(\w+)", r"vision_backbone.trunk.blocks.\1.attn.proj.\2"),
    (_TRUNK + r"layers\.(\d+)\.mlp\.(fc[12])\.(\w+)", r"vision_backbone.trunk.blocks.\1.mlp.\2.\3"),
    (_TEXT + r"embeddings\.token_embedding\.weight", r"language_backbone.encoder.token_embedding.weight"),
    (_TEXT + r"embeddings\.position_embedding\.weight", r"language_backbone.encoder.positional_embedding"),
    (_TEXT + r"final_layer_norm\.(\w+)", r"language_backbone.encoder.ln_final.\1"),
    (
        _TEXT + r"encoder\.layers\.(\d+)\.layer_norm([12])\.(\w+)",
        r"language_backbone.encoder.transformer.resblocks.\1.ln_\2.\3",
    ),
    (
        _TEXT + r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(\w+)",
        r"language_backbone.encoder.transformer.resblocks.\1.attn.out_proj.\2",
    ),
    (
        _TEXT + r"encoder\.layers\.(\d+)\.mlp\.fc1\.(\w+)",
        r"language_backbone.encoder.transformer.resblocks.\1.mlp.c_fc.\2",
    ),
    (
        _TEXT + r"encoder\.layers\.(\d+)\.mlp\.fc2\.(\w+)",
        r"language_backbone.encoder.transformer.resblocks.\1.mlp.c_proj.\2",
    ),
    (r"text_projection\.(\w+)", r"language_backbone.resizer.\1"),
]
# q, k and v are separate tensors in transformers, packed (in that order) here
_HF_SPLIT_QKV = [
    (_TRUNK + r"layers\.(\d+)\.attention\.([qkv])_proj\.(\w+)", r"vision_backbone.trunk.blocks.\1.attn.qkv.\3"),
    (
        _TEXT + r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)",
        r"language_backbone.encoder.transformer.resblocks.\1.attn.in_proj_\3",
    ),
]
# a pyramid level's `scale_layers.<i>` index -> this package's sub-module name, by scale factor
_FPN_LAYER_NAMES = {4.0: {"0": "dconv_2x2_0", "2": "dconv_2x2_1"}, 2.0: {"0": "dconv_2x2"}, 1.0: {}, 0.5: {}}
_FPN = re.compile(r"(vision_encoder\.neck\.|tracker_neck\.)fpn_layers\.(\d+)\.(?:scale_layers\.)?(\w+)\.(\w+)")


def _from_transformers(state: Mapping[str, Tensor], scale_factors: tuple[float, ...]) -> dict[str, Tensor]:
    import torch

    out: dict[str, Tensor] = {}
    packed: dict[str, dict[str, Tensor]] = {}
    for full_key, value in state.items():
        if full_key.startswith(HF_SAM2_NECK_PREFIX):
            key = full_key  # the SAM 2 twin neck lives outside the detector in transformers' video model
        elif full_key.startswith(HF_PREFIX):
            key = full_key.removeprefix(HF_PREFIX)
        else:
            continue
        if key == "vision_encoder.backbone.embeddings.position_embeddings":
            # transformers dropped the unused class-token slot; put an empty one back
            out["vision_backbone.trunk.pos_embed"] = torch.cat([value.new_zeros(1, 1, value.shape[-1]), value], 1)
        elif key == "text_encoder.text_projection.weight":
            out["language_backbone.encoder.text_projection"] = value.t().contiguous()  # Linear weight -> matrix
        elif match := _FPN.fullmatch(key):
            neck = "sam2_convs" if match[1] == HF_SAM2_NECK_PREFIX else "convs"
            level = int(match[2])
            names = {"proj1": "conv_1x1", "proj2": "conv_3x3"}
            if level < len(scale_factors):
                names |= _FPN_LAYER_NAMES[scale_factors[level]]
            # a key outside this layout keeps its name, so the strict load below reports it as unexpected
            layer = names.get(match[3], match[3])
            out[f"vision_backbone.{neck}.{level}.{layer}.{match[4]}"] = value
        elif match := _first_match(_HF_SPLIT_QKV, key):
            pattern, template = match
            packed.setdefault(pattern.expand(template), {})[pattern[2]] = value
        elif match := _first_match(_HF_RENAMES, key):
            pattern, template = match
            out[pattern.expand(template)] = value
    for name, parts in packed.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{name}: the checkpoint holds only the {sorted(parts)} projections of q, k, v")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _first_match(rules: list[tuple[str, str]], key: str) -> tuple[re.Match[str], str] | None:
    for pattern, template in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return match, template
    return None


def load_backbone_weights(
    model: nn.Module, weights: Mapping[str, Tensor], source: str = "checkpoint", defer: Collection[str] = ()
) -> None:
    """Copy `weights` (this package's names) into `model`; any missing, unexpected or misshapen key is an error.
    The weights of the submodules named in `defer` are checked like the others but not copied (`sam3core.deferred`).

    SAM 2 neck weights in the file are skipped when a SAM 3 model was built without that neck. The unused
    `text_projection` may be absent (it is then zero) and may have any output width (the model adopts the file's).
    """
    neck = model.vision_backbone
    if hasattr(neck, "sam2_convs") and neck.sam2_convs is None:
        weights = {k: v for k, v in weights.items() if not k.startswith("vision_backbone.sam2_convs.")}
    weights = with_text_projection(model, weights)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing backbone keys ({len(missing)}): {_shorten(missing)}")
    if unexpected:
        problems.append(f"unexpected backbone keys ({len(unexpected)}): {_shorten(unexpected)}")
    misshapen = [
        f"{k} is {list(weights[k].shape)} in the file but {list(expected[k].shape)} in the model"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    if misshapen:
        problems.append(f"shape mismatches ({len(misshapen)}): {_shorten(misshapen)}")
    if problems:
        hint = "" if not misshapen else " (is the model config right for this checkpoint?)"
        raise CheckpointError(f"{source} does not fit the backbone{hint}: " + "; ".join(problems))
    deferred = tuple(name + "." for name in defer)  # () matches no key
    kept = {k: v.to(expected[k].dtype) for k, v in weights.items() if not k.startswith(deferred)}
    result = model.load_state_dict(kept, strict=not deferred, assign=True)
    assert all(k.startswith(deferred) for k in result.missing_keys) and not result.unexpected_keys


def with_text_projection(model: nn.Module, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`text_projection` [width, P] is kept for fidelity to the file but read by no forward: a file without it gets
    zeros, and a file whose P differs from the configuration's replaces the parameter with its own shape."""
    import torch
    from torch import nn

    weights = dict(weights)
    encoder = model.language_backbone.encoder
    current = encoder.text_projection
    stored = weights.get(TEXT_PROJECTION)
    if stored is None:
        weights[TEXT_PROJECTION] = torch.zeros(current.shape, dtype=current.dtype)
    elif stored.ndim == 2 and stored.shape[0] == current.shape[0] and stored.shape != current.shape:
        encoder.text_projection = nn.Parameter(torch.empty(stored.shape, dtype=current.dtype, device=current.device))
    return weights


def _shorten(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … and {len(names) - limit} more" if len(names) > limit else "")
