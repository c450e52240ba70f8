"""A run's driver plans, refuses and runs without importing torch, and a decoding worker fetches, decodes, resizes
and tokenizes without it until its resizes have cost as much as the import (`sam3core.resize`): only the model
actors pay for it from the start. Importing torch was 1.9 s of every `sam3-embed run` before its first line, and
1.1 to 1.4 s in every new decoding worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import exit_codes
from tests.test_incremental import write_images, write_manifest

REPO = Path(__file__).resolve().parents[1]

# Runs the CLI in this process, then says whether torch was imported along the way.
CLI_THEN_MODULES = (
    "import json, sys\n"
    "from jobs.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(json.dumps({'exit': code, 'torch': 'torch' in sys.modules}))\n"
)


def run_script(script: str, args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[dict, str]:
    """The JSON line `script` printed last, run with ARGS in a fresh process of this tree, and its stderr."""
    environment = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)}
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def run_cli(args: list[str], env: dict[str, str]) -> tuple[dict, str]:
    """The outcome of `sam3-embed ARGS` run in a fresh process, and what it printed on stderr."""
    return run_script(CLI_THEN_MODULES, args, env)


def manifest(tmp_path: Path, rows: int) -> Path:
    images = write_images(tmp_path / "images", range(rows))
    records = [{"id": f"r{i}", "image": str(path), "caption": f"picture {i}"} for i, path in images.items()]
    return write_manifest(tmp_path / "manifest.parquet", records)


@pytest.mark.timeout(60)
def test_a_refused_run_never_imports_torch(tmp_path: Path) -> None:
    args = ["run", "--input", str(manifest(tmp_path, 2)), "--output", str(tmp_path / "out")]
    args += ["--model-config", "tiny", "--random-weights", "--image-column", "picture"]
    outcome, printed = run_cli(args, dict(os.environ))
    assert outcome == {"exit": exit_codes.USAGE, "torch": False}
    assert "no column 'picture'" in printed


@pytest.mark.timeout(60)
def test_a_checkpoint_is_probed_and_refused_without_importing_torch(tmp_path: Path) -> None:
    """A real `sam3.pt` of the tiny SAM 3 model, asked to serve a SAM 3.1 configuration: refused from its keys."""
    import torch

    from sam3core import build_sam3_vl_backbone

    weights = build_sam3_vl_backbone(config="tiny", imgsz=56).state_dict()
    checkpoint = tmp_path / "sam3.pt"
    torch.save({"model": {f"detector.backbone.{k}": v for k, v in weights.items()}}, checkpoint)
    args = ["run", "--input", str(manifest(tmp_path, 2)), "--output", str(tmp_path / "out")]
    args += ["--checkpoint", str(checkpoint), "--model-config", "tiny-sam3.1"]
    outcome, printed = run_cli(args, dict(os.environ))
    assert outcome == {"exit": exit_codes.USAGE, "torch": False}
    assert "is sam3 (sam3.pt layout) but model.config 'tiny-sam3.1' is sam3.1" in printed, printed


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_incremental_runs_driver_never_imports_torch(ray_driver_env: dict[str, str], tmp_path: Path) -> None:
    args = ["run", "--input", str(manifest(tmp_path, 6)), "--output", str(tmp_path / "out"), "--incremental"]
    args += ["--model-config", "tiny", "--imgsz", "56", "--random-weights", "--batch-size", "4"]
    outcome, _ = run_cli(args, ray_driver_env)
    assert outcome == {"exit": exit_codes.OK, "torch": False}
    written = pq.read_table(tmp_path / "out", columns=["id", "status"])
    assert sorted(written.column("id").to_pylist()) == [f"r{i}" for i in range(6)]
    assert set(written.column("status").to_pylist()) == {"ok"}


# Prepares one batch as a decoding task does, then says whether torch was imported along the way.
PREPARE_THEN_MODULES = (
    "import json, sys\n"
    "import pyarrow.parquet as pq\n"
    "from pipeline.input.records import PrepareSettings, prepare_batch\n"
    "from pipeline.input.sources import SourceSpec\n"
    "spec = SourceSpec(format='manifest', protocol='file', caption_column='caption')\n"
    "settings = PrepareSettings(source=spec, imgsz=56, context_length=32, bpe_path=None, storage_options=None)\n"
    "out = prepare_batch(pq.read_table(sys.argv[1]), settings)\n"
    "print(json.dumps({'status': out.column('status').to_pylist(), 'tokens': out.column('__tokens').null_count,\n"
    "                  'torch': 'torch' in sys.modules}))\n"
)


@pytest.mark.timeout(60)
def test_decoding_a_batch_does_not_import_torch(tmp_path: Path) -> None:
    outcome, _ = run_script(PREPARE_THEN_MODULES, [str(manifest(tmp_path, 3))], dict(os.environ), timeout=50)
    assert outcome == {"status": ["ok"] * 3, "tokens": 0, "torch": False}
