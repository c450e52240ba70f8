"""End-to-end runs of `run_job` on a local Ray cluster, reading from and writing to moto's S3 server.

Every run uses the tiny model configuration at a small image size; features are checked against a direct
sam3core forward pass on the same images and captions.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipeline import JobConfig, embeddings_to_numpy, read_embeddings, read_embeddings_numpy, read_run_metadata, run_job
from pipeline.input.ids import derive_id
from pipeline.run.job import PREPARE_BATCH_ROWS
from pipeline.run.preflight import PreflightError
from sam3core import build_sam3_vl_backbone, preprocess_images
from tests.s3_bucket import S3Bucket

IMGSZ = 56
TOLERANCE = 2e-3  # float16 storage of unit vectors: about 5e-4 per component, plus summation order


# Test data ----------------------------------------------------------------------------------------------------------


def jpeg(seed: int, size: tuple[int, int] = (48, 36), orientation: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], axis=-1)
    noisy = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(noisy).save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def png_rgba(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 40, 4), dtype=np.uint8), mode="RGBA").save(buffer, "PNG")
    return buffer.getvalue()


GARBAGE = b"this is not an image, just bytes"


def truncated_jpeg(seed: int) -> bytes:
    return jpeg(seed, (64, 64))[:200]


def job(bucket: S3Bucket, **sections: Any) -> JobConfig:
    data: dict[str, Any] = {
        "model": {"config": "tiny", "imgsz": IMGSZ},
        "compute": {"batch_size": 3, "num_actors": 1},
        "s3": {"endpoint_url": bucket.endpoint, "region": "us-east-1"},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    # random weights (the pipeline's fixed seed) unless a test brings a checkpoint
    data["model"].setdefault("random_weights", data["model"].get("checkpoint") is None)
    return JobConfig.from_dict(data)


# Reference features -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> Any:
    torch.manual_seed(0)  # what the pipeline does for random weights
    return build_sam3_vl_backbone(None, config="tiny", imgsz=IMGSZ)


def as_displayed(encoded: bytes) -> Image.Image:
    """What a viewer shows: EXIF orientation applied, transparency over white."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(encoded)))
    if image.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    return image.convert("RGB")


def reference_image_embeddings(backbone: Any, encoded: list[bytes]) -> np.ndarray:
    images = [as_displayed(b) for b in encoded]
    with torch.inference_mode():
        vision = backbone.forward_image(preprocess_images(images, IMGSZ))["vision_features"]
    return F.normalize(vision.mean(dim=(2, 3)), dim=-1).numpy()


def reference_text_embeddings(backbone: Any, captions: list[str]) -> np.ndarray:
    with torch.inference_mode():
        out = backbone.forward_text(captions)
    features = out["language_features"].transpose(0, 1)
    real = (~out["language_mask"]).unsqueeze(-1).float()
    return F.normalize((features * real).sum(1) / real.sum(1), dim=-1).numpy()


def assert_close(actual: Any, expected: np.ndarray) -> None:
    actual = np.asarray(actual, dtype=np.float32)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=TOLERANCE, rtol=0)


def by_id(table: pa.Table) -> dict[str, dict[str, Any]]:
    rows = table.to_pylist()
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), "duplicate ids in the output"
    return {row["id"]: row for row in rows}


