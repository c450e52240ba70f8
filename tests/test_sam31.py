"""SAM 3.1 in sam3core: the three-headed neck, its checkpoint layouts and the dictionary `forward_image` returns.

The reference for every neck output is computed here with plain `torch.nn.functional` ops straight from the
checkpoint's tensors, by their file names (`detector.backbone.vision_backbone.<head>.<level>.<module>`), not through
sam3core's modules: a loader that gave one head another head's weights fails it (`test_swapped_heads_fail...`).
The trunk and the text tower are SAM 3's, checked against the SAM 3 path (itself held to Meta's recorded outputs by
tests/test_parity.py) on the same tensors. Float32 agreement: 1e-5 relative (measured: bit-identical, 0 difference).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sam3core import CheckpointError, SAM3VLBackboneTri, build_sam3_vl_backbone
from sam3core.build import _resolve_config
from sam3core.checkpoint import probe_checkpoint
from sam3core.compile import compiled_modules
from tests.hf_layout import official_to_hf
from tests.sam31_checkpoint import BACKBONE, backbone_spec, fp16_safetensors_state, sam31_state, write_sam31
from tools.parity_weights import deterministic_state_dict, parity_images

IMGSZ = 56
HEADS = ("convs", "interactive_convs", "propagation_convs")
OUTPUT_OF_HEAD = {"convs": None, "interactive_convs": "interactive", "propagation_convs": "sam2_backbone_out"}
RTOL = 1e-5


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return sam31_state("tiny-sam3.1")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return parity_images("tiny", IMGSZ).float()


def _level_reference(x: torch.Tensor, weights: dict[str, torch.Tensor], head: str, level: int) -> torch.Tensor:
    """One level of one head, from the file's tensors: ViTDet's simple FPN written out with functional ops."""

    def w(module: str, kind: str) -> torch.Tensor:
        return weights[f"{BACKBONE}vision_backbone.{head}.{level}.{module}.{kind}"].float()

    if level == 0:  # 4x: two stride-2 transposed convolutions with a GELU between
        x = F.conv_transpose2d(x, w("dconv_2x2_0", "weight"), w("dconv_2x2_0", "bias"), stride=2)
        x = F.conv_transpose2d(F.gelu(x), w("dconv_2x2_1", "weight"), w("dconv_2x2_1", "bias"), stride=2)
    elif level == 1:  # 2x
        x = F.conv_transpose2d(x, w("dconv_2x2", "weight"), w("dconv_2x2", "bias"), stride=2)
    x = F.conv2d(x, w("conv_1x1", "weight"), w("conv_1x1", "bias"))
    return F.conv2d(x, w("conv_3x3", "weight"), w("conv_3x3", "bias"), padding=1)


def _head_of(out: dict, head: str) -> dict:
    """The detector head's four keys sit at the top level of `forward_image`'s dictionary, the others under a key."""
    key = OUTPUT_OF_HEAD[head]
    if key is None:
        return {k: out[k] for k in ("vision_features", "vision_mask", "vision_pos_enc", "backbone_fpn")}
    return out[key]


def _assert_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, name
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().mean()), msg=name)


def test_sam31_keys_and_counts_are_those_of_the_released_file() -> None:
    """The full `sam3.1` configuration's backbone keys: 420 trunk tensors with the RoPE tables (as the file persists
    them), 18 a head for three heads named as Meta names them, SAM 3's text tower."""
    spec = backbone_spec("sam3.1")
    trunk = [k for k in spec if k.startswith(BACKBONE + "vision_backbone.trunk.")]
    assert len(trunk) == 420
    for head in HEADS:
        names = sorted(k.removeprefix(f"{BACKBONE}vision_backbone.{head}.") for k in spec if f".{head}." in k)
        assert len(names) == 18, head
        assert names[:4] == ["0.conv_1x1.bias", "0.conv_1x1.weight", "0.conv_3x3.bias", "0.conv_3x3.weight"]
        assert "0.dconv_2x2_0.weight" in names and "0.dconv_2x2_1.weight" in names and "1.dconv_2x2.weight" in names
        assert not any(n.startswith("3.") for n in names)  # three levels: no 0.5x
    assert spec[f"{BACKBONE}vision_backbone.convs.0.dconv_2x2_0.weight"][0] == (1024, 512, 2, 2)
    assert spec[f"{BACKBONE}vision_backbone.propagation_convs.2.conv_1x1.weight"][0] == (256, 1024, 1, 1)
    assert not any(".sam2_convs." in k for k in spec)


