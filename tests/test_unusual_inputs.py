"""Unusual input that must lose nothing: text that is not UTF-8, and columns named right but typed wrong.

The end-to-end runs use local files, the tiny model at 56 px and random weights on the shared local Ray cluster.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import JobConfig, read_embeddings, run_job
from pipeline.input.ids import derive_id
from pipeline.input.utf8 import replace_invalid_utf8
from pipeline.run.preflight import PreflightError, preflight

BAD = b"bad \xff\xfe utf8 \xc3( bytes"
BAD_READ = BAD.decode("utf-8", errors="replace")  # what the row's caption must become
CAPTIONS = [b"a red cat", BAD, b"a blue dog"]


def invalid_strings(values: list[bytes]) -> pa.Array:
    """A `string` array holding the bytes unchecked, as Arrow's JSON and Parquet readers return them."""
    as_bytes = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(as_bytes), as_bytes.buffers())


def images(tmp_path: Path) -> list[str]:
    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(np.full((30, 40, 3), 60 * i, dtype=np.uint8)).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    return paths


def write_manifest(tmp_path: Path, kind: str) -> Path:
    uris = images(tmp_path)
    if kind == "csv":
        path = tmp_path / "m.csv"
        path.write_bytes(
            b"image,caption\n" + b"".join(u.encode() + b"," + c + b"\n" for u, c in zip(uris, CAPTIONS, strict=True))
        )
    elif kind == "jsonl":
        path = tmp_path / "m.jsonl"
        lines = [
            b'{"image": "' + u.encode() + b'", "caption": "' + c + b'"}\n' for u, c in zip(uris, CAPTIONS, strict=True)
        ]
        path.write_bytes(b"".join(lines))
    else:
        path = tmp_path / "m.parquet"
        pq.write_table(pa.table({"image": uris, "caption": invalid_strings(CAPTIONS)}), path)
    return path


def job(manifest: Path, tmp_path: Path, **input_section: Any) -> JobConfig:
    return JobConfig.from_dict(
        {
            "input": {"uri": str(manifest), **input_section},
            "output": {"uri": str(tmp_path / "out")},
            "model": {"config": "tiny", "imgsz": 56, "random_weights": True},
            "compute": {"batch_size": 3, "num_actors": 1},
        }
    )


def test_invalid_utf8_is_replaced_in_string_and_list_columns_and_valid_columns_are_kept() -> None:
    good = pa.array(["fine", None])
    listed = pa.ListArray.from_arrays(pa.array([0, 1, 2]), invalid_strings([b"ok", b"\xff"]))
    table = pa.table({"good": good, "bad": invalid_strings([b"x\xffy", b"z"]), "listed": listed})
    repaired = replace_invalid_utf8(table)
    repaired.validate(full=True)
    kept, original = repaired.column("good").chunk(0), table.column("good").chunk(0)
    assert kept.buffers()[2].address == original.buffers()[2].address  # untouched, not copied
    assert repaired.column("bad").to_pylist() == ["x\ufffdy", "z"]
    assert repaired.column("listed").to_pylist() == [["ok"], ["\ufffd"]]


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_a_caption_cell_that_is_not_utf8_keeps_every_other_caption(kind: str, tmp_path: Path, ray_local: None) -> None:
    manifest = write_manifest(tmp_path, kind)
    plan = preflight(job(manifest, tmp_path))
    assert plan.config.input.caption_column == "caption"
    summary = run_job(job(manifest, tmp_path), plan)
    assert (summary.rows_total, summary.rows_ok) == (3, 3)

    out = read_embeddings(str(tmp_path / "out")).to_pylist()
    by_image = {Path(row["source_uri"]).name: row for row in out}
    expected = ["a red cat", BAD_READ, "a blue dog"]
    for i, caption in enumerate(expected):
        row = by_image[f"img{i}.jpg"]
        assert row["caption"] == caption
        assert row["text_embedding"] is not None
        assert row["id"] == derive_id(str(tmp_path / f"img{i}.jpg"), [caption])  # ids derive with the caption
    assert "input_caption" not in out[0]


@pytest.mark.parametrize(
    ("kind", "column"),
    [("parquet-int", pa.array([1, 2, 3])), ("parquet-binary", pa.array(CAPTIONS, pa.binary()))],
)
def test_a_caption_column_named_right_but_typed_wrong_is_refused_not_dropped(
    kind: str, column: pa.Array, tmp_path: Path
) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": images(tmp_path), "Caption": column}), path)
    with pytest.raises(PreflightError) as raised:
        preflight(job(path, tmp_path))
    message = str(raised.value)
    assert "manifest column 'Caption' is named like captions but holds" in message
    assert "--caption-column ''" in message and "\n" not in message
    # Naming no caption column at all is the way to run it as it is.
    assert preflight(job(path, tmp_path, caption_column="")).config.input.caption_column is None