# Runs ---------------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_parquet_manifest_with_partitions_and_passthrough(ray_local: None, bucket: S3Bucket, reference: Any) -> None:
    images = {f"img{i}": jpeg(i) for i in range(8)}
    uris = {name: bucket.put(f"data/{name}.jpg", body) for name, body in images.items()}
    rows = [
        {
            "key": f"k{i}",
            "image_uri": uris[f"img{i}"],
            "text": f"a photo of object {i}" if i % 3 else None,
            "split": "train" if i < 5 else "val",
            "score": i / 10,
            "tags": [f"t{i}", "x"],
        }
        for i in range(8)
    ]
    # Two manifest files under one prefix, plus a stray non-manifest file that must be ignored.
    for part, chunk in enumerate((rows[:4], rows[4:])):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(chunk), sink)
        bucket.put(f"manifest/part-{part}.parquet", sink.getvalue().to_pybytes())
    bucket.put("manifest/README.md", b"not a manifest")

    config = job(
        bucket,
        input={
            "uri": bucket.uri("manifest/"),
            "id_column": "key",
            "image_column": "image_uri",
            "caption_column": "text",
        },
        output={"uri": bucket.uri("out"), "partition_by": ["split"], "min_rows_per_file": 1000},
    )
    summary = run_job(config)

    assert (summary.rows_total, summary.rows_ok, summary.rows_error, summary.rows_this_run) == (8, 8, 0, 8)
    keys = bucket.keys("out")
    data_files = [k for k in keys if k.endswith(".parquet")]
    # Hive partitions, one file per partition (rows are gathered into files, not one file per batch).
    assert sorted(k.split("/")[1] for k in data_files) == ["split=train", "split=val"]
    assert {"out/_SUCCESS", "out/_summary.json", "out/split=train/_SUCCESS", "out/split=val/_SUCCESS"} <= set(keys)
    assert json.loads(bucket.get("out/_summary.json"))["rows_ok"] == 8
    # several batches of 3: a steady rate (from the first batch to the last) is known
    assert summary.steady_rows_per_s is not None and summary.steady_rows_per_s > 0

    raw = pq.read_table(pa.BufferReader(bucket.get(data_files[0])))
    assert "split" not in raw.column_names  # the partition value lives in the directory name
    metadata = json.loads(raw.schema.metadata[b"sam3_embed"])
    assert metadata["run_id"] == config.run_id and metadata["image_size"] == IMGSZ
    assert metadata["feature_dtype"] == "float16" and metadata["model"]["config"] == "tiny"
    assert metadata["model"]["compute_dtype"] == "float32" and "image_embedding" in metadata["pooling"]
    assert raw.schema.field("image_embedding").type == pa.list_(pa.float16(), 32)
    assert (
        pq.ParquetFile(pa.BufferReader(bucket.get(data_files[0]))).metadata.row_group(0).column(0).compression == "ZSTD"
    )

    table = read_embeddings(bucket.uri("out"), storage_options=bucket.storage_options)
    out = by_id(table)
    assert set(out) == {f"k{i}" for i in range(8)}
    for i, row in enumerate(rows):
        got = out[row["key"]]
        assert got["source_uri"] == row["image_uri"] and got["split"] == row["split"]
        assert got["score"] == pytest.approx(row["score"]) and got["tags"] == row["tags"]
        assert (got["image_width"], got["image_height"]) == (48, 36)
        assert got["image_sha256"] == hashlib.sha256(images[f"img{i}"]).hexdigest()
        assert got["status"] == "ok" and got["error"] is None and got["caption"] == row["text"]
        assert (got["text_embedding"] is None) == (row["text"] is None)

    ordered = [out[f"k{i}"] for i in range(8)]
    expected_images = reference_image_embeddings(reference, list(images.values()))
    assert_close([r["image_embedding"] for r in ordered], expected_images)
    captioned = [r for r in ordered if r["caption"] is not None]
    assert_close(
        [r["text_embedding"] for r in captioned],
        reference_text_embeddings(reference, [r["caption"] for r in captioned]),
    )

    # Partition filters prune directories; the NumPy helper returns aligned ids and vectors.
    val = read_embeddings(
        bucket.uri("out"),
        columns=["id", "split"],
        filters=[("split", "=", "val")],
        storage_options=bucket.storage_options,
    )
    assert sorted(val.column("id").to_pylist()) == ["k5", "k6", "k7"]
    ids, matrix = read_embeddings_numpy(bucket.uri("out"), storage_options=bucket.storage_options)
    assert matrix.shape == (8, 32) and matrix.dtype == np.float32
    assert_close(matrix[np.argsort(ids)], expected_images)
    assert read_run_metadata(bucket.uri("out"), storage_options=bucket.storage_options)["summary"]["rows_total"] == 8

    # Writing the same job into a non-empty output without resume_path would duplicate rows: refused up front.
    with pytest.raises(PreflightError, match="already holds a finished run"):
        run_job(config)
    # So would resuming from a checkpoint location that never recorded those files.
    config.resume_path = bucket.uri("never-used-checkpoint")
    with pytest.raises(PreflightError, match="records none of them"):
        run_job(config)
    assert "out/_SUCCESS" in bucket.keys("out")  # refused runs leave the committed output alone