@pytest.mark.parametrize("file_name", ["sam3.1_multiplex.pt", "sam3.1_multiplex_fp16.safetensors"])
def test_every_head_matches_an_independent_functional_computation(
    tmp_path: Path, state: dict[str, torch.Tensor], images: torch.Tensor, file_name: str
) -> None:
    path = write_sam31(tmp_path / file_name, state)
    file_tensors = fp16_safetensors_state(state) if file_name.endswith(".safetensors") else state
    model = build_sam3_vl_backbone(path, config="tiny-sam3.1", imgsz=IMGSZ)
    assert isinstance(model, SAM3VLBackboneTri) and model.config.generation == "sam3.1"
    with torch.inference_mode():
        out = model.forward_image(images)
        trunk = model.forward_trunk(images)
    assert set(out) == {
        "vision_features",
        "vision_mask",
        "vision_pos_enc",
        "backbone_fpn",
        "interactive",
        "sam2_backbone_out",
    }
    grid = IMGSZ // 14
    for head in HEADS:
        part = _head_of(out, head)
        assert set(part) == {"vision_features", "vision_mask", "vision_pos_enc", "backbone_fpn"}, head
        assert part["vision_mask"] is None and part["vision_features"] is part["backbone_fpn"][-1]
        assert [tuple(f.shape) for f in part["backbone_fpn"]] == [(2, 32, grid * s, grid * s) for s in (4, 2, 1)]
        for level in range(3):
            want = _level_reference(trunk, file_tensors, head, level)
            _assert_close(part["backbone_fpn"][level], want, f"{head}[{level}]")
    # the three heads really differ (distinct weights), so the comparisons above tell them apart
    assert not torch.allclose(out["backbone_fpn"][0], out["interactive"]["backbone_fpn"][0], atol=1e-3)
    assert not torch.allclose(out["interactive"]["backbone_fpn"][2], out["sam2_backbone_out"]["backbone_fpn"][2])


def test_trunk_text_and_position_encodings_are_sam3s(
    tmp_path: Path, state: dict[str, torch.Tensor], images: torch.Tensor
) -> None:
    """Trunk and text tensors of the 3.1 file, written as a SAM 3 file (plus SAM 3's own `convs.3`), give the SAM 3
    path's outputs; the position encodings of each level are SAM 3's for the same shapes."""
    tri = build_sam3_vl_backbone(write_sam31(tmp_path / "sam3.1.pt", state), config="tiny-sam3.1", imgsz=IMGSZ)
    sam3_spec = backbone_spec("tiny")
    shared = {k: v for k, v in state.items() if k.startswith(BACKBONE) and "_convs." not in k and k in sam3_spec}
    sam3_state = {**deterministic_state_dict(sam3_spec), **shared}
    torch.save(sam3_state, tmp_path / "sam3.pt")
    dual = build_sam3_vl_backbone(tmp_path / "sam3.pt", config="tiny", imgsz=IMGSZ)
    with torch.inference_mode():
        assert torch.equal(tri.forward_trunk(images), dual.forward_trunk(images))
        text_tri, text_dual = tri.forward_text(["a red car", "two dogs"]), dual.forward_text(["a red car", "two dogs"])
        out_tri, out_dual = tri.forward_image(images), dual.forward_image(images)
    assert text_tri.keys() == text_dual.keys()
    for key in text_tri:
        assert torch.equal(text_tri[key], text_dual[key]), key
    for head in HEADS:
        for got, want in zip(_head_of(out_tri, head)["vision_pos_enc"], out_dual["vision_pos_enc"], strict=True):
            assert torch.equal(got, want), head
    # SAM 3's detector levels equal 3.1's `convs` here: the same file tensors under the same names
    for got, want in zip(out_tri["backbone_fpn"], out_dual["backbone_fpn"], strict=True):
        assert torch.equal(got, want)


def test_swapped_heads_fail_the_reference(tmp_path: Path, state: dict[str, torch.Tensor], images: torch.Tensor) -> None:
    """A loader that mapped `interactive_convs` onto `propagation_convs` (and back) would fail the parity test."""
    swapped = {}
    for key, value in state.items():
        if ".interactive_convs." in key:
            key = key.replace(".interactive_convs.", ".propagation_convs.")
        elif ".propagation_convs." in key:
            key = key.replace(".propagation_convs.", ".interactive_convs.")
        swapped[key] = value
    model = build_sam3_vl_backbone(write_sam31(tmp_path / "swapped.pt", swapped), config="tiny-sam3.1", imgsz=IMGSZ)
    with torch.inference_mode():
        out, trunk = model.forward_image(images), model.forward_trunk(images)
    for head in ("interactive_convs", "propagation_convs"):
        want = _level_reference(trunk, state, head, 0)
        with pytest.raises(AssertionError):
            _assert_close(_head_of(out, head)["backbone_fpn"][0], want, head)


