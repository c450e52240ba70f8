"""`sam3-embed run | demo | inspect`, end to end on real files and a real local Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import exit_codes
from jobs.cli import main
from pipeline import read_embeddings
from pipeline.run.demo import write_sample_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
# What Ray printed on every run before the pipeline turned it down (see pipeline/run/console.py, jobs/native_stderr.py)
RAY_NOISE = (
    "Token authentication",
    "Started a local Ray instance",
    "core_worker.cc",
    "constructor arguments",
    "Running Dataset",
    "Execution plan",
    "Total Progress",
    "logging_progress",
    "(raylet)",
)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.timeout(300)
def test_demo_writes_a_dataset_embeds_it_and_says_the_weights_are_random(tmp_path, model_cache_dir):
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "demo", "--output", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env={**_env(), "SAM3_EMBED_CACHE": str(model_cache_dir)},
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM weights" in result.stdout and "RANDOM WEIGHTS" in result.stdout
    # Quiet by default: the pipeline's own few lines, none of Ray's banners, progress blocks or internal errors.
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 10, result.stderr
    for noise in RAY_NOISE:
        assert noise not in result.stderr, f"{noise!r} in:\n{result.stderr}"
    assert any("RANDOM WEIGHTS" in line for line in lines)
    assert "rows:       12 (12 ok, 0 error)" in result.stdout
    assert "partitions: split=train, split=val" in result.stdout
    table = read_embeddings(str(tmp_path / "demo" / "embeddings"))
    assert table.num_rows == 12 and set(table.column("status").to_pylist()) == {"ok"}
    assert table.schema.field("image_embedding").type.list_size == 32
    assert sorted(set(table.column("split").to_pylist())) == ["train", "val"]
    sizes = {row["id"]: (row["image_width"], row["image_height"]) for row in table.to_pylist()}
    # stored 360 x 240 with an EXIF "rotate 90" tag: the pipeline sees the upright 240 x 360 image
    assert sizes["arrow_up"] == (240, 360) and sizes["horizon"] == (1200, 300)


@pytest.mark.timeout(300)
def test_run_takes_a_job_file_and_flags_override_it(tmp_path, ray_local, capsys):
    dataset = write_sample_dataset(tmp_path / "data")
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "input": {"uri": str(dataset.manifest), "format": "manifest"},
                "output": {"uri": str(tmp_path / "ignored"), "partition_by": []},
                "model": {"config": "tiny", "imgsz": 1008, "random_weights": True},
                "compute": {"batch_size": 2},
            }
        )
    )
    out = tmp_path / "out"
    code = main(
        ["run", "--config", str(job), "--output", str(out), "--imgsz", "112", "--partition-by", "split",
         "--features", "image_embedding,text_embedding,vision_features,trunk", "--run-id", "cli-test"]
    )  # fmt: skip
    assert code == exit_codes.OK
    assert not (tmp_path / "ignored").exists()
    table = read_embeddings(str(out))
    assert table.num_rows == 12
    assert table.schema.field("vision_features").type.shape == [32, 8, 8]  # 112 px: an 8 x 8 grid
    files = sorted(out.rglob("*.parquet"))
    assert {f.parent.name for f in files} == {"split=train", "split=val"}
    assert b'"run_id": "cli-test"' in pq.read_schema(files[0]).metadata[b"sam3_embed"]
    printed = capsys.readouterr().out
    assert "run cli-test: 12 rows, 0 error rows" in printed
    assert "RANDOM WEIGHTS" in printed
    assert json.loads((out / "_summary.json").read_text())["random_weights"] is True

    assert main(["inspect", str(out), "--rows", "2"]) == exit_codes.OK
    shown = capsys.readouterr().out
    assert "rows:       12 (12 ok, 0 error)" in shown
    assert "vision_features: extension<arrow.fixed_shape_tensor" in shown
    assert "  trunk: [64x8x8] float16, 8,192 B; " in shown  # the tiny trunk's map, and what it takes in the files
    assert "  image_embedding: [32] float16, 64 B; " in shown
    assert "model:      tiny at 112 px, checkpoint none (random weights)" in shown
    assert "first 2 rows:" in shown


def test_bad_config_is_a_one_line_error_and_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "job.yaml"
    bad.write_text("input: {uri: x.jsonl}\nmodle: {config: tiny}\n")
    assert main(["run", "--config", str(bad)]) == exit_codes.USAGE
    err = capsys.readouterr().err
    assert "unknown job config keys: ['modle']" in err and "Traceback" not in err

    assert main(["run", "--input", str(tmp_path / "m.jsonl"), "--imgsz", "100", "--output", str(tmp_path)]) == 2
    assert "multiple of the patch size 14" in capsys.readouterr().err

    with pytest.raises(SystemExit) as usage:
        main(["run", "--format", "zip"])
    assert usage.value.code == exit_codes.USAGE


def test_inspect_of_a_folder_without_output_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == exit_codes.USAGE
    assert "no committed Parquet files" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_demo_with_a_checkpoint_uses_those_weights_and_records_their_digest(tmp_path, ray_local, capsys):
    import hashlib

    import torch

    from sam3core import build_sam3_vl_backbone

    torch.manual_seed(7)
    weights = build_sam3_vl_backbone(config="tiny", imgsz=224).state_dict()
    checkpoint = tmp_path / "sam3.pt"
    torch.save({"model": {f"detector.backbone.{k}": v for k, v in weights.items()}}, checkpoint)

    code = main(["demo", "--output", str(tmp_path / "demo"), "--model-config", "tiny", "--checkpoint", str(checkpoint)])
    assert code == exit_codes.OK
    printed = capsys.readouterr().out
    assert "RANDOM" not in printed
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert f"checkpoint {checkpoint}, sha256 {digest}" in printed


@pytest.mark.timeout(300)
def test_run_to_s3_with_a_broken_image_exits_3_and_inspect_reads_it_back_from_s3(
    tmp_path, ray_local, s3_server, s3_bucket, capsys
):
    dataset = write_sample_dataset(tmp_path / "data")
    broken = dataset.images_dir / "truncated.jpg"
    broken.write_bytes(dataset.samples[0].path.read_bytes()[:200])  # a JPEG header and nothing after it
    with dataset.manifest.open("a") as manifest:
        manifest.write(json.dumps({"id": "truncated", "image": str(broken), "caption": "cut short", "split": "val"}))
        manifest.write("\n")
    output = f"s3://{s3_bucket}/emb"

    code = main(
        ["run", "--input", str(dataset.manifest), "--output", output, "--model-config", "tiny", "--imgsz", "112",
         "--random-weights",
         "--batch-size", "4", "--s3-endpoint-url", s3_server, "--run-id", "s3-cli"]
    )  # fmt: skip
    assert code == exit_codes.FINISHED_WITH_ERROR_ROWS
    assert "run s3-cli: 13 rows, 1 error rows" in capsys.readouterr().out

    assert main(["inspect", output, "--s3-endpoint-url", s3_server, "--rows", "13"]) == exit_codes.OK
    shown = capsys.readouterr().out
    assert "rows:       13 (12 ok, 1 error)" in shown
    assert "run s3-cli" in shown
    assert "truncated: status=error" in shown
    assert "1 rows have status=error" in shown
    assert f"      source_uri: {broken}" in shown  # where each row came from
    assert f"  truncated: {broken}\n      error: " in shown  # the error rows, with their source and cause


@pytest.mark.timeout(300)
def test_recognised_columns_and_error_rows_within_the_budget_exit_0(tmp_path, ray_local, capsys):
    """A manifest that names its columns `url` and `text` (as many do) runs without flags; one unreadable image
    among twelve is within a 10% budget: exit 0, and the summary says the share and the budget."""
    dataset = write_sample_dataset(tmp_path / "data")
    rows = [json.loads(line) for line in dataset.manifest.read_text().splitlines()][:11]
    rows.append({"id": "gone", "image": str(tmp_path / "missing.jpg"), "caption": "not there", "split": "val"})
    manifest = tmp_path / "web.jsonl"
    manifest.write_text(
        "\n".join(json.dumps({"url": r["image"], "text": r["caption"], "split": r["split"]}) for r in rows)
    )
    out = tmp_path / "out"

    code = main(
        ["run", "--input", str(manifest), "--output", str(out), "--model-config", "tiny", "--imgsz", "56",
         "--random-weights", "--max-error-fraction", "0.1", "--run-id", "budget"]
    )  # fmt: skip
    assert code == exit_codes.OK
    printed = capsys.readouterr()
    assert "image column: 'url' (recognised" in printed.err and "caption column: 'text'" in printed.err
    assert "error rows:   8.33%, within the budget of 10.00%" in printed.out
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["rows_error"], summary["error_fraction"], summary["max_error_fraction"]) == (1, 0.083333, 0.1)
    table = read_embeddings(str(out))
    captions = {row["source_uri"]: row["caption"] for row in table.to_pylist()}
    assert captions[str(dataset.samples[0].path)] == dataset.samples[0].caption  # `text` became the caption