@pytest.mark.timeout(240)
def test_jsonl_manifest_without_ids_several_captions_and_s3_checkpoint(
    ray_local: None, bucket: S3Bucket, model_cache_dir: Path
) -> None:
    # Real weights from object storage: a tiny model saved with another seed, so random weights would not match.
    torch.manual_seed(123)
    trained = build_sam3_vl_backbone(None, config="tiny", imgsz=IMGSZ)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    checkpoint_uri = bucket.put("models/tiny.pt", buffer.getvalue())

    images = [jpeg(100 + i) for i in range(5)]
    uris = [bucket.put(f"imgs/{i}.jpg", body) for i, body in enumerate(images)]
    captions: list[Any] = [["red", "a blue square"], ["one caption"], [], None, ["x", "y", "z"]]
    lines = [{"url": uri, "caps": caps, "source": "web"} for uri, caps in zip(uris, captions, strict=True)]
    # The same image twice with different captions: still two rows with two distinct ids.
    lines.append({"url": uris[0], "caps": ["another view"], "source": "dup"})
    manifests = []
    for part, chunk in enumerate((lines[:3], lines[3:])):
        body = "\n".join(json.dumps(line) for line in chunk).encode()
        manifests.append(bucket.put(f"manifest/m{part}.jsonl", body))

    config = job(
        bucket,
        input={"uri": manifests, "image_column": "url", "caption_column": None, "captions_column": "caps"},
        output={"uri": bucket.uri("emb")},
        model={"checkpoint": checkpoint_uri},
    )
    summary = run_job(config)
    assert summary.rows_ok == 6 and summary.rows_error == 0
    assert summary.checkpoint_sha256 == hashlib.sha256(buffer.getvalue()).hexdigest()

    table = read_embeddings(bucket.uri("emb"), storage_options=bucket.storage_options)
    assert table.schema.field("text_embedding").type == pa.list_(pa.list_(pa.float16(), 32))
    meta = json.loads(table.schema.metadata[b"sam3_embed"])
    assert meta["model"]["checkpoint"] == checkpoint_uri
    assert meta["model"]["checkpoint_sha256"] == summary.checkpoint_sha256
    out = by_id(table)
    expected_ids = [derive_id(line["url"], line["caps"] or None) for line in lines]
    assert set(out) == set(expected_ids)
    for line, row_id in zip(lines, expected_ids, strict=True):
        row = out[row_id]
        assert row["source"] == line["source"] and row["source_uri"] == line["url"]
        assert row["captions"] == (line["caps"] or None)
        if not line["caps"]:
            assert row["text_embedding"] is None
            continue
        assert_close(row["text_embedding"], reference_text_embeddings(trained, line["caps"]))
    assert_close(
        [out[expected_ids[i]]["image_embedding"] for i in range(5)], reference_image_embeddings(trained, images)
    )
    ids, vectors = embeddings_to_numpy(table, "text_embedding")
    assert vectors.shape == (2 + 1 + 3 + 1, 32) and list(ids).count(expected_ids[4]) == 3
    cached = [p for p in model_cache_dir.rglob("tiny.pt") if p.read_bytes() == buffer.getvalue()]
    assert len(cached) == 1  # copied once into the node's cache


@pytest.mark.timeout(240)
def test_csv_manifest_with_unreadable_images_and_missing_captions(
    ray_local: None, bucket: S3Bucket, reference: Any
) -> None:
    good = jpeg(7, (40, 30))
    rotated = jpeg(8, (40, 30), orientation=6)
    cases = [
        (1, bucket.put("i/good.jpg", good), "fine", "ok", None),
        (2, bucket.put("i/rotated.jpg", rotated), "", "ok", None),
        (3, bucket.put("i/alpha.png", png_rgba(3)), None, "ok", None),
        (4, bucket.put("i/garbage.jpg", GARBAGE), "x", "error", "cannot decode image"),
        (5, bucket.put("i/truncated.jpg", truncated_jpeg(5)), "y", "error", "cannot decode image"),
        (6, bucket.uri("i/does-not-exist.jpg"), "z", "error", "image not found"),
        (7, bucket.put("i/empty.jpg", b""), None, "error", "empty image file"),
        (8, "", "no image at all", "error", "missing image URI"),
        (9, "relative/path.jpg", None, "error", "image path 'relative/path.jpg' is relative"),
    ]
    lines = ["id,image,caption,note"] + [f"{i},{uri},{cap or ''},n{i}" for i, uri, cap, _, _ in cases]
    bucket.put("m/manifest.csv", "\n".join(lines).encode())

    summary = run_job(job(bucket, input={"uri": bucket.uri("m/manifest.csv")}, output={"uri": bucket.uri("o")}))
    assert (summary.rows_total, summary.rows_ok, summary.rows_error) == (9, 3, 6)

    out = by_id(read_embeddings(bucket.uri("o"), storage_options=bucket.storage_options))
    assert set(out) == {str(case[0]) for case in cases}
    for i, _uri, caption, status, reason in cases:
        row = out[str(i)]
        assert row["note"] == f"n{i}"
        assert row["status"] == status, (i, row["error"])
        assert row["caption"] == (caption or None)
        if status == "ok":
            assert row["error"] is None and row["image_embedding"] is not None
            assert (row["text_embedding"] is None) == (not caption)
        else:
            assert row["error"].startswith(reason), (i, row["error"])
            assert row["image_embedding"] is None and row["text_embedding"] is None
    assert (out["2"]["image_width"], out["2"]["image_height"]) == (30, 40)  # EXIF rotation applied
    assert_close(
        [out[k]["image_embedding"] for k in ("1", "2")], reference_image_embeddings(reference, [good, rotated])
    )


