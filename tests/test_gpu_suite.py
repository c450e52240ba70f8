"""bench/gpu_suite.py runs on the GPU machine at the first call: its CPU dry run works where only the GPU machine's
packages exist (no Ray, no ftfy, no S3 clients), and what it imports does not pull Ray in.

The GPU machine is lent briefly and nothing can be installed there, so a crash there costs the whole measurement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Packages the project's environment has and the GPU machine does not (it has torch, transformers, pillow, pyarrow
# and their dependencies): importing any of them there would fail.
ABSENT_ON_GPU_MACHINE = ("ray", "ftfy", "s3fs", "boto3", "botocore", "moto", "aiobotocore")

BLOCKER = f"""
import importlib.abc
import sys

ABSENT = {ABSENT_ON_GPU_MACHINE!r}


class AbsentOnTheGpuMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)", name=name)
        return None


sys.meta_path.insert(0, AbsentOnTheGpuMachine())
"""


def gpu_machine_env(tmp_path: Path) -> dict[str, str]:
    """This environment, with the packages the GPU machine lacks made unimportable (a `sitecustomize` on the path
    installs an import hook before the command runs)."""
    site = tmp_path / "gpu_machine_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.timeout(120)
def test_the_model_actor_and_sam3core_import_without_ray_or_ftfy(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import pipeline.model.embed, sam3core\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in {'ray', 'ftfy'})\n"
        "assert not loaded, loaded\n"
        "sam3core.build_sam3_vl_backbone(config='tiny', imgsz=28)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=gpu_machine_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_gpu_suite_dry_run_on_cpu_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "bench/gpu_suite.py", "--device", "cpu", "--config", "tiny", "--out", str(out)]
    result = subprocess.run(
        command, cwd=REPO, env=gpu_machine_env(tmp_path), capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    data = json.loads((out / "gpu_suite.json").read_text())
    assert data["errors"] == {}
    # only what needs CUDA memory statistics or Meta's package is skipped, each with its reason; on a slow machine
    # an extra batch size may also fall outside its section's budget
    skipped = data["skipped"]
    assert {"memory", "official"} <= set(skipped), skipped
    assert "CUDA" in skipped["memory"] and "--official" in skipped["official"]
    others = {name: reason for name, reason in skipped.items() if name not in ("memory", "official")}
    assert all(" batch " in name and "budget" in reason for name, reason in others.items()), others
    sections = {row["section"] for row in data["rows"]}
    expected = {"env", "weights", "eager", "correctness", "worker_eager", "sdpa", "rope", "compiled"}
    assert expected | {"worker_compiled", "cudagraphs"} <= sections
    checks = {row["variant"]: row.get("check") for row in data["rows"] if row["section"] == "correctness"}
    assert checks and all(check == "PASS" for check in checks.values()), checks
    # the rows printed are the docs' table rows, one per figure
    printed = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(printed) >= 2 * len(data["rows"])  # as measured, then the table again at the end
