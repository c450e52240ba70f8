"""SAM 3.1 through the pipeline: a real run (tiny 3.1 configuration, PNG files, local Ray) with a 3.1-layout
checkpoint stores the detector head's pooled embedding, `trunk` and every head's levels; the Parquet metadata names
the generation; `FeatureCache` rebuilds SAM 3.1's dictionary from `trunk` equal to a direct forward, refuses a
generation mismatch, and the adapters hand each consumer the head it reads. Preflight refuses, before Ray starts,
a checkpoint of the other generation and a 3.1-only feature with a SAM 3 checkpoint.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import JobConfig, run_job
from pipeline.cache.feature_cache import FeatureCache
from pipeline.dataset.reader import read_embeddings
from pipeline.heads import meta_backbone_out, sam3_processor_state, transformers_vision_embeds, ultralytics_features
from pipeline.run.preflight import PreflightError, preflight
from sam3core import build_sam3_vl_backbone, get_config, preprocess_images
from tests.sam31_checkpoint import backbone_spec, sam31_state, write_sam31
from tools.parity_weights import deterministic_state_dict

IMGSZ = 56
IDS = [f"img{i}" for i in range(4)]
FEATURES = ["trunk", "vision_features", "backbone_fpn", "interactive_backbone_fpn", "sam2_backbone_fpn"]
HEAD_COLUMNS = {
    "backbone_fpn": None,
    "interactive_backbone_fpn": "interactive",
    "sam2_backbone_fpn": "sam2_backbone_out",
}


def _png(seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sam31")
    checkpoint = write_sam31(root / "sam3.1_multiplex.pt", sam31_state("tiny-sam3.1"))
    rows, images = [], {}
    for i, row_id in enumerate(IDS):
        body = _png(i, (40 + 7 * i, 30 + 3 * i))
        (root / f"{row_id}.png").write_bytes(body)
        images[row_id] = Image.open(io.BytesIO(body)).convert("RGB")
        rows.append({"id": row_id, "image": str(root / f"{row_id}.png"), "caption": f"object {i}"})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {"root": root, "checkpoint": checkpoint, "images": images}


def _config(workspace: dict[str, Any], output: Path, **model: Any) -> JobConfig:
    return JobConfig.from_dict(
        {
            "input": {"uri": str(workspace["root"] / "manifest.jsonl")},
            "output": {"uri": str(output), "features": FEATURES, "feature_dtype": "float32"},
            "model": {"config": "tiny-sam3.1", "imgsz": IMGSZ, "checkpoint": str(workspace["checkpoint"]), **model},
            "compute": {"batch_size": 3},
        }
    )


@pytest.fixture(scope="module")
def output(ray_local: None, workspace: dict[str, Any]) -> Path:
    out = workspace["root"] / "out"
    run_job(_config(workspace, out))
    return out


@pytest.fixture(scope="module")
def direct(workspace: dict[str, Any]) -> dict[str, Any]:
    backbone = build_sam3_vl_backbone(workspace["checkpoint"], config="tiny-sam3.1", imgsz=IMGSZ)
    pixels = preprocess_images([workspace["images"][i] for i in IDS], IMGSZ)
    with torch.inference_mode():
        return {"backbone": backbone, "out": backbone.forward_image(pixels), "trunk": backbone.forward_trunk(pixels)}


def _flat(out: dict[str, Any]) -> dict[str, Any]:
    """Every entry of a `forward_image` dictionary under a path name, nested heads included."""
    flat: dict[str, Any] = {}
    for key, value in out.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        elif isinstance(value, list):
            flat.update({f"{key}[{i}]": v for i, v in enumerate(value)})
        else:
            flat[key] = value
    return flat


def _close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, name
    # the run computed the trunk in other batches than the direct forward: float32 rounding, nothing more
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)


@pytest.mark.timeout(300)
def test_the_run_stores_every_head_and_records_the_generation(
    output: Path, workspace: dict[str, Any], direct: dict[str, Any]
) -> None:
    table = read_embeddings(str(output))
    metadata = json.loads(table.schema.metadata[b"sam3_embed"])
    assert metadata["model"]["generation"] == "sam3.1" and metadata["model"]["config"] == "tiny-sam3.1"
    assert metadata["model"]["architecture"]["scale_factors"] == [4.0, 2.0, 1.0]
    table = table.sort_by("id")
    assert table.column("id").to_pylist() == IDS and set(table.column("status").to_pylist()) == {"ok"}
    out = direct["out"]
    for feature, key in HEAD_COLUMNS.items():
        head = out if key is None else out[key]
        prefix = {"backbone_fpn": "", "interactive_backbone_fpn": "interactive_", "sam2_backbone_fpn": "sam2_"}[feature]
        for level in range(3):
            column = table.column(f"{prefix}backbone_fpn_{level}").combine_chunks()
            stored = torch.from_numpy(np.array(column.to_numpy_ndarray()))
            _close(stored, head["backbone_fpn"][level], f"{feature}[{level}]")
    pooled = torch.from_numpy(np.stack(table.column("image_embedding").to_numpy(zero_copy_only=False)))
    expected = torch.nn.functional.normalize(out["vision_features"].mean(dim=(2, 3)), dim=-1)
    _close(pooled, expected, "image_embedding from the detector head")


@pytest.mark.timeout(300)
def test_feature_cache_rebuilds_the_sam31_dictionary_of_a_direct_forward(
    output: Path, workspace: dict[str, Any], direct: dict[str, Any]
) -> None:
    cache = FeatureCache(str(output), checkpoint=str(workspace["checkpoint"]))
    images = cache.load(IDS)
    expected, actual = _flat(direct["out"]), _flat(images.backbone_out)
    assert list(actual) == list(expected) and len(expected) == 3 * (1 + 1 + 3 + 3)
    for name, want in expected.items():
        got = actual[name]
        if want is None:
            assert got is None, name  # vision_mask of each head
        elif "pos_enc" in name:
            assert torch.equal(got, want), name
        else:
            _close(got, want, name)
    only = FeatureCache(str(output), checkpoint=str(workspace["checkpoint"]), heads=["interactive"]).load(IDS[:2])
    assert set(only.backbone_out) == {"interactive"}
    _close(
        only.backbone_out["interactive"]["backbone_fpn"][0], direct["out"]["interactive"]["backbone_fpn"][0][:2], "i"
    )


@pytest.mark.timeout(300)
def test_feature_cache_refuses_a_generation_mismatch(output: Path, workspace: dict[str, Any], tmp_path: Path) -> None:
    relabelled = tmp_path / "relabelled"
    shutil.copytree(output, relabelled)
    for path in relabelled.rglob("*.parquet"):
        table = pq.read_table(path)
        metadata = json.loads(table.schema.metadata[b"sam3_embed"])
        metadata["model"]["generation"] = "sam3"
        pq.write_table(table.replace_schema_metadata({b"sam3_embed": json.dumps(metadata).encode()}), path)
    with pytest.raises(ValueError, match=r"written by a sam3 model, but 'tiny-sam3\.1' builds sam3\.1"):
        FeatureCache(str(relabelled), checkpoint=str(workspace["checkpoint"]))


@pytest.mark.timeout(300)
def test_adapters_give_each_consumer_the_head_it_reads(
    output: Path, workspace: dict[str, Any], direct: dict[str, Any]
) -> None:
    images = FeatureCache(str(output), checkpoint=str(workspace["checkpoint"])).load(IDS)
    out = direct["out"]
    # Meta: SAM3VLBackboneTri's dictionary, fresh containers; Sam3Processor state per image
    meta = meta_backbone_out(images)
    meta["interactive"]["backbone_fpn"].pop()
    assert len(images.backbone_out["interactive"]["backbone_fpn"]) == 3
    state = sam3_processor_state(images, 1)
    single = state["backbone_out"]
    assert set(single) == set(out) and single["interactive"]["vision_mask"] is None
    _close(single["sam2_backbone_out"]["backbone_fpn"][2], out["sam2_backbone_out"]["backbone_fpn"][2][1:2], "prop")
    assert single["interactive"]["vision_features"] is single["interactive"]["backbone_fpn"][-1]
    # transformers (Sam3Model with three scale factors): the detector head's three levels and their encodings
    embeds = transformers_vision_embeds(images)
    assert len(embeds.fpn_hidden_states) == 3
    for got, want in zip(embeds.fpn_hidden_states, out["backbone_fpn"], strict=True):
        _close(got, want, "transformers fpn")
    assert embeds.last_hidden_state.shape == (4, (IMGSZ // 14) ** 2, 64)
    # ultralytics (8.4.148+ maps convs -> convs, interactive_convs -> sam2_convs)
    features, _ = ultralytics_features(images, 2, interactive=True)
    _close(features["backbone_fpn"][0], out["backbone_fpn"][0][2:3], "ultralytics detector")
    _close(features["sam2_backbone_out"]["backbone_fpn"][1], out["interactive"]["backbone_fpn"][1][2:3], "ultra i")


def test_preflight_refuses_the_other_generation_and_31_only_features(workspace: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match=r"is sam3\.1 \(sam3\.1_multiplex\.pt layout\).*'tiny' is sam3"):
        preflight(_config(workspace, tmp_path / "a", config="tiny"))
    sam3 = tmp_path / "sam3.pt"
    torch.save(deterministic_state_dict(backbone_spec("tiny")), sam3)
    config = _config(workspace, tmp_path / "b", config="auto", checkpoint=str(sam3))
    with pytest.raises(PreflightError, match=r"\['interactive_backbone_fpn'\] need a SAM 3\.1 checkpoint"):
        preflight(config)
    plan = preflight(_config(workspace, tmp_path / "c", config="auto"))
    assert "sam3.1_multiplex.pt layout (sam3.1)" in plan.checkpoint_format
    assert get_config("tiny-sam3.1").generation == "sam3.1"


@pytest.mark.timeout(300)
def test_transformers_sam3_model_with_three_scale_factors_runs_from_the_cache_as_from_pixels(
    output: Path, workspace: dict[str, Any]
) -> None:
    """Released transformers' `Sam3Model` configured as the open 3.1 pull request uses it (scale factors 4, 2, 1,
    the detector head's weights): its own neck from pixels equals the cache's levels, and its heads give the same
    detections from `vision_embeds` built out of the Parquet as from the pixels."""
    from tests.hf_sam3_model import transformers_sam3_model

    state = sam31_state("tiny-sam3.1")
    other_heads = (".interactive_convs.", ".propagation_convs.")
    detector = {
        k: v for k, v in state.items() if k.startswith("detector.backbone.") and not any(h in k for h in other_heads)
    }
    model = transformers_sam3_model(detector, get_config("tiny-sam3.1"), IMGSZ)
    cache = FeatureCache(str(output), checkpoint=str(workspace["checkpoint"]))
    images = cache.load(IDS)
    pixels = preprocess_images([workspace["images"][i] for i in IDS], IMGSZ)
    tokens = cache.backbone.language_backbone.tokenize(["object"] * len(IDS))
    attention_mask = (tokens != 0).long()
    with torch.inference_mode():
        reference = model.get_vision_features(pixel_values=pixels)
        embeds = transformers_vision_embeds(images)
        from_pixels = model(pixel_values=pixels, input_ids=tokens, attention_mask=attention_mask)
        from_cache = model(vision_embeds=embeds, input_ids=tokens, attention_mask=attention_mask)
    for got, want in zip(embeds.fpn_hidden_states, reference.fpn_hidden_states, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    for name in ("pred_logits", "pred_boxes", "pred_masks"):
        torch.testing.assert_close(from_cache[name], from_pixels[name], rtol=1e-4, atol=1e-5, msg=name)
    assert float(from_pixels.pred_logits.std()) > 0.01