@pytest.mark.timeout(240)
def test_image_prefix_with_sidecar_captions(ray_local: None, bucket: S3Bucket, reference: Any) -> None:
    bodies = {"a.jpg": jpeg(20), "b.JPEG": jpeg(21), "sub/c.png": png_rgba(22), "bad.jpg": GARBAGE}
    for name, body in bodies.items():
        bucket.put(f"photos/{name}", body)
    bucket.put("photos/a.txt", b"  a caption for a \n")
    bucket.put("photos/sub/c.txt", b"caption c")
    bucket.put("photos/bad.txt", b"caption of a broken image")
    bucket.put("photos/notes.md", b"ignored: not an image")

    summary = run_job(
        job(
            bucket,
            input={"uri": bucket.uri("photos"), "format": "images"},
            output={"uri": bucket.uri("o"), "partition_by": ["status"]},
        )
    )
    assert (summary.rows_total, summary.rows_ok, summary.rows_error) == (4, 3, 1)
    assert any(k.startswith("o/status=error/") for k in bucket.keys("o"))
    ok = read_embeddings(bucket.uri("o"), filters=[("status", "=", "ok")], storage_options=bucket.storage_options)
    out = {row["source_uri"]: row for row in ok.to_pylist()}
    assert sorted(out) == sorted(bucket.uri(f"photos/{n}") for n in bodies if n != "bad.jpg")
    assert out[bucket.uri("photos/a.jpg")]["caption"] == "a caption for a"
    assert out[bucket.uri("photos/b.JPEG")]["caption"] is None
    assert out[bucket.uri("photos/sub/c.png")]["caption"] == "caption c"
    assert all(row["id"] == derive_id(uri) for uri, row in out.items())
    names = ["a.jpg", "b.JPEG", "sub/c.png"]
    assert_close(
        [out[bucket.uri(f"photos/{n}")]["image_embedding"] for n in names],
        reference_image_embeddings(reference, [bodies[n] for n in names]),
    )
    bad = read_embeddings(bucket.uri("o"), filters=[("status", "=", "error")], storage_options=bucket.storage_options)
    assert bad.column("caption").to_pylist() == ["caption of a broken image"]


