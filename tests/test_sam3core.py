"""Behaviour of sam3core beyond numerical parity: shapes and conventions, sizes, dtypes, loading and its errors."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sam3core import (
    CheckpointError,
    Sam3Tokenizer,
    VocabularyError,
    build_sam3_vl_backbone,
    normalize_images,
    preprocess_images,
    resize_image,
)
from sam3core.resize import TORCH_AFTER_SECONDS, resize_with_numpy, resize_with_torch
from sam3core.rope import AxialRoPE

REPO = Path(__file__).resolve().parents[1]

IMGSZ = 224
CAPTIONS = ["a red square on a white background", "", "two dogs"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ, add_sam2_neck=True)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, IMGSZ, IMGSZ, generator=generator) * 2 - 1


def _official_prefixed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"detector.backbone.{k}": v.clone() for k, v in model.state_dict().items()}


def test_forward_returns_the_official_keys_shapes_and_conventions(tiny, images):
    d, grid = tiny.config.d_model, IMGSZ // 14
    with torch.no_grad():
        out = tiny(images, CAPTIONS, additional_text=["extra words"])
    # scalp=1 drops the 0.5x level: three levels remain, the last (1x) is vision_features
    assert [list(t.shape) for t in out["backbone_fpn"]] == [
        [2, d, 4 * grid, 4 * grid],
        [2, d, 2 * grid, 2 * grid],
        [2, d, grid, grid],
    ]
    assert out["vision_features"] is out["backbone_fpn"][-1]
    assert [t.shape for t in out["vision_pos_enc"]] == [t.shape for t in out["backbone_fpn"]]
    sam2 = out["sam2_backbone_out"]
    assert [t.shape for t in sam2["backbone_fpn"]] == [t.shape for t in out["backbone_fpn"]]
    assert not torch.equal(sam2["vision_features"], out["vision_features"])  # separate weights
    length, width = tiny.config.text.context_length, tiny.config.text.width
    assert out["language_features"].shape == (length, 3, d)  # sequence first
    assert out["language_embeds"].shape == (length, 3, width)
    assert out["language_mask"].shape == (3, length) and out["language_mask"].dtype == torch.bool
    # padding mask is True where padded: the empty caption holds only start and end tokens
    assert out["language_mask"][1].tolist() == [False, False] + [True] * (length - 2)
    assert out["additional_text_features"].shape == (length, 1, d)
    assert out["additional_text_mask"].shape == (1, length)


def test_text_is_encoded_the_same_alone_or_with_additional_text(tiny):
    with torch.no_grad():
        alone = tiny.forward_text(CAPTIONS)
        joint = tiny.forward_text(CAPTIONS, additional_text=["extra words"])
        extra = tiny.forward_text(["extra words"])
        ids = tiny.forward_text(tiny.tokenizer(CAPTIONS))
    torch.testing.assert_close(alone["language_features"], joint["language_features"])
    torch.testing.assert_close(extra["language_features"], joint["additional_text_features"])
    torch.testing.assert_close(alone["language_features"], ids["language_features"])


def test_forward_image_sam2_matches_the_dual_forward(tiny, images):
    with torch.no_grad():
        both = tiny.forward_image(images)["sam2_backbone_out"]
        only = tiny.forward_image_sam2(images)
    for a, b in zip(both["backbone_fpn"], only["backbone_fpn"], strict=True):
        torch.testing.assert_close(a, b)


def test_scalp_zero_keeps_every_level(images):
    torch.manual_seed(0)
    model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ)
    model.scalp = 0
    with torch.no_grad():
        out = model.forward_image(images)
    grid = IMGSZ // 14
    assert [t.shape[-1] for t in out["backbone_fpn"]] == [4 * grid, 2 * grid, grid, grid // 2]
    assert out["sam2_backbone_out"] is None
    with pytest.raises(RuntimeError, match="add_sam2_neck"):
        model.forward_image_sam2(images)


def test_wrong_image_size_is_a_clear_error(tiny):
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, 224, 224\].*set_imgsz"):
        tiny.forward_image(torch.zeros(1, 3, 112, 112))


@pytest.mark.parametrize("size", [100, 0, -14])
def test_set_imgsz_rejects_sizes_that_are_not_multiples_of_14(size):
    model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model.set_imgsz([size, size])
    with pytest.raises(ValueError, match="square"):
        model.set_imgsz([224, 252])


def test_set_imgsz_runs_at_any_multiple_of_14_and_rescales_global_rope():
    torch.manual_seed(0)
    model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ)
    for size in (70, 154, 336):  # grids 5, 11 (window padding) and 24
        model.set_imgsz([size, size])
        with torch.no_grad():
            out = model.forward_image(torch.zeros(1, 3, size, size))
        assert out["vision_features"].shape[-1] == size // 14
        global_rope = model.vision_backbone.trunk.blocks[1].attn.rope
        assert global_rope.cos.shape[0] == (size // 14) ** 2
        assert global_rope.position_scale == pytest.approx(8 / (size // 14))


def test_rope_tables_stay_float32_and_out_of_the_state_dict_after_casting(tiny):
    model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ, dtype=torch.bfloat16)
    ropes = [m for m in model.modules() if isinstance(m, AxialRoPE)]
    assert ropes and all(r.cos.dtype == torch.float32 and r.sin.dtype == torch.float32 for r in ropes)
    assert not any(t.is_complex() for t in model.state_dict().values())
    assert not any("rope" in key or "freqs_cis" in key for key in model.state_dict())
    reference = AxialRoPE(16, 16, 10000.0, 0.5)
    torch.testing.assert_close(model.vision_backbone.trunk.blocks[1].attn.rope.cos, reference.cos)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu_agrees_with_float32(tiny, images, dtype):
    """Cosine similarity of every output against float32, on the tiny config (random weights).

    Measured on this project's CPU: bf16 >= 0.9999 for the vision outputs, fp16 higher still; the bound leaves
    room for other CPUs' kernels. docs/benchmarks.md records the figure for the full "sam3" configuration.
    """
    low_model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ, add_sam2_neck=True)
    low_model.load_state_dict(tiny.state_dict())
    low_model.to(dtype)
    with torch.no_grad():
        ref = tiny(images, CAPTIONS)
        low = low_model(images, CAPTIONS)  # float32 input is cast to the model's dtype
    assert low["vision_features"].dtype == dtype
    for key in ("vision_features", "language_features", "language_embeds"):
        cosine = F.cosine_similarity(ref[key].flatten().double(), low[key].float().flatten().double(), dim=0)
        assert cosine > 0.999, (key, cosine.item())
    for level_ref, level_low in zip(ref["backbone_fpn"], low["backbone_fpn"], strict=True):
        assert F.cosine_similarity(level_ref.flatten(), level_low.float().flatten(), dim=0) > 0.999
    assert torch.equal(ref["language_mask"], low["language_mask"])


def test_random_weights_are_deterministic_under_a_seed(images):
    torch.manual_seed(3)
    a = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ)
    torch.manual_seed(3)
    b = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_random_weight_is_drawn_none_left_as_allocated(dtype):
    """The model is assembled on the meta device and its memory allocated empty: a parameter the random
    initialisation missed would hold whatever the allocator left there."""
    torch.manual_seed(0)
    model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ, dtype=dtype)
    for name, param in model.named_parameters():
        assert param.dtype == dtype and param.device.type == "cpu", name
        values = param.detach().float()
        if name.endswith("bias"):
            assert torch.count_nonzero(values) == 0, name
        elif isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.LayerNorm):
            assert torch.all(values == 1), name
        elif values.numel() >= 1000:
            assert 0.018 < values.std().item() < 0.022 and values.abs().max().item() < 0.2, name
        else:
            assert torch.all(torch.isfinite(values)) and values.abs().max().item() < 0.2, name


@pytest.mark.parametrize("weights", ["random", "file", "state-dict"])
@pytest.mark.parametrize("parts", [("trunk",), ("text",), ("trunk", "text")])
def test_deferred_parts_are_made_on_their_first_call_with_the_values_of_a_whole_build(
    tmp_path, tiny, images, weights, parts
):
    """An actor that runs the trunk from a package builds the model without the blocks' weights, one whose input
    has no caption without the text encoder; a first call into either (a failing library, a caption after all)
    makes it, from the same seed or the checkpoint again."""
    checkpoint = {"random": None, "file": tmp_path / "sam3.pt", "state-dict": _official_prefixed(tiny)}[weights]
    if weights == "file":
        torch.save(_official_prefixed(tiny), checkpoint)

    def build(defer: tuple[str, ...]) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_sam3_vl_backbone(
            checkpoint, config="tiny", imgsz=IMGSZ, add_sam2_neck=True, dtype="bfloat16", defer=defer
        )

    whole, deferred = build(()), build(parts)
    prefixes = tuple({"trunk": "vision_backbone.trunk.blocks.", "text": "language_backbone."}[p] for p in parts)
    assert deferred.pending_weights() == list(parts)
    waiting = [p for n, p in deferred.named_parameters() if n.startswith(prefixes)]
    assert waiting and all(p.is_meta and p.dtype == torch.bfloat16 for p in waiting)
    made = [p for n, p in deferred.named_parameters() if not n.startswith(prefixes)]
    assert made and not any(p.is_meta for p in made)
    with torch.inference_mode():
        out = deferred.forward_vision_features(images.bfloat16())
        expected = whole.forward_vision_features(images.bfloat16())
        assert deferred.pending_weights() == (["text"] if "text" in parts else [])  # only what was called
        text = deferred.forward_text(CAPTIONS)["language_features"]
        expected_text = whole.forward_text(CAPTIONS)["language_features"]
    assert deferred.pending_weights() == []
    assert torch.equal(out, expected) and torch.equal(text, expected_text)
    for (name, a), b in zip(whole.state_dict().items(), deferred.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_deferred_text_encoder_from_a_checkpoint_without_text_projection_gets_zeros_as_a_whole_build(tmp_path, tiny):
    state = _official_prefixed(tiny)
    del state["detector.backbone.language_backbone.encoder.text_projection"]  # unused by any forward: may be absent
    path = tmp_path / "sam3.pt"
    torch.save(state, path)
    whole = build_sam3_vl_backbone(path, config="tiny", imgsz=IMGSZ, add_sam2_neck=True)
    deferred = build_sam3_vl_backbone(path, config="tiny", imgsz=IMGSZ, add_sam2_neck=True, defer=("text",))
    with torch.inference_mode():
        text = deferred.forward_text(CAPTIONS)["language_features"]
        assert torch.equal(text, whole.forward_text(CAPTIONS)["language_features"])
    projection = deferred.language_backbone.encoder.text_projection
    assert deferred.pending_weights() == [] and torch.count_nonzero(projection) == 0


@pytest.mark.parametrize(
    ("key", "part"),
    [("vision_backbone.trunk.blocks.1.mlp.fc2.weight", "trunk"), ("language_backbone.resizer.bias", "text")],
)
def test_a_checkpoint_missing_a_deferred_weight_is_refused_when_the_model_is_built(tiny, key, part):
    state = _official_prefixed(tiny)
    del state["detector.backbone." + key]
    with pytest.raises(CheckpointError, match=rf"missing backbone keys \(1\): {re.escape(key)}"):
        build_sam3_vl_backbone(state, config="tiny", imgsz=IMGSZ, add_sam2_neck=True, defer=(part,))


def test_only_the_trunk_and_the_text_encoder_can_wait() -> None:
    with pytest.raises(ValueError, match=r"\['neck'\] cannot wait"):
        build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ, defer=("neck",))


@pytest.mark.parametrize("wrapped", [False, True])
def test_official_layout_round_trip_ignores_heads_and_rope_tables(tmp_path, tiny, images, wrapped):
    state = _official_prefixed(tiny)
    state["detector.transformer.encoder.layers.0.linear1.weight"] = torch.ones(3, 3)
    state["tracker.maskmem_backbone.weight"] = torch.ones(2)
    state["detector.backbone.vision_backbone.trunk.blocks.1.attn.freqs_cis"] = torch.zeros(5, 8, dtype=torch.complex64)
    path = tmp_path / "sam3.pt"
    torch.save({"model": state} if wrapped else state, path)
    loaded = build_sam3_vl_backbone(path, config="tiny", imgsz=IMGSZ, add_sam2_neck=True)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(images, CAPTIONS)["vision_features"], tiny(images, CAPTIONS)["vision_features"]
        )


def test_checkpoint_through_an_fsspec_uri(tmp_path, tiny):
    path = tmp_path / "weights.pt"
    torch.save(_official_prefixed(tiny), path)
    loaded = build_sam3_vl_backbone(f"file://{path}", config="tiny", imgsz=IMGSZ, add_sam2_neck=True)
    assert torch.equal(
        loaded.state_dict()["vision_backbone.convs.0.conv_3x3.weight"],
        tiny.state_dict()["vision_backbone.convs.0.conv_3x3.weight"],
    )


@pytest.mark.timeout(120)
def test_checkpoint_from_s3(s3_server, s3_bucket, tiny):
    import fsspec

    options = {"client_kwargs": {"endpoint_url": s3_server}}
    with fsspec.open(f"s3://{s3_bucket}/models/sam3.pt", "wb", **options) as f:
        torch.save(_official_prefixed(tiny), f)
    loaded = build_sam3_vl_backbone(
        f"s3://{s3_bucket}/models/sam3.pt", config="tiny", imgsz=IMGSZ, add_sam2_neck=True, storage_options=options
    )
    assert torch.equal(
        loaded.state_dict()["vision_backbone.trunk.pos_embed"], tiny.state_dict()["vision_backbone.trunk.pos_embed"]
    )


def test_sam2_weights_in_the_file_are_skipped_without_the_sam2_neck(tmp_path, tiny):
    path = tmp_path / "sam3.pt"
    torch.save(_official_prefixed(tiny), path)
    model = build_sam3_vl_backbone(path, config="tiny", imgsz=IMGSZ)
    assert model.vision_backbone.sam2_convs is None


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "sam3.pt"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive" + bytes(range(256)))
    with pytest.raises(CheckpointError, match="not a readable PyTorch or safetensors checkpoint"):
        build_sam3_vl_backbone(path, config="tiny")
    truncated = tmp_path / "truncated.pt"
    torch.save({"detector.backbone.x": torch.ones(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="not a readable"):
        build_sam3_vl_backbone(truncated, config="tiny")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        build_sam3_vl_backbone(tmp_path / "nope.pt", config="tiny")


def test_foreign_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.ones(2), "fc.bias": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"not a SAM 3 checkpoint.*conv1\.weight"):
        build_sam3_vl_backbone(path, config="tiny")


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny):
    state = _official_prefixed(tiny)
    del state["detector.backbone.language_backbone.resizer.bias"]
    state["detector.backbone.vision_backbone.trunk.blocks.0.attn.extra"] = torch.ones(1)
    path = tmp_path / "sam3.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        build_sam3_vl_backbone(path, config="tiny", imgsz=IMGSZ, add_sam2_neck=True)
    assert "missing backbone keys (1): language_backbone.resizer.bias" in str(error.value)
    assert "unexpected backbone keys (1): vision_backbone.trunk.blocks.0.attn.extra" in str(error.value)


def test_checkpoint_for_another_config_names_the_shape_mismatch(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    torch.save(_official_prefixed(tiny), path)
    # the official config is built on the meta device, so this costs no memory
    with pytest.raises(
        CheckpointError,
        match=r"is the model config right.*ln_final\.bias is \[64\] in the file but \[1024\] in the model",
    ):
        build_sam3_vl_backbone(path, config="sam3")


def test_missing_or_corrupt_vocabulary_is_a_clear_error(tmp_path):
    with pytest.raises(VocabularyError, match="cannot read the BPE vocabulary"):
        build_sam3_vl_backbone(config="tiny", bpe_path=tmp_path / "missing.txt.gz")
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(VocabularyError, match="not a gzipped CLIP BPE merge list"):
        Sam3Tokenizer(bad)
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version\na b\n"))
    with pytest.raises(VocabularyError, match="merges"):
        Sam3Tokenizer(short)


def test_tokenizer_sequence_rules():
    tokenizer = Sam3Tokenizer()
    ids = tokenizer(["", "word " * 100], context_length=32)
    assert ids[0, :3].tolist() == [tokenizer.sot_token_id, tokenizer.eot_token_id, 0]
    assert ids[1, 0] == tokenizer.sot_token_id and ids[1, -1] == tokenizer.eot_token_id and (ids[1] != 0).all()
    assert tokenizer.decode(tokenizer("A  Cat &amp;amp; a DOG")[0].tolist()) == "a cat & a dog"
    # the torch-free form a decoding worker uses gives the same ids
    texts = ["a photo of a cat", "", "word " * 100]
    assert np.array_equal(tokenizer.encode_batch(texts, context_length=32), tokenizer(texts, context_length=32).numpy())


@pytest.mark.parametrize(("height", "width", "size"), [(56, 56, 28), (100, 37, 28), (20, 30, 56), (700, 1000, 112)])
def test_resize_agrees_with_pillows_antialiased_bilinear(height, width, size):
    # Pillow's BILINEAR is the same antialiased triangle filter, written independently: equal up to uint8 rounding.
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    ours = resize_image(image, size).astype(np.int32)
    pillow = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR)).astype(np.int32)
    assert ours.shape == (size, size, 3)
    assert np.abs(ours - pillow).max() <= 1


def _resize_cases() -> list[tuple[int, int, int]]:
    """(height, width, size): down and up by many ratios, one axis only, one pixel, no change, and random shapes."""
    fixed = [(1, 1, 28), (1, 300, 28), (300, 1, 28), (28, 28, 28), (28, 90, 28), (90, 28, 28), (7, 9, 1008)]
    fixed += [(3000, 4000, 224), (1500, 2250, 1008), (480, 640, 336), (225, 300, 224), (48, 64, 224)]
    rng = np.random.default_rng(7)
    shapes = [(int(h), int(w)) for h, w in rng.integers(1, 700, size=(40, 2))]
    sizes = rng.choice([14, 28, 56, 112, 224, 336, 448, 1008, 73, 501], size=len(shapes))
    return fixed + [(h, w, int(s)) for (h, w), s in zip(shapes, sizes, strict=True)]


def test_numpy_resize_equals_torchs_uint8_kernel_byte_for_byte():
    # Noise, and smooth gradients, whose sums fall on rounding boundaries far more often.
    rng = np.random.default_rng(0)
    for case, (height, width, size) in enumerate(_resize_cases()):
        if case % 2:
            image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        else:
            ramp = np.linspace(0, 255, height * width).reshape(height, width)
            image = np.stack([ramp, ramp[::-1], np.full_like(ramp, 128)], axis=-1).astype(np.uint8)
        ours, torchs = resize_with_numpy(image, size), resize_with_torch(image, size)
        assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
        assert np.array_equal(ours, torchs), f"{height}x{width} -> {size}: {(ours != torchs).sum()} samples differ"


def test_resize_without_torch_in_the_process_until_it_pays():
    # A fresh interpreter: a decoding worker's case. NumPy resizes until they have cost TORCH_AFTER_SECONDS; the
    # same bytes come back either way.
    script = (
        "import sys, numpy as np\n"
        "from sam3core import resize\n"
        "image = np.random.default_rng(1).integers(0, 256, size=(61, 83, 3), dtype=np.uint8)\n"
        "first = resize.resize_image(image, 56)\n"
        "assert 'torch' not in sys.modules, 'the first resize imported torch'\n"
        f"resize._NumpyTime.seconds = {TORCH_AFTER_SECONDS}\n"
        "later = resize.resize_image(image, 56)\n"
        "assert 'torch' in sys.modules, 'still NumPy after the threshold'\n"
        "assert (first == later).all()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_normalize_scales_to_minus_one_one():
    batch = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 3, 1).expand(1, 1, 3, 3).contiguous()
    x = normalize_images(batch)
    assert x.shape == (1, 3, 1, 3) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0, 0], torch.tensor([-1.0, 51 / 255 * 2 - 1, 1.0]))
    with pytest.raises(ValueError, match="uint8 batch"):
        normalize_images(torch.zeros(1, 3, 4, 4))


def test_preprocess_accepts_pil_modes_and_array_layouts():
    gray = Image.new("L", (40, 30), color=128)
    rgba = Image.new("RGBA", (30, 40), color=(255, 0, 0, 10))
    palette = Image.new("RGB", (50, 50), color=(0, 255, 0)).convert("P")
    array = np.full((20, 10), 255, dtype=np.uint8)
    batch = preprocess_images([gray, rgba, palette, array], 28)
    assert batch.shape == (4, 3, 28, 28)
    torch.testing.assert_close(batch[0], torch.full((3, 28, 28), 128 / 255 * 2 - 1))
    torch.testing.assert_close(batch[1, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(batch[3], torch.ones(3, 28, 28))
    with pytest.raises(TypeError, match="uint8"):
        resize_image(np.zeros((4, 4, 3), dtype=np.float32), 28)
    with pytest.raises(ValueError, match="no images"):
        preprocess_images([], 28)


def assert_same_image_output(actual: dict, expected: dict) -> None:
    """Bit-identical tensors (same dtype, same device) under every key `forward_image` returns."""
    assert set(actual) == set(expected)
    assert (actual["sam2_backbone_out"] is None) == (expected["sam2_backbone_out"] is None)
    pairs = [(actual, expected, "")]
    if expected["sam2_backbone_out"] is not None:
        pairs.append((actual["sam2_backbone_out"], expected["sam2_backbone_out"], "sam2_backbone_out."))
    for got, want, prefix in pairs:
        assert torch.equal(got["vision_features"], want["vision_features"]), prefix + "vision_features"
        assert got["vision_features"] is got["backbone_fpn"][-1]
        for key in ("backbone_fpn", "vision_pos_enc"):
            assert len(got[key]) == len(want[key]), prefix + key
            for level, (a, b) in enumerate(zip(got[key], want[key], strict=True)):
                assert a.dtype == b.dtype and a.device == b.device, f"{prefix}{key}[{level}]"
                assert torch.equal(a, b), f"{prefix}{key}[{level}]"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sam2", [False, True])
@pytest.mark.parametrize("imgsz", [112, 168])
def test_neck_from_a_trunk_map_equals_forward_image_exactly(sam2, imgsz, dtype):
    torch.manual_seed(0)
    model = build_sam3_vl_backbone(config="tiny", imgsz=imgsz, add_sam2_neck=sam2, dtype=dtype)
    images = torch.rand(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(imgsz)) * 2 - 1
    with torch.no_grad():
        expected = model.forward_image(images)
        trunk = model.forward_trunk(images)
        actual = model.forward_image_from_trunk(trunk)
    grid, width = imgsz // 14, model.config.vision.width
    assert trunk.shape == (2, width, grid, grid) and trunk.dtype == dtype
    assert_same_image_output(actual, expected)
    assert len(actual["backbone_fpn"]) == 3  # scalp=1 honoured: the 0.5x level is dropped


def test_neck_from_a_trunk_map_honours_scalp_zero_and_casts_a_half_precision_map(tiny, images):
    scalp_zero = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ)
    scalp_zero.load_state_dict(tiny.state_dict(), strict=False)
    scalp_zero.scalp = 0
    with torch.no_grad():
        trunk = scalp_zero.forward_trunk(images)
        out = scalp_zero.forward_image_from_trunk(trunk)
        assert len(out["backbone_fpn"]) == 4 and out["vision_features"].shape[-1] == IMGSZ // 28
        assert_same_image_output(out, scalp_zero.forward_image(images))
        # A float16 cache feeding a float32 model: cast on the way in, outputs in the model's dtype.
        half = scalp_zero.forward_image_from_trunk(trunk.half())
    assert half["vision_features"].dtype == torch.float32
    torch.testing.assert_close(half["vision_features"], out["vision_features"], rtol=0, atol=1e-2)
    with pytest.raises(ValueError, match=r"trunk map of shape \[B, 64, g, g\]"):
        scalp_zero.forward_image_from_trunk(trunk[:, :32])


def test_vision_backbone_traces_as_one_graph_without_breaks(tiny, images):
    explanation = torch._dynamo.explain(tiny.vision_backbone)(images)
    assert explanation.graph_count == 1, explanation.break_reasons
    assert explanation.graph_break_count == 0
    # what compile_visual compiles in place (sam3core.compile): the trunk as one graph, and each neck level
    trunk = torch._dynamo.explain(tiny.vision_backbone.trunk)(images)
    assert trunk.graph_count == 1 and trunk.graph_break_count == 0, trunk.break_reasons


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_vision_backbone_matches_eager(tiny, images):
    compiled = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ, add_sam2_neck=True, compile_visual=True)
    compiled.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        expected = tiny.forward_image(images)
        actual = compiled.forward_image(images)
    for a, b in zip(actual["backbone_fpn"], expected["backbone_fpn"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The compiled modules serve both halves: a trunk map fed back through the neck gives the compiled output exactly.
    with torch.no_grad():
        from_trunk = compiled.forward_image_from_trunk(compiled.forward_trunk(images))
    assert_same_image_output(from_trunk, actual)
    # parameter names are untouched by compilation, so checkpoints stay interchangeable
    assert list(compiled.state_dict()) == list(tiny.state_dict())


def test_checkpoint_from_the_hub_cache(tmp_path, tiny, images, monkeypatch):
    """hf:// goes through huggingface_hub for real; offline, it resolves from a hub cache laid out as the hub does."""
    pytest.importorskip("huggingface_hub")
    snapshot = tmp_path / "hub" / "models--facebook--sam3" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    torch.save({"model": _official_prefixed(tiny)}, snapshot / "sam3.pt")
    (tmp_path / "hub" / "models--facebook--sam3" / "refs").mkdir()
    (tmp_path / "hub" / "models--facebook--sam3" / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = build_sam3_vl_backbone("hf://facebook/sam3", config="tiny", imgsz=IMGSZ, add_sam2_neck=True)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.forward_image(images)["vision_features"], tiny.forward_image(images)["vision_features"]
        )
    with pytest.raises(CheckpointError, match=r"hf://<owner>/<repo>"):
        build_sam3_vl_backbone("hf://sam3", config="tiny")
