"""The feature cache end to end: a real pipeline run stores `trunk`, `FeatureCache` rebuilds `backbone_out` from the
Parquet, and transformers' own `Sam3Model` gives the same detections and masks from it as from the pixels.

One checkpoint file (the parity generator's deterministic weights for the `tiny` configuration, with the SAM 2
neck) serves the pipeline, the direct reference forward and the transformers model, and gives the run a real
SHA-256 for the cache to check. The run is done twice, storing float32 and float16.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from pipeline import JobConfig, run_job
from pipeline.cache.feature_cache import CheckpointMismatchError, FeatureCache
from pipeline.heads import (
    meta_backbone_out,
    sam3_processor_state,
    transformers_text_embeds,
    transformers_vision_embeds,
    ultralytics_features,
)
from sam3core import build_sam3_vl_backbone, get_config, preprocess_images
from tests.hf_sam3_model import transformers_sam3_model
from tools.parity_weights import deterministic_state_dict

IMGSZ = 56
IDS = [f"img{i}" for i in range(5)]
PROMPTS = ["a red car", "two dogs on a sofa", "the sky", "a person with an umbrella", "grass"]
DOC = Path(__file__).resolve().parents[1] / "docs" / "feature-cache.md"

# Bounds for float16 storage, about 4x what this test measures (tiny configuration, parity weights, 56 px; run with
# -s to print): rebuilt levels within 2.5e-4 of their largest |value|; transformers' pred_logits, pred_boxes and
# pred_masks within 2.6e-4, 1.2e-4 and 7.7e-5; smallest mask IoU after thresholding at 0: 0.996.
FLOAT16_LEVEL_RELATIVE_ERROR = 1e-3
FLOAT16_HEAD_ABS_ERROR = 1e-3
FLOAT16_MASK_IOU = 0.99


def _image(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx * yy) % 256], axis=-1)
    pixels = np.clip(base + rng.integers(-60, 60, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")  # lossless: the reference decodes exactly what the pipeline does
    return buffer.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("feature_cache")
    torch.manual_seed(0)
    shapes = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ, add_sam2_neck=True).state_dict()
    state = deterministic_state_dict({f"detector.backbone.{k}": (tuple(v.shape), v.dtype) for k, v in shapes.items()})
    checkpoint = root / "sam3.pt"
    torch.save({"model": state}, checkpoint)
    rows, images = [], {}
    for i, row_id in enumerate(IDS):
        body = _image(i, (40 + 9 * i, 30 + 5 * i))
        (root / f"{row_id}.png").write_bytes(body)
        images[row_id] = Image.open(io.BytesIO(body)).convert("RGB")
        rows.append({"id": row_id, "image": str(root / f"{row_id}.png"), "caption": PROMPTS[i], "split": "ab"[i % 2]})
    rows.append({"id": "broken", "image": str(root / "missing.png"), "caption": "x", "split": "a"})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {"root": root, "checkpoint": checkpoint, "state": state, "images": images}


@pytest.fixture(scope="module")
def outputs(ray_local: None, workspace: dict[str, Any]) -> dict[str, Path]:
    """One pipeline run per storage dtype, `trunk` stored."""
    root = workspace["root"]
    result = {}
    for dtype in ("float32", "float16"):
        config = JobConfig.from_dict(
            {
                "input": {"uri": str(root / "manifest.jsonl")},
                "output": {
                    "uri": str(root / f"out_{dtype}"),
                    "partition_by": ["split"],
                    "features": ["trunk"],
                    "feature_dtype": dtype,
                },
                "model": {"config": "tiny", "imgsz": IMGSZ, "checkpoint": str(workspace["checkpoint"])},
                "compute": {"batch_size": 2},
            }
        )
        run_job(config)
        result[dtype] = root / f"out_{dtype}"
    return result


@pytest.fixture(scope="module")
def direct(workspace: dict[str, Any]) -> dict[str, Any]:
    """The reference: the same checkpoint, a direct forward of the same pixels, no cache involved."""
    backbone = build_sam3_vl_backbone(workspace["checkpoint"], config="tiny", imgsz=IMGSZ, add_sam2_neck=True)
    pixels = preprocess_images([workspace["images"][i] for i in IDS], IMGSZ)
    with torch.inference_mode():
        return {"backbone": backbone, "pixels": pixels, "out": backbone.forward_image(pixels)}


def _levels(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    named = {"vision_features": out["vision_features"]}
    for prefix, part in (("", out), ("sam2_backbone_out.", out["sam2_backbone_out"])):
        for key in ("backbone_fpn", "vision_pos_enc"):
            named.update({f"{prefix}{key}[{i}]": t for i, t in enumerate(part[key])})
    return named


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cache_rebuilds_every_output_of_a_direct_forward(
    outputs: dict[str, Path], workspace: dict[str, Any], direct: dict[str, Any], dtype: str
) -> None:
    cache = FeatureCache(str(outputs[dtype]), checkpoint=str(workspace["checkpoint"]), sam2=True)
    images = cache.load(IDS)
    assert images.ids == IDS
    assert images.trunk.shape == (5, 64, IMGSZ // 14, IMGSZ // 14) and images.trunk.dtype == torch.float32
    assert images.original_sizes == [(30 + 5 * i, 40 + 9 * i) for i in range(5)]
    expected, actual = _levels(direct["out"]), _levels(images.backbone_out)
    assert list(actual) == list(expected) and len(expected) == 13
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        if "pos_enc" in name:
            assert torch.equal(got, want), name  # a function of the shape only
        elif dtype == "float32":
            # The run computed the trunk in other batches than this forward: float32 rounding, nothing more.
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)
        else:
            relative = float((got - want).abs().max() / want.abs().max())
            print(f"float16 storage, {name}: max |error| / max |value| = {relative:.2e}")
            assert relative < FLOAT16_LEVEL_RELATIVE_ERROR, f"{name}: {relative:.2e}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_transformers_sam3_model_from_the_cache_agrees_with_pixels(
    outputs: dict[str, Path], workspace: dict[str, Any], direct: dict[str, Any], dtype: str
) -> None:
    """transformers' own detector, run from pixels and from `vision_embeds` built out of the Parquet."""
    model = transformers_sam3_model(workspace["state"], get_config("tiny"), IMGSZ)
    cache = FeatureCache(str(outputs[dtype]), checkpoint=str(workspace["checkpoint"]))
    images = cache.load(IDS)
    tokens = direct["backbone"].language_backbone.tokenize(PROMPTS)  # the run's tokenizer, padded with 0
    with torch.inference_mode():
        text_embeds, attention_mask = transformers_text_embeds(cache.text(PROMPTS))
        from_pixels = model(pixel_values=direct["pixels"], input_ids=tokens, attention_mask=attention_mask)
        vision_embeds = transformers_vision_embeds(images)
        from_cache = model(vision_embeds=vision_embeds, text_embeds=text_embeds, attention_mask=attention_mask)
        reference_embeds = model.get_vision_features(pixel_values=direct["pixels"])
    assert len(vision_embeds.fpn_hidden_states) == 4 == len(reference_embeds.fpn_hidden_states)
    for got, want in zip(vision_embeds.fpn_position_encoding, reference_embeds.fpn_position_encoding, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert vision_embeds.last_hidden_state.shape == reference_embeds.last_hidden_state.shape
    for name in ("pred_logits", "pred_boxes", "pred_masks"):
        got, want = from_cache[name], from_pixels[name]
        assert got.shape == want.shape, name
        if dtype == "float32":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
        else:
            error = float((got - want).abs().max())
            print(
                f"float16 storage, transformers {name}: max |error| = {error:.2e} (max |value| {want.abs().max():.3f})"
            )
            assert error < FLOAT16_HEAD_ABS_ERROR, f"{name}: {error:.2e}"
    masks_cache, masks_pixels = from_cache.pred_masks > 0, from_pixels.pred_masks > 0
    iou = (masks_cache & masks_pixels).sum((-2, -1)) / (masks_cache | masks_pixels).sum((-2, -1)).clamp(min=1)
    print(f"{dtype} storage: smallest mask IoU {float(iou.min()):.4f}")
    assert float(iou.min()) >= (1.0 if dtype == "float32" else FLOAT16_MASK_IOU), float(iou.min())
    # the detections respond to the images: not a constant the two paths could share by accident
    assert float(from_pixels.pred_logits.std()) > 0.05 and float(from_pixels.pred_masks.std()) > 0.01


@pytest.mark.timeout(300)
def test_batches_are_lazy_filtered_and_skip_error_rows(outputs: dict[str, Path], workspace: dict[str, Any]) -> None:
    cache = FeatureCache(str(outputs["float16"]), checkpoint=str(workspace["checkpoint"]))
    batches = list(cache.iter_batches(batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert sorted(i for b in batches for i in b.ids) == IDS  # the broken row has no trunk and is skipped
    split_a = [i for b in cache.iter_batches(filter=[("split", "=", "a")], batch_size=8) for i in b.ids]
    assert sorted(split_a) == ["img0", "img2", "img4"]
    chosen = [i for b in cache.iter_batches(["img3", "img1"], filter=pc.field("split") == "b") for i in b.ids]
    assert sorted(chosen) == ["img1", "img3"]
    with pytest.raises(KeyError, match="nope"):
        cache.load(["img0", "nope"])
    with pytest.raises(ValueError, match="broken"):
        cache.load(["broken"])
    text = cache.text(["a red car"])
    assert text["language_features"].shape == (32, 1, 32) and text["language_mask"].shape == (1, 32)


@pytest.mark.timeout(300)
def test_cache_refuses_another_checkpoint_naming_both_digests(
    outputs: dict[str, Path], workspace: dict[str, Any], tmp_path: Path
) -> None:
    import hashlib

    other = tmp_path / "other.pt"
    state = {k: v + 1 if v.is_floating_point() else v for k, v in workspace["state"].items()}
    torch.save(state, other)
    recorded = hashlib.sha256(workspace["checkpoint"].read_bytes()).hexdigest()
    offered = hashlib.sha256(other.read_bytes()).hexdigest()
    with pytest.raises(CheckpointMismatchError) as error:
        FeatureCache(str(outputs["float32"]), checkpoint=str(other))
    assert recorded in str(error.value) and offered in str(error.value)
    with pytest.raises(CheckpointMismatchError, match="random weights"):
        FeatureCache(str(outputs["float32"]), checkpoint=None)


# Meta's sam3 and ultralytics: their heads cannot run here (Meta's need CUDA and torchvision, ultralytics' need
# torchvision), so these tests check what their code reads, as read from the wheels (sam3 0.1.4, ultralytics 8.4.190).


@pytest.mark.timeout(300)
def test_meta_backbone_out_and_processor_state_hold_what_meta_reads(
    outputs: dict[str, Path], workspace: dict[str, Any], direct: dict[str, Any]
) -> None:
    cache = FeatureCache(str(outputs["float32"]), checkpoint=str(workspace["checkpoint"]), sam2=True)
    images = cache.load(IDS)
    text = cache.text(PROMPTS[:2])
    out = meta_backbone_out(images, text)
    # Sam3Image._get_img_feats: backbone_fpn[-1:], vision_pos_enc[-1:] indexed by img_ids (batch-first, NCHW)
    # _encode_prompt: language_features[:, text_ids] (sequence first), language_mask[text_ids] (True = padding)
    assert out["backbone_fpn"][-1].shape == (5, 32, 4, 4) and out["vision_pos_enc"][-1].shape == (5, 32, 4, 4)
    assert [f.shape[-1] for f in out["backbone_fpn"]] == [16, 8, 4]  # 4x, 2x, 1x: scalp dropped the 0.5x level
    assert out["language_features"].shape == (32, 2, 32) and out["language_mask"].dtype == torch.bool
    out["backbone_fpn"].pop()  # Meta's heads edit the dictionary in place; the cache must not see it
    assert len(images.backbone_out["backbone_fpn"]) == 3

    class Decoder(torch.nn.Module):  # SAM 2's mask decoder owns conv_s0 (d -> d/8) and conv_s1 (d -> d/4)
        def __init__(self) -> None:
            super().__init__()
            self.conv_s0, self.conv_s1 = torch.nn.Conv2d(32, 4, 1), torch.nn.Conv2d(32, 8, 1)

    decoder = Decoder()
    processor = type("P", (), {})()
    processor.model = type("M", (), {})()
    processor.model.inst_interactive_predictor = type("I", (), {})()
    processor.model.inst_interactive_predictor.model = type("S", (), {})()
    processor.model.inst_interactive_predictor.model.sam_mask_decoder = decoder
    state = sam3_processor_state(images, 2, processor)
    assert (state["original_height"], state["original_width"]) == (40, 58)
    single = state["backbone_out"]
    assert single["backbone_fpn"][0].shape == (1, 32, 16, 16)
    sam2 = single["sam2_backbone_out"]
    reference = direct["out"]["sam2_backbone_out"]["backbone_fpn"]
    with torch.inference_mode():
        torch.testing.assert_close(sam2["backbone_fpn"][0], decoder.conv_s0(reference[0][2:3]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sam2["backbone_fpn"][1], decoder.conv_s1(reference[1][2:3]), rtol=1e-5, atol=1e-5)
    assert images.backbone_out["sam2_backbone_out"]["backbone_fpn"][0].shape[1] == 32  # applied to a copy, once


@pytest.mark.timeout(300)
def test_ultralytics_features_are_one_image_as_its_get_im_features_returns(
    outputs: dict[str, Path], workspace: dict[str, Any], direct: dict[str, Any]
) -> None:
    cache = FeatureCache(str(outputs["float32"]), checkpoint=str(workspace["checkpoint"]))
    images = cache.load(IDS)
    features, src_shape = ultralytics_features(images, 3, dtype=torch.float16)
    assert src_shape == (45, 67)
    # SAM3SemanticPredictor.get_im_features returns backbone.forward_image(im) for one image; forward_grounding
    # expands backbone_fpn and vision_pos_enc to the number of prompts and reads the last num_feature_levels.
    assert set(features) == {"vision_features", "vision_pos_enc", "backbone_fpn", "sam2_backbone_out"}
    assert [f.shape for f in features["backbone_fpn"]] == [(1, 32, 16, 16), (1, 32, 8, 8), (1, 32, 4, 4)]
    assert features["vision_features"] is features["backbone_fpn"][-1]
    assert all(f.dtype == torch.float16 for f in features["backbone_fpn"])
    for got, want in zip(features["backbone_fpn"], direct["out"]["backbone_fpn"], strict=True):
        torch.testing.assert_close(got.float(), want[3:4], rtol=1e-3, atol=1e-3)


# docs/feature-cache.md -----------------------------------------------------------------------------------------------


def _doc_block(heading: str) -> str:
    lines, inside, found = [], False, False
    for line in DOC.read_text().splitlines(keepends=True):
        if line.startswith("#"):
            found = line.lstrip("#").strip() == heading
        elif found and line.startswith("```python"):
            inside = True
        elif inside and line.startswith("```"):
            return "".join(lines)
        elif inside:
            lines.append(line)
    raise AssertionError(f"no python block under {heading!r} in {DOC}")


@pytest.mark.timeout(300)
def test_transformers_example_in_the_docs_runs(outputs: dict[str, Path], workspace: dict[str, Any]) -> None:
    code = (
        _doc_block("Hugging Face transformers")
        .replace("/data/embeddings", str(outputs["float16"]))
        .replace("/models/sam3.pt", str(workspace["checkpoint"]))
        .replace('Sam3Model.from_pretrained("facebook/sam3")', "tiny_transformers_model")
    )
    model = transformers_sam3_model(workspace["state"], get_config("tiny"), IMGSZ)
    namespace: dict[str, Any] = {"tiny_transformers_model": model}
    exec(compile(code, "docs/feature-cache.md", "exec"), namespace)
    assert sorted(namespace["results"]) == IDS
    assert namespace["results"]["img0"]["masks"].shape[-2:] == (16, 16)


@pytest.mark.timeout(300)
def test_a_run_with_random_weights_is_rebuilt_from_the_pipelines_seed(
    ray_local: None, workspace: dict[str, Any], tmp_path: Path
) -> None:
    output = tmp_path / "out"
    config = JobConfig.from_dict(
        {
            "input": {"uri": str(workspace["root"] / "manifest.jsonl")},
            "output": {"uri": str(output), "features": ["trunk"], "feature_dtype": "float32"},
            "model": {"config": "tiny", "imgsz": IMGSZ, "random_weights": True},
        }
    )
    run_job(config)
    with pytest.raises(CheckpointMismatchError, match="none \\(random weights\\)"):
        FeatureCache(str(output), checkpoint=str(workspace["checkpoint"]))
    images = FeatureCache(str(output), checkpoint=None).load(IDS[:2])
    torch.manual_seed(0)  # the pipeline's seed for random weights
    reference = build_sam3_vl_backbone(None, config="tiny", imgsz=IMGSZ)
    with torch.inference_mode():
        expected = reference.forward_image(preprocess_images([workspace["images"][i] for i in IDS[:2]], IMGSZ))
    for got, want in zip(images.backbone_out["backbone_fpn"], expected["backbone_fpn"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