def tar_shard(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


def img2dataset_meta(key: str, url: str, body: bytes, **extra: Any) -> str:
    """A sample's `.json` member as img2dataset writes it (json.dumps(meta, indent=4))."""
    width, height = Image.open(io.BytesIO(body)).size
    meta = {
        "url": url,
        **extra,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": width * 4,
        "original_height": height * 4,
        "exif": None,
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    return json.dumps(meta, indent=4)


@pytest.mark.timeout(240)
def test_webdataset_shards(ray_local: None, bucket: S3Bucket, reference: Any) -> None:
    """Hand-made members in one shard; img2dataset's layout, written by the `webdataset` package, in the other."""
    import webdataset

    images = {key: jpeg(40 + i) for i, key in enumerate(["s0", "s1", "000010000", "000010001"])}
    s1_json = json.dumps({"caption": "from json", "other": 1})
    shard0 = tar_shard(
        [
            ("s0.jpg", images["s0"]),
            ("s0.txt", b"first sample"),
            ("s1.jpg", images["s1"]),
            ("s1.json", s1_json.encode()),
            ("lonely.txt", b"a sample with no image"),
        ]
    )
    meta = {
        "000010000": img2dataset_meta("000010000", "http://example.com/a.jpg", images["000010000"], mine="kept"),
        "000010001": img2dataset_meta("000010001", "http://example.com/b.jpg", images["000010001"]),
    }
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer) as writer:
        writer.write({"__key__": "000010000", "jpg": images["000010000"], "txt": "last", "json": meta["000010000"]})
        writer.write({"__key__": "000010001", "jpg": images["000010001"], "json": meta["000010001"]})
    bucket.put("wds/shard-0000.tar", shard0)
    bucket.put("wds/00001.tar", buffer.getvalue())
    # img2dataset's per-shard metadata beside the tar: not a shard, ignored.
    bucket.put("wds/00001.parquet", b"PAR1 not read")
    bucket.put("wds/00001_stats.json", b"{}")

    summary = run_job(
        job(bucket, input={"uri": bucket.uri("wds"), "format": "webdataset"}, output={"uri": bucket.uri("o")})
    )
    assert (summary.rows_total, summary.rows_ok, summary.rows_error) == (5, 4, 1)
    table = read_embeddings(bucket.uri("o"), storage_options=bucket.storage_options)
    assert table.schema.field("json").type == pa.string()
    rows = {row["source_uri"]: row for row in table.to_pylist()}
    shard = {0: bucket.uri("wds/shard-0000.tar"), 1: bucket.uri("wds/00001.tar")}
    expected = {
        f"{shard[0]}#s0": ("first sample", None),
        f"{shard[0]}#s1": ("from json", s1_json),
        f"{shard[1]}#000010000": ("last", meta["000010000"]),
        f"{shard[1]}#000010001": (None, meta["000010001"]),
    }
    for uri, (caption, member) in expected.items():
        assert rows[uri]["status"] == "ok" and rows[uri]["caption"] == caption
        assert rows[uri]["id"] == derive_id(uri)
        assert rows[uri]["json"] == member  # the member's text, byte for byte
    carried = json.loads(rows[f"{shard[1]}#000010000"]["json"])
    assert carried["url"] == "http://example.com/a.jpg" and carried["mine"] == "kept"
    assert carried["original_width"] == 4 * 48
    lonely = rows[f"{shard[0]}#lonely"]
    assert lonely["status"] == "error" and lonely["error"].startswith("no image member")
    assert lonely["caption"] == "a sample with no image" and lonely["json"] is None
    uris = list(expected)
    assert_close(
        [rows[u]["image_embedding"] for u in uris],
        reference_image_embeddings(reference, [images[u.rsplit("#", 1)[1]] for u in uris]),
    )


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


@pytest.mark.timeout(240)
def test_hugging_face_image_parquet(ray_local: None, bucket: S3Bucket, reference: Any) -> None:
    """The layout `datasets` writes for an Image feature: struct<bytes, path>, bytes null when the path is a URI."""
    bodies = [jpeg(170 + i) for i in range(3)]
    remote = jpeg(175)
    remote_uri = bucket.put("elsewhere/remote.jpg", remote)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [
        {"bytes": bodies[0], "path": "cat.jpg"},
        {"bytes": bodies[1], "path": None},
        {"bytes": bodies[2], "path": "dog.png"},
        {"bytes": None, "path": remote_uri},
        {"bytes": GARBAGE, "path": "broken.jpg"},
        {"bytes": bodies[1], "path": None},  # the same image again, no caption: the same content-derived id
    ]
    table = pa.table(
        {
            "image": pa.array(images, image_type),
            "text": ["a cat", None, "a dog", "far away", "broken", None],
            "label": [0, 1, 2, 3, 4, 5],
        }
    )
    file_uri = bucket.put("hf/data/train-00000-of-00001.parquet", parquet_bytes(table))

    config = job(
        bucket, input={"uri": bucket.uri("hf/data"), "caption_column": "text"}, output={"uri": bucket.uri("o")}
    )
    # A handler on the module's own logger: Ray Data reconfigures the root logger's handlers when it first runs
    # in a process, so what reaches caplog through the root depends on which test ran first.
    warnings_seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings_seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("pipeline.input.duplicate_ids").addHandler(handler)
    try:
        summary = run_job(config)
    finally:
        logging.getLogger("pipeline.input.duplicate_ids").removeHandler(handler)
    assert (summary.rows_total, summary.rows_ok, summary.rows_error) == (6, 5, 1)
    out = {
        row["label"]: row
        for row in read_embeddings(bucket.uri("o"), storage_options=bucket.storage_options).to_pylist()
    }
    assert set(out[0]) >= {"id", "source_uri", "label", "caption", "status"} and "image" not in out[0]
    assert "path" not in out[0]  # Ray Data's file column is consumed, not written
    content_id = derive_id(f"sha256:{hashlib.sha256(bodies[1]).hexdigest()}")
    assert out[0]["source_uri"] == f"{file_uri}#cat.jpg"
    assert out[1]["source_uri"] == f"{file_uri}#{content_id}" and out[1]["id"] == content_id
    # Not checkable before the run without reading every image; reported after it, never silently.
    assert out[5]["id"] == content_id
    seen = " ".join(warnings_seen)
    assert f"1 ids occur more than once in {bucket.uri('o')}" in seen and repr(content_id) in seen
    assert out[2]["source_uri"] == f"{file_uri}#dog.png" and out[2]["caption"] == "a dog"
    assert out[3]["source_uri"] == remote_uri and out[3]["id"] == derive_id(remote_uri, ["far away"])
    assert out[4]["status"] == "error"
    assert out[4]["error"] == f"cannot decode image {file_uri}#broken.jpg: not an image format Pillow can read"
    assert out[0]["image_sha256"] == hashlib.sha256(bodies[0]).hexdigest()
    assert_close(
        [out[i]["image_embedding"] for i in range(4)], reference_image_embeddings(reference, [*bodies, remote])
    )


@pytest.mark.timeout(240)
def test_img2dataset_parquet_output(
    ray_local: None, bucket: S3Bucket, reference: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """img2dataset's `output_format=parquet`: its columns, the image in `jpg`, failed downloads with a null image."""
    bodies = {f"00000000{i}": jpeg(180 + i) for i in range(3)}
    rows = []
    for i, (key, body) in enumerate(bodies.items()):
        meta = json.loads(img2dataset_meta(key, f"http://example.com/{i}.jpg", body, caption=f"photo {i}"))
        rows.append({**meta, "jpg": body})
    failed = {
        "url": "http://example.com/gone.jpg",
        "caption": "gone",
        "key": "000000003",
        "status": "failed_to_download",
    }
    rows.append({**{name: None for name in rows[0]}, **failed, "error_message": "HTTP Error 404: Not Found"})
    schema = pa.schema(  # img2dataset's columns, in its order
        [
            ("url", pa.string()),
            ("caption", pa.string()),
            ("key", pa.string()),
            ("status", pa.string()),
            ("error_message", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("original_width", pa.int32()),
            ("original_height", pa.int32()),
            ("exif", pa.string()),
            ("sha256", pa.string()),
            ("jpg", pa.binary()),
        ]
    )
    file_uri = bucket.put("i2d/00000.parquet", parquet_bytes(pa.Table.from_pylist(rows, schema)))
    bucket.put("i2d/00000_stats.json", b"{}")  # written beside each shard; not a manifest

    config = job(
        bucket,
        input={"uri": bucket.uri("i2d"), "id_column": "key", "image_column": "jpg"},
        output={"uri": bucket.uri("o")},
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.input.sources"):
        summary = run_job(config)
    assert "manifest column 'status' has the name of an output column; it is written as 'input_status'" in [
        r.getMessage() for r in caplog.records
    ]
    assert (summary.rows_total, summary.rows_ok, summary.rows_error) == (4, 3, 1)
    out = by_id(read_embeddings(bucket.uri("o"), storage_options=bucket.storage_options))
    assert set(out) == {*bodies, "000000003"}
    for i, key in enumerate(bodies):
        row = out[key]
        assert row["status"] == "ok" and row["input_status"] == "success" and row["caption"] == f"photo {i}"
        assert row["source_uri"] == f"{file_uri}#{key}" and row["url"] == f"http://example.com/{i}.jpg"
        assert row["original_width"] == 4 * 48 and row["sha256"] == row["image_sha256"]
    gone = out["000000003"]
    assert gone["status"] == "error" and gone["error"] == "missing image bytes in column 'jpg'"
    assert gone["source_uri"] == f"{file_uri}#000000003"
    assert gone["input_status"] == "failed_to_download" and gone["error_message"] == "HTTP Error 404: Not Found"
    assert_close(
        [out[k]["image_embedding"] for k in bodies], reference_image_embeddings(reference, list(bodies.values()))
    )


@pytest.mark.timeout(240)
def test_optional_dense_features_in_float32(ray_local: None, tmp_path: Path, reference: Any) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    bodies = [jpeg(60 + i) for i in range(3)]
    for i, body in enumerate(bodies):
        (folder / f"{i}.jpg").write_bytes(body)
    (folder / "0.txt").write_text("short")
    (folder / "2.txt").write_text("a much longer caption with quite a few words in it")
    features = ["vision_features", "backbone_fpn", "language_features", "language_embeds", "sam2_backbone_fpn"]
    config = JobConfig.from_dict(
        {
            "input": {"uri": f"file://{folder}", "format": "images"},
            "output": {"uri": str(tmp_path / "out"), "features": features, "feature_dtype": "float32"},
            "model": {"config": "tiny", "imgsz": IMGSZ, "random_weights": True},
            "compute": {"batch_size": 2},
        }
    )
    run_job(config)
    table = read_embeddings(str(tmp_path / "out"))
    rows = {Path(r["source_uri"]).name: r for r in table.to_pylist()}
    grid = IMGSZ // 14
    schema = table.schema
    assert schema.field("image_embedding").type == pa.list_(pa.float32(), 32)
    assert schema.field("vision_features").type == pa.fixed_shape_tensor(pa.float32(), [32, grid, grid])
    for level, scale in enumerate((4, 2, 1)):
        side = grid * scale
        for prefix in ("", "sam2_"):
            assert schema.field(f"{prefix}backbone_fpn_{level}").type.shape == [32, side, side]
    assert schema.field("language_features").type == pa.fixed_shape_tensor(pa.float32(), [32, 32])
    assert schema.field("language_embeds").type.shape == [32, 64]
    assert schema.field("language_mask").type == pa.list_(pa.bool_(), 32)

    torch.manual_seed(0)
    with_sam2 = build_sam3_vl_backbone(None, config="tiny", imgsz=IMGSZ, add_sam2_neck=True)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in bodies]
    with torch.inference_mode():
        vision = with_sam2.forward_image(preprocess_images(images, IMGSZ))
        text = with_sam2.forward_text(["short", "a much longer caption with quite a few words in it"])
    column = table.column("vision_features").combine_chunks()
    order = [table.column("source_uri").to_pylist().index(str(folder / f"{i}.jpg")) for i in range(3)]
    dense = column.to_numpy_ndarray()[order]
    np.testing.assert_allclose(dense, vision["vision_features"].numpy(), atol=1e-5)
    fpn0 = table.column("sam2_backbone_fpn_0").combine_chunks().to_numpy_ndarray()[order]
    np.testing.assert_allclose(fpn0, vision["sam2_backbone_out"]["backbone_fpn"][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(rows["2.jpg"]["language_features"]).reshape(32, 32),
        text["language_features"][:, 1].numpy(),
        atol=1e-5,
    )
    assert rows["2.jpg"]["language_mask"] == text["language_mask"][1].tolist()
    assert rows["1.jpg"]["language_features"] is None and rows["1.jpg"]["language_mask"] is None
    # The same weights as the SAM-2-less reference: the extra neck does not change the SAM 3 features.
    assert_close([rows[f"{i}.jpg"]["image_embedding"] for i in range(3)], reference_image_embeddings(reference, bodies))


# Resume -------------------------------------------------------------------------------------------------------------


@pytest.fixture
def silent_http_server() -> Iterator[socket.socket]:
    """An HTTP endpoint that accepts connections and never answers: a fetch from it hangs until it closes."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield server
    finally:
        server.close()


def _committed_checkpoint_ids(bucket: S3Bucket, prefix: str) -> set[str]:
    ids: set[str] = set()
    for key in bucket.keys(prefix):
        if key.endswith(".parquet") and ".pending" not in key:
            body = bucket.client.get_object(Bucket=bucket.name, Key=key)["Body"].read()
            ids.update(pq.read_table(pa.BufferReader(body)).column("id").to_pylist())
    return ids


@pytest.mark.timeout(300)
def test_resume_after_an_interrupted_run(ray_local: None, bucket: S3Bucket, silent_http_server: socket.socket) -> None:
    """A run is killed while one record hangs; the rerun embeds only that record and duplicates nothing."""
    import ray

    # Exactly one CPU batch of finished records, so the stuck record never shares a batch with them.
    finished = {f"r{i}": bucket.put(f"img/{i}.jpg", jpeg(80 + i)) for i in range(PREPARE_BATCH_ROWS)}
    stuck_uri = f"http://127.0.0.1:{silent_http_server.getsockname()[1]}/stuck.jpg"
    bucket.put("m/a.jsonl", "\n".join(json.dumps({"id": k, "image": u}) for k, u in finished.items()).encode())
    bucket.put("m/b.jsonl", json.dumps({"id": "stuck", "image": stuck_uri}).encode())
    config = job(
        bucket,
        input={"uri": bucket.uri("m")},
        output={"uri": bucket.uri("o"), "min_rows_per_file": 2},
        compute={"batch_size": 2},
        resume_path=bucket.uri("ckpt"),
    )
    # Ray is not initialised in the child: run_job does it, joining this session's cluster through RAY_ADDRESS.
    script = (
        "import json, sys\n"
        "from pipeline import JobConfig, run_job\n"
        "run_job(JobConfig.from_dict(json.loads(sys.argv[1])))\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
    }
    first = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(config.to_dict())],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while _committed_checkpoint_ids(bucket, "ckpt") != set(finished):
            assert first.poll() is None, f"the first run ended by itself (status {first.returncode})"
            assert time.monotonic() < deadline, "the first run never checkpointed its finished rows"
            time.sleep(0.5)
        assert first.poll() is None  # still stuck on the silent server's record
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert "o/_SUCCESS" not in bucket.keys("o")

    # The stuck source now refuses connections: its record becomes an error row instead of hanging.
    silent_http_server.close()
    resumed = job(
        bucket,
        input={"uri": bucket.uri("m")},
        output={"uri": bucket.uri("o"), "min_rows_per_file": 2},
        compute={"batch_size": 2},
        resume_path=bucket.uri("ckpt"),
    )
    summary = run_job(resumed)
    assert summary.rows_this_run == 1
    total = PREPARE_BATCH_ROWS + 1
    assert (summary.rows_total, summary.rows_ok, summary.rows_error) == (total, total - 1, 1)
    out = by_id(read_embeddings(bucket.uri("o"), storage_options=bucket.storage_options))
    assert set(out) == {*finished, "stuck"}
    assert out["stuck"]["status"] == "error" and out["stuck"]["source_uri"] == stuck_uri

    # Running the finished job again adds nothing.
    again = run_job(resumed)
    assert again.rows_this_run == 0 and again.rows_total == total
    assert len(by_id(read_embeddings(bucket.uri("o"), storage_options=bucket.storage_options))) == total


@pytest.mark.timeout(60)
def test_progress_is_logged_periodically(ray_local: None, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.run.hosted import hosted
    from pipeline.run.progress import ProgressCounter, ProgressReporter

    counter = hosted(ProgressCounter)
    counter.add.remote(3, 1)
    reporter = ProgressReporter(counter, total=10, stream=io.StringIO(), interval_s=0.1)  # not a TTY: log lines
    with caplog.at_level(logging.INFO, logger="pipeline.run.progress"), reporter:
        deadline = time.monotonic() + 30
        while not any("rows 4/10 (40%): 3 ok, 1 error" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no progress line was logged"
            time.sleep(0.05)
    assert "rows/s, ETA " in caplog.records[-1].getMessage()


@pytest.mark.timeout(60)
def test_progress_rate_leaves_out_the_start_up_once_a_second_batch_is_done(ray_local: None) -> None:
    import ray

    from pipeline.run.hosted import hosted
    from pipeline.run.progress import ProgressCounter

    counter = hosted(ProgressCounter)
    assert ray.get(counter.snapshot.remote()).steady_rows_per_s is None  # the counter is up: its clock runs
    time.sleep(1.0)  # start-up: the model is being built
    ray.get(counter.add.remote(4, 0))
    first = ray.get(counter.snapshot.remote())
    assert first.steady_rows_per_s is None and first.current_rows_per_s == first.rows_per_s
    time.sleep(0.5)
    ray.get(counter.add.remote(3, 1))
    snapshot = ray.get(counter.snapshot.remote())
    snapshot.total = 28
    assert snapshot.rows_after_first == 4 and 0.5 <= snapshot.seconds_after_first < 5
    steady = snapshot.steady_rows_per_s
    assert steady is not None and steady > snapshot.rows_per_s  # the 1 s of start-up is left out
    assert snapshot.eta_s() == pytest.approx(20 / steady)
    assert f"{steady:.2f} rows/s" in snapshot.line()


@pytest.mark.timeout(60)
def test_progress_is_rewritten_in_place_on_a_terminal(ray_local: None) -> None:
    import os
    import pty
    import select

    from pipeline.run.hosted import hosted
    from pipeline.run.progress import ProgressCounter, ProgressReporter

    counter = hosted(ProgressCounter)
    counter.add.remote(5, 0)
    import ray

    ray.get(counter.snapshot.remote())  # the counter is up: updates come every interval from now on
    leader, follower = pty.openpty()
    with open(follower, "w", closefd=True) as terminal:
        reporter = ProgressReporter(counter, total=20, stream=terminal, interval_s=0.1)
        assert reporter.in_place
        with reporter:
            time.sleep(1.5)
        shown = b""
        while select.select([leader], [], [], 0.5)[0]:  # everything written so far; one read may return a part
            shown += os.read(leader, 65536)
    os.close(leader)
    shown = shown.decode()
    updates = [part for part in shown.split("\r") if part.strip()]
    assert len(updates) >= 2 and all(u.strip().startswith("rows 5/20 (25%): 5 ok, 0 error") for u in updates)
    assert "ETA" in updates[0] and shown.endswith("\n")  # a newline once done, so later lines start clean


@pytest.mark.timeout(240)
def test_resume_after_a_kill_between_data_file_and_checkpoint_commit(ray_local: None, bucket: S3Bucket) -> None:
    """The first rerun after a kill between writing a data file and committing its checkpoint succeeds.

    Ray Data writes `<id>.pending.parquet`, then the data file, then renames the pending entry; a kill between the
    last two leaves exactly the state built here from a finished run: one entry pending again and no commit markers.
    On restart a Ray task deletes that data file and the pending entry; the driver must then list the checkpoint
    directory afresh (a cached listing still showed the deleted entry and the rerun failed with FileNotFoundError).
    """
    for part in range(2):
        uris = [bucket.put(f"img/{part}-{i}.jpg", jpeg(140 + 3 * part + i)) for i in range(3)]
        lines = ["id,image"] + [f"p{part}r{i},{uri}" for i, uri in enumerate(uris)]
        bucket.put(f"m/part-{part}.csv", "\n".join(lines).encode())
    config = job(
        bucket,
        input={"uri": bucket.uri("m")},
        output={"uri": bucket.uri("o"), "min_rows_per_file": 1},
        resume_path=bucket.uri("ckpt"),
    )
    first = run_job(config)
    assert first.rows_total == 6

    committed = [k for k in bucket.keys("ckpt") if k.endswith(".parquet")]
    assert committed and not any(".pending" in k for k in committed)
    victim = committed[0]
    pending_ids = set(pq.read_table(pa.BufferReader(bucket.get(victim))).column("id").to_pylist())
    bucket.client.copy_object(
        Bucket=bucket.name, Key=victim.replace(".parquet", ".pending.parquet"), CopySource=f"{bucket.name}/{victim}"
    )
    bucket.client.delete_object(Bucket=bucket.name, Key=victim)
    for key in ("o/_SUCCESS", "o/_summary.json"):
        bucket.client.delete_object(Bucket=bucket.name, Key=key)

    rerun = run_job(config)
    assert rerun.rows_this_run == len(pending_ids) and rerun.rows_total == 6
    out = by_id(read_embeddings(bucket.uri("o"), storage_options=bucket.storage_options))
    assert set(out) == {f"p{part}r{i}" for part in range(2) for i in range(3)}
    assert not any(".pending" in k for k in bucket.keys("ckpt"))
