"""Pipeline pieces that need no Ray: decoding, source rows, ids, commit markers, the checkpoint cache, Arrow output."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import threading
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.dataset import schema
from pipeline.dataset.markers import committed_files, write_markers
from pipeline.input.decode import decode_image, load_rgb
from pipeline.input.ids import derive_id
from pipeline.input.manifest_layout import manifest_kind
from pipeline.input.records import PrepareSettings, prepare_batch
from pipeline.input.sources import SourceSpec, clean_captions, describe_block
from pipeline.model.arrow_features import ragged, tensors, vectors
from pipeline.model.model_cache import local_checkpoint
from pipeline.storage import parse_uri
from tests.s3_bucket import S3Bucket

IMGSZ = 56


def _jpeg(width: int, height: int, *, orientation: int | None = None, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    if orientation is None:
        image.save(buffer, "JPEG")
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# Decoding ---------------------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied_before_recording_size() -> None:
    decoded = decode_image(_jpeg(40, 20, orientation=6), IMGSZ)  # 6: rotate 90 degrees to display
    assert decoded.error is None
    assert (decoded.width, decoded.height) == (20, 40)
    assert decoded.pixels is not None and len(decoded.pixels) == IMGSZ * IMGSZ * 3


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "1", "I;16", "I", "F"])
def test_every_pillow_mode_becomes_rgb(mode: str) -> None:
    gradient = np.tile(np.linspace(0, 1, 16, dtype=np.float32), (12, 1))
    if mode in ("I;16", "I"):
        image = Image.fromarray((gradient * 60000).astype(np.uint16 if mode == "I;16" else np.int32))
        image = image if image.mode == mode else image.convert(mode)
    elif mode == "F":
        image = Image.fromarray(gradient * 7.5 - 2.0, mode="F")
    else:
        image = Image.fromarray((gradient * 255).astype(np.uint8), mode="L").convert(mode)
    fmt = "TIFF" if mode in ("I;16", "I", "F", "CMYK") else "PNG"
    rgb = load_rgb(_encoded(image, fmt))
    assert rgb.mode == "RGB" and rgb.size == (16, 12)
    row = np.asarray(rgb)[0, :, 0].astype(int)
    if mode != "1":
        # Wide samples are rescaled, not clipped: the gradient survives from dark to bright.
        assert row[0] < 40 and row[-1] > 200, row


def test_transparent_pixels_are_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(load_rgb(_encoded(rgba, "PNG")))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not an image at all", "cannot decode image s3://b/x.jpg: not an image format Pillow can read"),
        (_jpeg(64, 64)[:300], "cannot decode image s3://b/x.jpg: OSError: "),
        (b"", "empty image file"),
        (None, "no image bytes"),
    ],
)
def test_undecodable_bytes_become_a_reason(data: bytes | None, reason: str) -> None:
    decoded = decode_image(data, IMGSZ, "s3://b/x.jpg")
    assert decoded.pixels is None and decoded.error is not None and decoded.error.startswith(reason)
    assert " at 0x" not in decoded.error
    if data:
        assert decoded.sha256 == hashlib.sha256(data).hexdigest()


# Sources and records ------------------------------------------------------------------------------------------------


def test_clean_captions() -> None:
    assert clean_captions("  a dog ") == ["a dog"]
    assert clean_captions("   ") is None
    assert clean_captions(None) is None
    assert clean_captions(float("nan")) is None
    assert clean_captions(["a", "", None, " b "]) == ["a", "b"]
    assert clean_captions([]) is None
    assert clean_captions('["x", "y"]', parse_json_list=True) == ["x", "y"]
    assert clean_captions('["x", "y"]') == ['["x", "y"]']


def test_manifest_kind_requires_one_format() -> None:
    assert manifest_kind(["a/x.parquet", "a/y.pq", "a/readme.md"]) == ("parquet", ["a/x.parquet", "a/y.pq"])
    assert manifest_kind(["m.jsonl.gz"]) == ("json", ["m.jsonl.gz"])
    assert manifest_kind(["m.json", "n.json"]) == ("json", ["m.json", "n.json"])
    # img2dataset's output: Parquet shards with a statistics file each.
    assert manifest_kind(["00000.parquet", "00000_stats.json"]) == ("parquet", ["00000.parquet"])
    with pytest.raises(ValueError, match="one format"):
        manifest_kind(["a.csv", "b.parquet"])
    with pytest.raises(ValueError, match="no manifest files"):
        manifest_kind(["a.jpg"])


def test_manifest_rows_get_ids_and_problems() -> None:
    spec = SourceSpec(format="manifest", protocol="s3", caption_column="text")
    table = pa.table(
        {
            "id": [7, None, None, None],
            "image": ["s3://b/a.jpg", "s3://b/a.jpg", "relative/b.jpg", None],
            "text": ["x", "y", None, "z"],
            "split": ["train", "val", "val", "val"],
        }
    )
    records = describe_block(table, spec)
    assert records.ids[0] == "7"
    assert records.ids[1] == derive_id("s3://b/a.jpg", ["y"])
    assert len(set(records.ids)) == 4
    assert records.problems[0] is None and records.problems[1] is None
    assert "relative" in records.problems[2]
    assert "missing image URI" in records.problems[3]
    assert records.passthrough is not None and records.passthrough.column_names == ["split"]


def test_manifest_columns_clashing_with_outputs_are_kept_under_a_prefix(caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.input.sources import log_renamed_columns, output_names

    spec = SourceSpec(format="manifest", protocol="file")
    table = pa.table(
        {
            "image": ["/x.jpg"],
            "status": ["keep"],
            "error": ["none"],
            "input_error": ["taken"],
            "image_embedding": [1.5],
            "score": [0.5],
        }
    )
    records = describe_block(table, spec)
    assert records.passthrough is not None
    assert records.passthrough.to_pylist() == [
        {
            "input_status": "keep",
            "input_input_error": "none",  # input_error is the manifest's own column: prefixed again
            "input_error": "taken",
            "input_image_embedding": 1.5,
            "score": 0.5,
        }
    ]
    assert output_names(["id", "image", "caption", "status"], spec) == [("status", "input_status")]
    with caplog.at_level(logging.WARNING, logger="pipeline.input.sources"):
        from pipeline.input.manifest_layout import ManifestLayout

        log_renamed_columns(spec, ManifestLayout("parquet", ["m.parquet"], table.schema))
    messages = [r.getMessage() for r in caplog.records]
    assert "manifest column 'status' has the name of an output column; it is written as 'input_status'" in messages
    assert len(messages) == 3


def test_manifest_rows_holding_image_bytes() -> None:
    """A binary column and the Hugging Face image struct: bytes, or a path to fetch when the bytes are null."""
    body = _jpeg(10, 8)
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array(
                [
                    {"bytes": body, "path": "cat.jpg"},
                    {"bytes": None, "path": "s3://b/dog.jpg"},
                    {"bytes": body, "path": None},
                    {"bytes": None, "path": None},
                ],
                struct,
            ),
            "path": ["b/m/train-0.parquet"] * 4,  # what Ray Data's include_paths adds
            "caption": ["a cat", None, None, "x"],
        }
    )
    spec = SourceSpec(format="manifest", protocol="s3", image_bytes=True, file_column="path", input_uri="s3://b/m")
    records = describe_block(table, spec)
    content = f"sha256:{hashlib.sha256(body).hexdigest()}"
    assert records.ids[0] == derive_id(content, ["a cat"]) and records.ids[2] == derive_id(content)
    assert records.ids[1] == derive_id("s3://b/dog.jpg")
    assert records.source_uris == [
        "s3://b/m/train-0.parquet#cat.jpg",
        "s3://b/dog.jpg",
        f"s3://b/m/train-0.parquet#{records.ids[2]}",
        f"s3://b/m/train-0.parquet#{records.ids[3]}",  # no image: the row is still named
    ]
    assert records.image_bytes[0] == body and records.image_bytes[1] is None
    assert records.image_locations[1] is not None and records.image_locations[1].uri == "s3://b/dog.jpg"
    assert records.problems[:3] == [None, None, None]
    assert records.problems[3] == "missing image bytes in column 'image'"
    assert records.passthrough is None  # the image and Ray's path column are consumed

    binary = pa.table({"key": ["k0", "k1"], "jpg": pa.array([body, None], pa.binary()), "status": ["success", "x"]})
    spec = SourceSpec(format="manifest", protocol="file", id_column="key", image_column="jpg", image_bytes=True)
    spec = dataclasses.replace(spec, input_uri="/data/shards")
    records = describe_block(binary, spec)
    assert records.ids == ["k0", "k1"] and records.source_uris[0] == "/data/shards#k0"
    assert records.problems == [None, "missing image bytes in column 'jpg'"]
    assert records.passthrough is not None and records.passthrough.column_names == ["input_status"]


def test_holds_image_bytes_reads_the_column_type() -> None:
    from pipeline.input.manifest_layout import holds_image_bytes

    hf = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("a", pa.binary()), ("b", hf), ("c", pa.string()), ("d", pa.large_binary())])
    assert [holds_image_bytes(schema, c) for c in ("a", "b", "c", "d", "missing")] == [True, True, False, True, False]


def test_webdataset_json_members_are_carried_as_text() -> None:
    import pandas as pd

    document = json.dumps({"url": "http://x/1.jpg", "original_width": 640, "mine": [1, 2]}, indent=4)
    block = pd.DataFrame(
        {
            "__key__": ["000000000", "000000001"],
            "__url__": ["/shards/00000.tar", "/shards/00000.tar"],
            "jpg": [_jpeg(8, 8), _jpeg(8, 8)],
            "txt": [b"a caption", b"another"],
            "json": [document.encode(), None],
        }
    )
    records = describe_block(block, SourceSpec(format="webdataset", protocol="file"))
    assert records.passthrough is not None
    assert records.passthrough.column(schema.WEBDATASET_JSON).to_pylist() == [document, None]
    assert records.captions == [["a caption"], ["another"]]


def test_prepare_batch_marks_every_failure_and_keeps_every_row(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg(30, 20))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\x00garbage")
    spec = SourceSpec(format="manifest", protocol="file", captions_column="captions", caption_column=None)
    table = pa.table(
        {
            "image": [str(good), str(garbage), str(tmp_path / "missing.jpg"), str(good)],
            "captions": [["one", "two"], ["three"], None, []],
        }
    )
    settings = PrepareSettings(source=spec, imgsz=IMGSZ, context_length=32, bpe_path=None, storage_options=None)
    out = prepare_batch(table, settings)
    assert out.column(schema.STATUS).to_pylist() == ["ok", "error", "error", "ok"]
    errors = out.column(schema.ERROR).to_pylist()
    assert (
        errors[0] is None
        and errors[1] == f"cannot decode image {garbage}: not an image format Pillow can read"
        and errors[2].startswith("image not found")
    )
    tokens = out.column(schema.TOKENS).to_pylist()
    assert len(tokens[0]) == 2 and len(tokens[0][0]) == 32
    assert tokens[1] is None and tokens[2] is None and tokens[3] is None
    assert out.column(schema.CAPTIONS).to_pylist() == [["one", "two"], ["three"], None, None]
    assert out.column(schema.IMAGE_WIDTH).to_pylist() == [30, None, None, 30]


# Arrow output -------------------------------------------------------------------------------------------------------


def test_arrow_feature_builders_keep_nulls_and_shapes() -> None:
    values = np.arange(12, dtype=np.float16).reshape(3, 4)
    valid = np.array([True, False, True])
    column = vectors(values, valid)
    assert column.type == pa.list_(pa.float16(), 4)
    assert column.to_pylist()[1] is None and column.to_pylist()[2] == [8, 9, 10, 11]
    maps = tensors(np.zeros((3, 2, 2, 2), np.float32), valid)
    assert maps.type.shape == [2, 2, 2] and maps.null_count == 1
    grouped = ragged(vectors(values, np.ones(3, bool)), [2, 0, 1], np.array([True, False, True]))
    assert [None if r is None else len(r) for r in grouped.to_pylist()] == [2, None, 1]


# Commit markers -----------------------------------------------------------------------------------------------------


def test_markers_decide_which_partitions_readers_see(tmp_path: Path) -> None:
    for part in ("split=a", "split=b"):
        (tmp_path / part).mkdir()
        pq.write_table(pa.table({"id": [part]}), tmp_path / part / "f.parquet")
    root = parse_uri(str(tmp_path))
    files, marked = committed_files(root)
    assert len(files) == 2 and not marked  # no markers at all: everything is visible
    (tmp_path / "split=a" / schema.SUCCESS_FILE).write_bytes(b"")
    files, marked = committed_files(root)
    assert marked and [Path(f).parent.name for f in files] == ["split=a"]
    write_markers(root)
    files, _ = committed_files(root)
    assert len(files) == 2 and (tmp_path / schema.SUCCESS_FILE).exists()


def test_staging_areas_are_invisible_to_readers(tmp_path: Path) -> None:
    staged = tmp_path / "_staging" / "split=c" / "data"
    staged.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["staged"]}), staged / "f.parquet")
    (staged / schema.SUCCESS_FILE).write_bytes(b"")  # a finished run inside a staging area, not yet committed
    (tmp_path / "split=a").mkdir()
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "split=a" / "f.parquet")
    files, marked = committed_files(parse_uri(str(tmp_path)))
    assert not marked and [Path(f).parent.name for f in files] == ["split=a"]


# Checkpoint cache ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_remote_checkpoint_is_copied_once_and_hashed(
    s3_server: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SAM3_EMBED_CACHE", str(tmp_path / "cache"))
    payload = np.random.default_rng(1).bytes(300_000)
    boto3.client("s3", endpoint_url=s3_server).put_object(Bucket=s3_bucket, Key="ckpt/model.pt", Body=payload)
    options = {"client_kwargs": {"endpoint_url": s3_server}}
    results = []

    def resolve() -> None:
        results.append(local_checkpoint(f"s3://{s3_bucket}/ckpt/model.pt", options))

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({r.path for r in results}) == 1
    assert all(r.sha256 == hashlib.sha256(payload).hexdigest() for r in results)
    assert Path(results[0].path).read_bytes() == payload
    cached = list((tmp_path / "cache").rglob("model.pt"))
    assert len(cached) == 1 and not list((tmp_path / "cache").rglob(".partial-*"))
    assert local_checkpoint(None).path is None
    assert local_checkpoint("hf://facebook/sam3").path == "hf://facebook/sam3"


# Model stage --------------------------------------------------------------------------------------------------------


def _prepared_batch(tmp_path: Path, missing_at: int | None = 1, rows: int = 3) -> pa.Table:
    paths = []
    for i in range(rows):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(_jpeg(30 + i, 20, seed=i))
    images = [str(p) for p in paths]
    if missing_at is not None:
        images.insert(missing_at, str(tmp_path / "gone.jpg"))
    spec = SourceSpec(format="manifest", protocol="file")
    return prepare_batch(
        pa.table({"image": images}),
        PrepareSettings(source=spec, imgsz=IMGSZ, context_length=32, bpe_path=None, storage_options=None),
    )


def _embed_settings(
    compile: str,
    features: tuple[str, ...],
    batch_size: int,
    dtype: str = "float32",
    feature_dtype: str = "float32",
    expected_rows: int | None = None,
):
    from pipeline.model.embed import EmbedSettings

    return EmbedSettings(
        checkpoint=None,
        model_config="tiny",
        imgsz=IMGSZ,
        dtype=dtype,
        compile=compile,
        bpe_path=None,
        features=features,
        feature_dtype=feature_dtype,
        multi_caption=False,
        batch_size=batch_size,
        expected_rows=expected_rows,
    )


def test_a_cpu_actor_with_too_few_rows_to_pay_for_compiling_runs_eagerly(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from pipeline.model.embed import EmbedWorker, compile_choice

    pooled_only = ("image_embedding", "text_embedding")
    # bfloat16 with compile auto is what a CPU with native bfloat16 compiles; 8 rows of tiny are far too few
    with caplog.at_level(logging.INFO, logger="pipeline.model.embed"):
        worker = EmbedWorker(_embed_settings("auto", pooled_only, batch_size=4, dtype="bfloat16", expected_rows=8))
    assert not worker.compiled and worker.compile_outcome is None
    assert json.loads(worker.metadata[schema.METADATA_KEY])["model"]["compile"] == "eager"
    assert "eager: 8 rows at most" in caplog.text and "compiling pays from 20" in caplog.text
    # an explicit choice is kept whatever the rows; unknown rows compile as auto always did
    assert compile_choice(_embed_settings("on", pooled_only, 4, expected_rows=8), torch.device("cpu")) == ("on", None)
    assert compile_choice(_embed_settings("auto", pooled_only, 4), torch.device("cpu")) == ("auto", None)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_model_stage_warms_up_once_and_never_recompiles_on_a_short_last_batch(tmp_path: Path) -> None:
    import torch

    from pipeline.model.embed import EmbedWorker

    prepared = _prepared_batch(tmp_path)  # 4 rows, 3 decodable: shorter than the batch size
    pooled_only = ("image_embedding", "text_embedding")
    compiled = EmbedWorker(_embed_settings("on", pooled_only, batch_size=4))
    assert compiled.compiled and compiled.vision_only and compiled.warm_up_seconds > 0
    metadata = json.loads(compiled.metadata[schema.METADATA_KEY])
    assert metadata["model"]["compile"] == "inductor (freezing=True)"
    # compilation happened in the warm-up, at batch size 4; a short batch must be padded, not compiled again
    with torch._dynamo.config.patch(error_on_recompile=True):
        short = compiled(prepared)
        full = compiled(_prepared_batch(tmp_path, missing_at=None, rows=4))
    assert short.column(schema.STATUS).to_pylist() == ["ok", "error", "ok", "ok"]
    assert full.column(schema.STATUS).to_pylist() == ["ok"] * 4
    # the same rows through the eager model and the full neck (forward_image) give the same embeddings
    eager = EmbedWorker(_embed_settings("off", (*pooled_only, "backbone_fpn"), batch_size=4))
    assert not eager.compiled and not eager.vision_only
    expected = eager(prepared).column("image_embedding").to_pylist()
    actual = short.column("image_embedding").to_pylist()
    assert actual[1] is None and expected[1] is None
    np.testing.assert_allclose(
        np.asarray([actual[i] for i in (0, 2, 3)]), np.asarray([expected[i] for i in (0, 2, 3)]), atol=1e-4
    )


def test_a_loaded_library_that_fails_mid_run_is_named_in_the_metadata_of_what_follows(tmp_path: Path) -> None:
    """An installed package runs no warm-up call, so its first failure can come in a real batch: the rows are
    computed eagerly and every batch from then on says why (the run summary reads it from the files)."""
    import torch

    from pipeline.model.embed import EmbedWorker
    from sam3core.aot_package import PackagedCall, _signature

    pooled_only = ("image_embedding", "text_embedding")
    worker = EmbedWorker(_embed_settings("off", pooled_only, batch_size=4))
    eager = worker(_prepared_batch(tmp_path)).column("image_embedding").to_pylist()
    assert json.loads(worker.metadata[schema.METADATA_KEY])["model"]["compile_fallback"] is None

    def library(images: torch.Tensor) -> torch.Tensor:  # stands for a library that loaded but cannot run here
        raise RuntimeError("run_func_( container_handle_, ...) API call failed")

    trunk = worker.backbone.vision_backbone.trunk
    padded = torch.zeros(4, 3, IMGSZ, IMGSZ)  # what the trunk gets once batches are padded, as compiled ones are
    trunk._compiled_call_impl = PackagedCall(library, trunk, "trunk", _signature((padded,), {}))
    worker.compiled = True
    with pytest.warns(RuntimeWarning, match="trunk's compiled library failed, running it eagerly"):
        out = worker(_prepared_batch(tmp_path))
    assert out.column(schema.STATUS).to_pylist() == ["ok", "error", "ok", "ok"]  # eager computed the rows
    np.testing.assert_allclose(
        np.asarray([out.column("image_embedding")[i].as_py() for i in (0, 2, 3)]),
        np.asarray([eager[i] for i in (0, 2, 3)]),
        atol=1e-5,
    )
    reason = json.loads(out.schema.metadata[schema.METADATA_KEY])["model"]["compile_fallback"]
    assert reason == "trunk: RuntimeError: run_func_( container_handle_, ...) API call failed"


def test_pixel_array_reads_the_arrow_buffer_without_per_row_bytes() -> None:
    from pipeline.model.embed import pixel_array

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(4)]
    values = [images[0].tobytes(), None, images[1].tobytes(), images[2].tobytes(), images[3].tobytes()]
    column = pa.chunked_array([pa.array(values[:2], pa.binary()), pa.array(values[2:], pa.binary())])
    rows = np.array([0, 2, 3, 4])
    np.testing.assert_array_equal(pixel_array(column, rows, 4), np.stack(images))
    # a sliced array (non-zero offset) and a gap between rows
    sliced = pa.array(values, pa.large_binary()).slice(2)
    np.testing.assert_array_equal(pixel_array(sliced, np.array([0, 2]), 4), np.stack([images[1], images[3]]))
    with pytest.raises(ValueError, match="27 bytes"):
        pixel_array(column, rows, 4 - 1)


def test_model_stage_pads_short_batches_for_a_compiled_trunk_without_changing_results(tmp_path: Path) -> None:
    from pipeline.model.embed import EmbedWorker

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(_jpeg(30 + i, 20, seed=i))
    spec = SourceSpec(format="manifest", protocol="file")
    manifest = pa.table({"image": [str(paths[0]), str(tmp_path / "gone.jpg"), str(paths[1]), str(paths[2])]})
    prepared = prepare_batch(
        manifest, PrepareSettings(source=spec, imgsz=IMGSZ, context_length=32, bpe_path=None, storage_options=None)
    )
    settings = _embed_settings("off", ("image_embedding", "text_embedding", "backbone_fpn"), batch_size=8)
    worker = EmbedWorker(settings)
    plain = worker(prepared)
    worker.compiled = True  # as on a GPU: short batches get padded to batch_size
    padded = worker(prepared)
    assert plain.column_names == padded.column_names
    assert schema.PIXELS not in plain.column_names and schema.TOKENS not in plain.column_names
    for name in ("image_embedding", "backbone_fpn_0"):
        a = plain.column(name).to_pylist()
        b = padded.column(name).to_pylist()
        assert a[1] is None and b[1] is None  # the error row passes through without features
        ok_rows = (0, 2, 3)
        np.testing.assert_allclose(np.asarray([a[i] for i in ok_rows]), np.asarray([b[i] for i in ok_rows]), atol=1e-6)
    assert plain.column(schema.STATUS).to_pylist() == ["ok", "error", "ok", "ok"]


def test_an_actor_told_no_row_has_a_caption_builds_no_text_encoder_until_a_caption_comes(tmp_path: Path) -> None:
    from pipeline.model.embed import EmbedWorker

    path = tmp_path / "0.jpg"
    path.write_bytes(_jpeg(30, 20, seed=0))
    spec = SourceSpec(format="manifest", protocol="file", caption_column=None)
    assert not spec.has_captions
    without = pa.table({"image": [str(path), str(path)]})
    settings = PrepareSettings(source=spec, imgsz=IMGSZ, context_length=32, bpe_path=None, storage_options=None)
    features = ("image_embedding", "text_embedding")
    lean = EmbedWorker(dataclasses.replace(_embed_settings("off", features, batch_size=4), captions=False))
    whole = EmbedWorker(_embed_settings("off", features, batch_size=4))
    assert lean.backbone.pending_weights() == ["text"]
    assert all(p.is_meta for p in lean.backbone.language_backbone.parameters())
    out = lean(prepare_batch(without, settings))
    assert lean.backbone.pending_weights() == ["text"]  # images alone never need it
    assert (
        out.column("image_embedding").to_pylist()
        == whole(prepare_batch(without, settings)).column("image_embedding").to_pylist()
    )
    # a caption after all (the driver was wrong): the text encoder is made, from the same seed, and embeds it
    spec = SourceSpec(format="manifest", protocol="file", caption_column="caption")
    settings = dataclasses.replace(settings, source=spec)
    captioned = pa.table({"image": [str(path)], "caption": ["a small red square"]})
    late = lean(prepare_batch(captioned, settings)).column("text_embedding").to_pylist()
    assert lean.backbone.pending_weights() == []
    assert late == whole(prepare_batch(captioned, settings)).column("text_embedding").to_pylist()


@pytest.mark.parametrize(
    ("spec", "captions"),
    [
        (SourceSpec(format="manifest", protocol="file"), True),
        (SourceSpec(format="manifest", protocol="file", caption_column=None), False),
        (SourceSpec(format="manifest", protocol="file", caption_column=None, captions_column="texts"), True),
        (SourceSpec(format="images", protocol="file", caption_column=None), True),  # sidecar .txt files
        (SourceSpec(format="webdataset", protocol="file", caption_column=None), True),  # .txt members
    ],
)
def test_whether_any_row_can_carry_a_caption(spec: SourceSpec, captions: bool) -> None:
    assert spec.has_captions is captions


def test_object_store_listings_are_never_cached(bucket: S3Bucket) -> None:
    """Files another process adds or deletes show up at the next listing (resume checkpoints, markers, leases)."""
    from pipeline.storage import Location, fsspec_filesystem

    root = Location.parse(bucket.uri("ckpt"), bucket.storage_options)
    bucket.put("ckpt/a.pending.parquet", b"x")
    assert root.files() == ["a.pending.parquet"]
    fs = fsspec_filesystem("s3", bucket.storage_options)
    assert fs.find(root.path) == [f"{root.path}/a.pending.parquet"]
    bucket.client.delete_object(Bucket=bucket.name, Key="ckpt/a.pending.parquet")  # as a Ray task would
    bucket.put("ckpt/a.parquet", b"y")
    assert root.files() == ["a.parquet"] and fs.find(root.path) == [f"{root.path}/a.parquet"]
    assert root.join("a.parquet").exists() and not root.join("a.pending.parquet").exists()
    assert root.join("a.parquet").uri == bucket.uri("ckpt/a.parquet")


def test_error_reasons_carry_no_object_addresses() -> None:
    from PIL import UnidentifiedImageError

    from pipeline.input.decode import error_reason

    raw = UnidentifiedImageError("cannot identify image file <_io.BytesIO object at 0x7f3a2b1c0d90>")
    assert error_reason(raw) == "not an image format Pillow can read"
    wrapped = OSError("read failed on <s3fs.core.S3File object at 0x7f00deadbeef>: connection reset")
    assert error_reason(wrapped) == "OSError: read failed on: connection reset"


@pytest.mark.parametrize("feature_dtype", ["float16", "float32"])
def test_trunk_maps_beyond_float16_range_fail_their_rows_instead_of_storing_inf(
    tmp_path: Path, feature_dtype: str
) -> None:
    import torch

    from pipeline.model.embed import EmbedWorker

    path = tmp_path / "0.jpg"
    path.write_bytes(_jpeg(30, 20))
    spec = SourceSpec(format="manifest", protocol="file")
    manifest = pa.table({"image": [str(path), str(tmp_path / "gone.jpg")], "caption": ["a cat", "a dog"]})
    prepared = prepare_batch(
        manifest, PrepareSettings(source=spec, imgsz=IMGSZ, context_length=32, bpe_path=None, storage_options=None)
    )
    features = ("image_embedding", "text_embedding", "trunk", "language_features")
    settings = _embed_settings("off", features, batch_size=2, feature_dtype=feature_dtype)
    worker = EmbedWorker(settings)
    # The last block writes 1e5 into every channel of the residual stream: a real float32 map float16 cannot hold.
    last = worker.backbone.vision_backbone.trunk.blocks[-1]
    with torch.no_grad():
        last.mlp.fc2.bias.fill_(1e5)
    out = worker(prepared)
    width, grid = worker.backbone.config.vision.width, IMGSZ // 14
    assert out.schema.field("trunk").type == pa.fixed_shape_tensor(
        pa.from_numpy_dtype(feature_dtype), [width, grid, grid]
    )
    assert out.column(schema.STATUS).to_pylist()[1] == "error"  # the missing file keeps its own reason
    assert "not found" in out.column(schema.ERROR).to_pylist()[1]
    if feature_dtype == "float16":
        assert out.column(schema.STATUS).to_pylist() == ["error", "error"]
        assert "trunk has values beyond float16's range" in out.column(schema.ERROR).to_pylist()[0]
        assert "output.feature_dtype: float32" in out.column(schema.ERROR).to_pylist()[0]
        for name in ("trunk", "image_embedding", "text_embedding", "language_features"):
            assert out.column(name).to_pylist()[0] is None, name
    else:
        assert out.column(schema.STATUS).to_pylist() == ["ok", "error"]
        trunk = out.column("trunk").combine_chunks()[:1].to_numpy_ndarray()[0]
        assert np.isfinite(trunk).all() and np.abs(trunk).max() > 9e4


def test_model_actor_threads_take_the_node_on_cpu_only_clusters() -> None:
    from pipeline.config import JobConfig
    from pipeline.run.job import actor_cpus, actor_threads

    job = JobConfig.from_dict({"compute": {"num_actors": 1}})
    # a 2-core laptop: Ray reserves one CPU for the actor (the other schedules decoding), torch uses both
    assert actor_cpus(job, 2.0) == 1.0 and actor_threads(job, 2.0, 1, 0.0) == 2
    # two actors on each of two 16-CPU nodes: 8 threads each
    four = JobConfig.from_dict({"compute": {"num_actors": 4}})
    assert actor_threads(four, 32.0, 2, 0.0) == 8
    # GPU actors keep Ray's default; an explicit setting wins
    assert actor_threads(job, 2.0, 1, 1.0) is None
    pinned = JobConfig.from_dict({"compute": {"threads_per_actor": 1}})
    assert actor_threads(pinned, 2.0, 1, 0.0) == 1
