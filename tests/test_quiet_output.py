"""What reaches stderr: the project's lines, and other libraries' only from WARNING unless `-v`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import exit_codes
from tests.s3_bucket import S3Bucket

REPO_ROOT = Path(__file__).resolve().parents[1]


def cli_env(ray_tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["RAY_TMPDIR"] = str(ray_tmp)
    return env


LOG_LINES = (
    "import logging, sys\n"
    "from jobs.cli_common import configure_logging\n"
    "configure_logging(sys.argv[1] == '-v')\n"
    "logging.getLogger('aiobotocore.credentials').info('Found credentials in environment variables.')\n"
    "logging.getLogger('botocore.hooks').debug('third-party debug')\n"
    "logging.getLogger('s3fs').warning('third-party warning')\n"
    "logging.getLogger('pipeline').info('our info')\n"
    "logging.getLogger('jobs.embed').info('our entry point')\n"
    "logging.getLogger('sam3core.build').debug('our debug')\n"
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("verbose", [False, True])
def test_only_the_projects_info_lines_and_others_warnings_reach_stderr_unless_verbose(
    tmp_path: Path, verbose: bool
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOG_LINES, "-v" if verbose else "-"],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=30,
        check=True,
    )
    printed = result.stderr
    assert "our info" in printed and "our entry point" in printed and "third-party warning" in printed
    for line in ("Found credentials", "third-party debug", "our debug"):
        assert (line in printed) == verbose, (line, printed)


@pytest.mark.timeout(120)
def test_a_refusal_of_an_s3_input_is_exactly_one_line(bucket: S3Bucket, tmp_path: Path) -> None:
    """Reading the manifest's schema from S3 finds credentials in the environment; aiobotocore says so at INFO."""
    bucket.put("m/manifest.csv", b"url,caption\ns3://b/a.jpg,a cat\n")
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    args = ["--input", bucket.uri("m/manifest.csv"), "--output", bucket.uri("out"), "--s3-endpoint-url"]
    args += [bucket.endpoint, "--random-weights", "--image-column", "image"]
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", *args],
        capture_output=True,
        text=True,
        env=cli_env(ray_tmp),
        timeout=60,
    )
    assert result.returncode == exit_codes.USAGE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the manifest has no column 'image'"), result.stderr
    assert list(ray_tmp.iterdir()) == []