def test_an_image_column_named_right_but_typed_wrong_is_named_in_the_refusal(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": [1, 2], "caption": ["a", "b"]}), path)
    with pytest.raises(PreflightError, match="manifest column 'image' is named like images but holds int64"):
        preflight(job(path, tmp_path))


def test_a_bad_cell_after_the_first_csv_block_reads_with_the_run_convert_options(tmp_path: Path) -> None:
    """Ray's CSV reader streams blocks: with Arrow's inference a cell that is not UTF-8 in a later block fails the
    whole file ("CSV conversion error to string"); the run's convert options read the caption as bytes."""
    import pyarrow.csv as pacsv

    from pipeline.input.manifest_layout import csv_convert_options

    path = tmp_path / "m.csv"
    rows = b"".join(b"/x/%d.jpg,caption %d\n" % (i, i) for i in range(200))
    path.write_bytes(b"image,caption\n" + rows + b"/x/bad.jpg," + BAD + b"\n")
    small_blocks = pacsv.ReadOptions(block_size=1024)
    with pytest.raises(pa.ArrowInvalid, match="invalid UTF8"):
        pacsv.open_csv(path, read_options=small_blocks).read_all()
    table = pacsv.open_csv(path, read_options=small_blocks, convert_options=csv_convert_options(["caption"])).read_all()
    assert table.num_rows == 201 and table.column("caption")[-1].as_py() == BAD


# Numbers that are not finite ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, Any]:
    from sam3core import build_sam3_vl_backbone

    return build_sam3_vl_backbone(config="tiny", imgsz=56).state_dict()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("poisoned", "failing"),
    [("vision_backbone.trunk.ln_pre.bias", "image_embedding"), ("language_backbone.resizer.bias", "text_embedding")],
)
@pytest.mark.parametrize("multi_caption", [False, True])
def test_a_checkpoint_that_yields_nan_fails_the_rows_instead_of_storing_nan_as_ok(
    tmp_path: Path, tiny_state: dict[str, Any], poisoned: str, failing: str, multi_caption: bool
) -> None:
    """Default features (the pooled embeddings only): a weight holding NaN, as a bad checkpoint or float16
    compute that overflowed gives, makes NaN vectors; each affected row fails with a reason naming the feature."""
    import torch
    from safetensors.torch import save_file

    from pipeline.input.records import PrepareSettings, prepare_batch
    from pipeline.input.sources import SourceSpec
    from pipeline.model.embed import EmbedSettings, EmbedWorker

    weights = {k: v.clone().contiguous() for k, v in tiny_state.items()}
    weights[poisoned][0] = float("nan")
    checkpoint = tmp_path / "model.safetensors"
    save_file(weights, checkpoint)

    uris = images(tmp_path)
    if multi_caption:
        spec = SourceSpec(format="manifest", protocol="file", caption_column=None, captions_column="captions")
        manifest = pa.table({"image": uris, "captions": [["a cat", "a hat"], None, ["a dog"]]})
    else:
        spec = SourceSpec(format="manifest", protocol="file")
        manifest = pa.table({"image": uris, "caption": ["a cat", None, "a dog"]})
    prepared = prepare_batch(
        manifest, PrepareSettings(source=spec, imgsz=56, context_length=32, bpe_path=None, storage_options=None)
    )
    settings = EmbedSettings(
        checkpoint=str(checkpoint),
        model_config="tiny",
        imgsz=56,
        dtype="float32",
        compile="off",
        bpe_path=None,
        features=("image_embedding", "text_embedding"),
        feature_dtype="float16",
        multi_caption=multi_caption,
        batch_size=3,
    )
    with torch.random.fork_rng():
        out = EmbedWorker(settings)(prepared)
    statuses, errors = out.column("status").to_pylist(), out.column("error").to_pylist()
    # Rows without a caption have nothing NaN when only the text encoder is poisoned.
    expected_failed = [0, 1, 2] if failing == "image_embedding" else [0, 2]
    for row in range(3):
        if row in expected_failed:
            assert statuses[row] == "error" and errors[row].startswith(f"{failing} "), (row, errors[row])
            assert out.column("image_embedding")[row].as_py() is None
            assert out.column("text_embedding")[row].as_py() is None
        else:
            assert statuses[row] == "ok" and errors[row] is None
            assert np.isfinite(np.asarray(out.column("image_embedding")[row].as_py(), dtype=np.float32)).all()
    for name in ("image_embedding", "text_embedding"):
        for value in out.column(name).to_pylist():
            assert value is None or np.isfinite(np.asarray(value, dtype=np.float32)).all(), name
