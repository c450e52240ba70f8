"""Mistakes refused before Ray starts: each is exit code 2 with one line naming what to change, nothing written.

In-process checks call `pipeline.run.preflight` (no Ray involved); the command-line checks run `sam3-embed run` in a
subprocess with its own RAY_TMPDIR, to show the refusal takes seconds and leaves no Ray session behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from jobs import exit_codes
from pipeline.config import JobConfig
from pipeline.input.columns import resolve_columns
from pipeline.run.preflight import PreflightError, preflight
from sam3core import build_sam3_vl_backbone
from sam3core.checkpoint import CheckpointError, probe_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    return build_sam3_vl_backbone(config="tiny", imgsz=56).state_dict()


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """Three real images and a JSON Lines manifest whose image column is called `url` and captions `alt`."""
    rows = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(path)
        rows.append({"key": f"k{i}", "url": str(path), "alt": f"picture {i}", "split": "train"})
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


def config(manifest: Path, tmp_path: Path, **sections: dict[str, Any]) -> JobConfig:
    data: dict[str, Any] = {
        "input": {"uri": str(manifest)},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"config": "tiny", "imgsz": 56, "random_weights": True},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return JobConfig.from_dict(data)


def refused(job: JobConfig) -> str:
    with pytest.raises(PreflightError) as raised:
        preflight(job)
    message = str(raised.value)
    assert "\n" not in message
    return message


# What preflight decides -------------------------------------------------------------------------------------------


def test_common_column_names_are_recognised_and_logged(manifest: Path, tmp_path: Path) -> None:
    plan = preflight(config(manifest, tmp_path))
    assert plan.config.input.image_column == "url"
    assert plan.config.input.caption_column == "alt"
    assert plan.config.input.id_column == "key"
    assert plan.total_rows == 3  # also the bound that decides whether compiling pays
    assert any("image column: 'url' (recognised" in note for note in plan.notes)
    assert any("caption column: 'alt'" in note for note in plan.notes)
    assert any(note.startswith("RANDOM WEIGHTS") for note in plan.notes)
    assert not (tmp_path / "out").exists()


def test_column_recognition_prefers_image_bytes_and_accepts_every_image_type() -> None:
    hf_image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    img2dataset = pa.schema(
        [("url", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("jpg", pa.binary())]
    )
    resolved = resolve_columns(
        img2dataset, id_column=None, image_column=None, caption_column=None, captions_column=None
    )
    assert (resolved.image_column, resolved.caption_column, resolved.id_column) == ("jpg", "caption", "key")
    huggingface = pa.schema([("image", hf_image), ("text", pa.string())])
    resolved = resolve_columns(
        huggingface, id_column=None, image_column=None, caption_column=None, captions_column=None
    )
    assert (resolved.image_column, resolved.caption_column, resolved.id_column) == ("image", "text", None)
    # A list-valued caption column is taken as several captions per row; "" asks for no caption at all.
    listed = pa.schema([("Image_URI", pa.string()), ("captions", pa.list_(pa.string()))])
    resolved = resolve_columns(listed, id_column=None, image_column=None, caption_column=None, captions_column=None)
    assert (resolved.image_column, resolved.caption_column, resolved.captions_column) == ("Image_URI", None, "captions")
    resolved = resolve_columns(listed, id_column=None, image_column=None, caption_column="", captions_column=None)
    assert (resolved.caption_column, resolved.captions_column) == (None, None)


def test_a_resumable_output_passes(manifest: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "out" / "part-0.parquet")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "ids.parquet").write_bytes(b"recorded")
    job = config(manifest, tmp_path)
    job.resume_path = str(tmp_path / "ckpt")  # records files: this run continues the one that wrote them
    preflight(job)


# Mistakes ---------------------------------------------------------------------------------------------------------


def test_no_checkpoint_without_random_weights_is_refused(manifest: Path, tmp_path: Path) -> None:
    message = refused(config(manifest, tmp_path, model={"random_weights": False}))
    assert "no checkpoint: pass --checkpoint" in message and "--random-weights" in message
    assert "both" in refused(config(manifest, tmp_path, model={"checkpoint": "x.pt"}))


@pytest.mark.parametrize(
    ("flag", "column", "expected"),
    [
        ("image_column", "image", "no column 'image' (--image-column"),
        ("caption_column", "caption", "no column 'caption' (--caption-column"),
        ("captions_column", "caps", "no column 'caps' (--captions-column"),
        ("id_column", "id", "no column 'id' (--id-column"),
    ],
)
def test_a_configured_column_that_does_not_exist_lists_the_columns(
    manifest: Path, tmp_path: Path, flag: str, column: str, expected: str
) -> None:
    message = refused(config(manifest, tmp_path, input={flag: column}))
    assert expected in message and "its columns are: key, url, alt, split" in message


def test_a_manifest_without_any_image_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("name,caption\na,b\n")
    message = refused(config(path, tmp_path))
    assert "no image column recognised" in message and "its columns are: name, caption" in message
    assert "--image-column" in message


def test_a_wrongly_typed_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": [1, 2], "caption": [["a", "b"], ["c"]]}), path)
    assert "holds int64" in refused(config(path, tmp_path, input={"image_column": "image"}))
    pq.write_table(pa.table({"image": ["/a.jpg"], "caption": [["a", "b"]]}), path)
    assert "--captions-column" in refused(config(path, tmp_path, input={"caption_column": "caption"}))


def test_missing_and_empty_inputs_are_refused(tmp_path: Path) -> None:
    assert "does not exist" in refused(config(tmp_path / "absent.jsonl", tmp_path))
    (tmp_path / "empty").mkdir()
    assert "no manifest files found" in refused(config(tmp_path / "empty", tmp_path))
    assert "holds no image files" in refused(config(tmp_path / "empty", tmp_path, input={"format": "images"}))
    assert "no WebDataset shards" in refused(config(tmp_path / "empty", tmp_path, input={"format": "webdataset"}))
    header_only = tmp_path / "h.csv"
    header_only.write_text("image,caption\n")
    assert "holds no rows" in refused(config(header_only, tmp_path))


def test_a_partition_column_the_output_will_not_have_is_refused(manifest: Path, tmp_path: Path) -> None:
    message = refused(config(manifest, tmp_path, output={"partition_by": ["date"]}))
    assert "output.partition_by names date" in message and "split" in message
    preflight(config(manifest, tmp_path, output={"partition_by": ["split"]}))  # a pass-through column: fine


def test_outputs_left_by_earlier_runs_say_what_to_do(manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ["a"]}), out / "part-0.parquet")
    message = refused(config(manifest, tmp_path))
    assert "did not finish" in message and "--resume-path" in message and f"rm -r {out}" in message
    (out / "_SUCCESS").write_bytes(b"")
    message = refused(config(manifest, tmp_path))
    assert "already holds a finished run" in message and f"rm -r {out}" in message
    job = config(manifest, tmp_path)
    job.resume_path = str(tmp_path / "never-used")
    assert "records none of them" in refused(job)


def test_checkpoints_are_probed_without_loading_them(
    manifest: Path, tmp_path: Path, tiny_weights: dict[str, torch.Tensor]
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights\n")
    message = refused(config(manifest, tmp_path, model={"checkpoint": str(text), "random_weights": False}))
    assert "is not a checkpoint" in message and "--checkpoint" in message
    missing = str(tmp_path / "absent.pt")
    assert "checkpoint not found" in refused(
        config(manifest, tmp_path, model={"checkpoint": missing, "random_weights": False})
    )
    official = tmp_path / "sam3.pt"
    torch.save({"model": {f"detector.backbone.{k}": v for k, v in tiny_weights.items()}}, official)
    plan = preflight(config(manifest, tmp_path, model={"checkpoint": str(official), "random_weights": False}))
    assert plan.checkpoint_format == f"torch zip, sam3.pt layout (sam3), {len(tiny_weights)} entries"
    assert not any(note.startswith("RANDOM") for note in plan.notes)


def test_probe_reads_every_known_format_and_refuses_the_rest(
    tmp_path: Path, tiny_weights: dict[str, torch.Tensor]
) -> None:
    official = {f"detector.backbone.{k}": v for k, v in tiny_weights.items()}
    torch.save(official, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in tiny_weights.items()}, tmp_path / "native.safetensors")
    torch.save({"other.weight": torch.zeros(2)}, tmp_path / "other.pt")
    (tmp_path / "fake.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert probe_checkpoint(tmp_path / "legacy.pt").format == "torch legacy"
    assert probe_checkpoint(tmp_path / "native.safetensors").layout == "sam3core"
    with pytest.raises(CheckpointError, match=r"not a SAM 3 checkpoint.*other\.weight"):
        probe_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a readable PyTorch"):
        probe_checkpoint(tmp_path / "fake.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        probe_checkpoint(tmp_path)


def test_probe_of_a_checkpoint_on_s3_reads_a_few_ranges(bucket: Any, tiny_weights: dict[str, torch.Tensor]) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"model": {f"detector.backbone.{k}": v for k, v in tiny_weights.items()}}, buffer)
    uri = bucket.put("models/sam3.pt", buffer.getvalue())
    probe = probe_checkpoint(uri, bucket.storage_options)
    assert (probe.format, probe.layout, probe.entries) == ("torch zip", "sam3.pt", len(tiny_weights))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        probe_checkpoint(bucket.uri("models/absent.pt"), bucket.storage_options)


# The command line -------------------------------------------------------------------------------------------------


def run_cli(args: list[str], ray_tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["RAY_TMPDIR"] = str(ray_tmp)
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", *args], capture_output=True, text=True, env=env, timeout=60
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "error: no checkpoint: pass --checkpoint"),
        (["--random-weights", "--image-column", "image"], "error: the manifest has no column 'image'"),
        (["--checkpoint", "NOTES"], "is not a checkpoint"),
    ],
    ids=["no-checkpoint", "wrong-image-column", "text-file-checkpoint"],
)
def test_cli_refuses_with_exit_2_one_line_in_seconds_and_no_ray(
    manifest: Path, tmp_path: Path, extra: list[str], expected: str
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    extra = [str(notes) if arg == "NOTES" else arg for arg in extra]
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    started = time.monotonic()
    result = run_cli(["--input", str(manifest), "--output", str(tmp_path / "out"), *extra], ray_tmp)
    elapsed = time.monotonic() - started
    assert result.returncode == exit_codes.USAGE, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""
    assert elapsed < 20, f"refusing took {elapsed:.1f}s"  # imports only: no cluster was started
    assert list(ray_tmp.iterdir()) == []  # no Ray session directory
    assert not (tmp_path / "out").exists()