def test_need_switches_run_and_return_only_the_heads_asked_for(
    tmp_path: Path, state: dict[str, torch.Tensor], images: torch.Tensor
) -> None:
    model = build_sam3_vl_backbone(write_sam31(tmp_path / "m.pt", state), config="tiny-sam3.1", imgsz=IMGSZ)
    calls = dict.fromkeys(HEADS, 0)
    for head in HEADS:
        for level in getattr(model.vision_backbone, head):
            level.register_forward_hook(lambda *_, head=head: calls.__setitem__(head, calls[head] + 1))
    with torch.inference_mode():
        full = model.forward_image(images)
        calls.update(dict.fromkeys(HEADS, 0))
        detector = model.forward_image(images, need_interactive_out=False, need_propagation_out=False)
        assert calls == {"convs": 3, "interactive_convs": 0, "propagation_convs": 0}
        assert set(detector) == {"vision_features", "vision_mask", "vision_pos_enc", "backbone_fpn"}
        calls.update(dict.fromkeys(HEADS, 0))
        interactive = model.forward_image(images, need_sam3_out=False, need_propagation_out=False)
        assert calls == {"convs": 0, "interactive_convs": 3, "propagation_convs": 0}
        assert set(interactive) == {"interactive"}
        propagation = model.forward_image_sam2(images)
        vision = model.forward_vision_features(images)
    for got, want in zip(detector["backbone_fpn"], full["backbone_fpn"], strict=True):
        assert torch.equal(got, want)
    assert torch.equal(interactive["interactive"]["backbone_fpn"][0], full["interactive"]["backbone_fpn"][0])
    assert torch.equal(propagation["backbone_fpn"][1], full["sam2_backbone_out"]["backbone_fpn"][1])
    assert torch.equal(vision, full["vision_features"])
    # compilation covers every head's levels
    assert len(compiled_modules(model.vision_backbone)) == 1 + 3 * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_neck_from_a_trunk_map_equals_forward_image_exactly(
    tmp_path: Path, state: dict[str, torch.Tensor], images: torch.Tensor, dtype: torch.dtype
) -> None:
    model = build_sam3_vl_backbone(write_sam31(tmp_path / "m.pt", state), config="tiny-sam3.1", imgsz=IMGSZ)
    with torch.inference_mode():
        direct = model.forward_image(images)
        trunk = model.forward_trunk(images)
        rebuilt = model.forward_image_from_trunk(trunk.to(dtype))
    if dtype == torch.float32:
        for head in HEADS:
            for key in ("backbone_fpn", "vision_pos_enc"):
                for got, want in zip(_head_of(rebuilt, head)[key], _head_of(direct, head)[key], strict=True):
                    assert torch.equal(got, want), (head, key)
    else:  # a float16 cache feeds the float32 neck: cast on the way in
        assert rebuilt["interactive"]["backbone_fpn"][0].dtype == torch.float32


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("drop propagation_convs", "vision_backbone.propagation_convs.0.conv_1x1.bias"),
        ("rename interactive_convs to sam2_convs", "vision_backbone.sam2_convs.0.conv_1x1.bias"),
        ("drop one tensor", "vision_backbone.interactive_convs.1.dconv_2x2.weight"),
        ("add an unknown neck level", "vision_backbone.convs.3.conv_1x1.weight"),
        ("add an unknown detector module", "detector.new_head.weight"),
    ],
)
def test_a_missing_renamed_or_unknown_key_is_refused_naming_it(
    tmp_path: Path, state: dict[str, torch.Tensor], edit: str, named: str
) -> None:
    edited = dict(state)
    if edit == "drop propagation_convs":
        edited = {k: v for k, v in edited.items() if ".propagation_convs." not in k}
    elif edit == "rename interactive_convs to sam2_convs":
        edited = {k.replace(".interactive_convs.", ".sam2_convs."): v for k, v in edited.items()}
    elif edit == "drop one tensor":
        del edited[f"{BACKBONE}vision_backbone.interactive_convs.1.dconv_2x2.weight"]
    elif edit == "add an unknown neck level":
        edited[f"{BACKBONE}vision_backbone.convs.3.conv_1x1.weight"] = torch.zeros(32, 64, 1, 1)
    else:
        edited["detector.new_head.weight"] = torch.zeros(4)
    path = write_sam31(tmp_path / "edited.pt", edited)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        build_sam3_vl_backbone(path, config="tiny-sam3.1", imgsz=IMGSZ)


def test_a_checkpoint_of_the_other_generation_is_refused_with_the_config_to_use(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    path = write_sam31(tmp_path / "sam3.1_multiplex.pt", state)
    with pytest.raises(CheckpointError, match=r"SAM 3\.1 checkpoint \(sam3\.1_multiplex\.pt layout\).*'tiny' is SAM 3"):
        build_sam3_vl_backbone(path, config="tiny", imgsz=IMGSZ)
    torch.save({k: v for k, v in deterministic_state_dict(backbone_spec("tiny")).items()}, tmp_path / "sam3.pt")
    with pytest.raises(CheckpointError, match=r"SAM 3 checkpoint \(sam3\.pt layout\).*'tiny-sam3\.1' is SAM 3\.1"):
        build_sam3_vl_backbone(tmp_path / "sam3.pt", config="tiny-sam3.1", imgsz=IMGSZ)
    # auto: the official configuration of the file's generation
    assert _resolve_config("auto", state, "x").name == "sam3.1"
    assert _resolve_config("auto", deterministic_state_dict(backbone_spec("tiny")), "x").name == "sam3"
    assert _resolve_config("auto", None, "x").name == "sam3"


def test_probe_tells_the_layouts_apart_from_the_header_or_pickle(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    sam3 = deterministic_state_dict(backbone_spec("tiny"))
    files = {
        "sam3.pt": (sam3, ("torch zip", "sam3.pt", "sam3")),
        "sam3.1_multiplex.pt": (state, ("torch zip", "sam3.1_multiplex.pt", "sam3.1")),
        "sam3.1_fp16.safetensors": (state, ("safetensors", "sam3.1_multiplex.pt", "sam3.1")),
        "model.safetensors": (official_to_hf(sam3), ("safetensors", "transformers", "sam3")),
        "native31.pt": ({k.removeprefix(BACKBONE): v for k, v in state.items() if k.startswith(BACKBONE)}, None),
    }
    for name, (tensors, expected) in files.items():
        path = tmp_path / name
        if name == "model.safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        elif name.endswith(".safetensors") or name == "sam3.1_multiplex.pt":
            write_sam31(path, tensors)
        else:
            torch.save(tensors, path)
        probe = probe_checkpoint(path)
        got = (probe.format, probe.layout, probe.generation)
        assert got == (expected or ("torch zip", "sam3core", "sam3.1")), name
    fp16 = probe_checkpoint(tmp_path / "sam3.1_fp16.safetensors")
    assert fp16.entries == len(fp16_safetensors_state(state))


def test_the_fp16_file_without_text_projection_loads_and_encodes_text_as_the_full_file(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    half = state_as_float16_values(state)
    full = build_sam3_vl_backbone(write_sam31(tmp_path / "full.pt", half), config="tiny-sam3.1", imgsz=IMGSZ)
    light = build_sam3_vl_backbone(write_sam31(tmp_path / "light.safetensors", half), config="tiny-sam3.1", imgsz=IMGSZ)
    assert not light.language_backbone.encoder.text_projection.any()  # absent from the file: zeros, never read
    with torch.inference_mode():
        a, b = full.forward_text(["a red car"]), light.forward_text(["a red car"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def state_as_float16_values(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same state with every real tensor rounded through float16, so both files hold identical values."""
    return {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}


def test_text_projection_may_have_another_width_but_not_another_input_width(
    tmp_path: Path, state: dict[str, torch.Tensor]
) -> None:
    """The one tolerance in the key accounting: `text_projection` is read by no forward, and third-party notes on
    the 3.1 file disagree on its width, so the model adopts the file's [width, P]; a wrong first dimension is an
    error."""
    key = f"{BACKBONE}language_backbone.encoder.text_projection"
    wider = {**state, key: torch.arange(64 * 48, dtype=torch.float32).reshape(64, 48)}
    model = build_sam3_vl_backbone(write_sam31(tmp_path / "wide.pt", wider), config="tiny-sam3.1", imgsz=IMGSZ)
    assert torch.equal(model.language_backbone.encoder.text_projection, wider[key])
    wrong = {**state, key: torch.zeros(32, 32)}
    with pytest.raises(CheckpointError, match=r"text_projection is \[32, 32\] in the file but \[64, 32\]"):
        build_sam3_vl_backbone(write_sam31(tmp_path / "wrong.pt", wrong), config="tiny-sam3.1", imgsz=IMGSZ)


def test_hf_sam31_repo_defaults_to_its_multiplex_file(
    tmp_path: Path, state: dict[str, torch.Tensor], images: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hf://facebook/sam3.1` resolves `sam3.1_multiplex.pt` (offline, from a hub cache laid out as the hub does)."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--facebook--sam3.1"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    write_sam31(snapshot / "sam3.1_multiplex.pt", state)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = build_sam3_vl_backbone("hf://facebook/sam3.1", config="tiny-sam3.1", imgsz=IMGSZ)
    local = build_sam3_vl_backbone(snapshot / "sam3.1_multiplex.pt", config="tiny-sam3.1", imgsz=IMGSZ)
    with torch.inference_mode():
        assert torch.equal(
            model.forward_image(images)["sam2_backbone_out"]["backbone_fpn"][0],
            local.forward_image(images)["sam2_backbone_out"]["backbone_fpn"][0],
        )
