"""Per-CPU choices: the dtype `auto` picks, the attention kernel, and the warning for emulated bfloat16."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sam3core.cpu as cpu_module
from pipeline.config import JobConfig
from pipeline.run.preflight import emulated_dtype_warning, preflight
from sam3core.attention import cpu_attention_kernel
from sam3core.cpu import AUTO_DTYPE_ENV, CpuFeatures, auto_dtype

REPO_ROOT = Path(__file__).resolve().parents[1]
AVX2 = CpuFeatures(capability="AVX2", avx512_bf16=False, amx=False, onednn_bf16=False)
AVX512 = CpuFeatures(capability="AVX512", avx512_bf16=False, amx=False, onednn_bf16=True)  # Skylake-X: no BF16
AVX512_BF16 = CpuFeatures(capability="AVX512", avx512_bf16=True, amx=False, onednn_bf16=True)  # Zen 4, Cooper Lake
AMX = CpuFeatures(capability="AVX512", avx512_bf16=True, amx=True, onednn_bf16=True)  # Sapphire Rapids
# AVX-512 BF16 hardware, oneDNN capped below it (ONEDNN_MAX_CPU_ISA): bfloat16 matmuls are not native any more
CAPPED = CpuFeatures(capability="AVX512", avx512_bf16=True, amx=False, onednn_bf16=True, onednn_isa_cap="AVX512_CORE")


@pytest.mark.parametrize(
    ("features", "expected"),
    [
        (AVX2, torch.float32),
        (AVX512, torch.float32),
        (AVX512_BF16, torch.bfloat16),
        (AMX, torch.bfloat16),
        (CAPPED, torch.float32),
    ],
)
def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_it_natively(features: CpuFeatures, expected: torch.dtype):
    assert auto_dtype("cpu", features, environ={}) == expected
    assert auto_dtype("cuda", features, environ={}) == torch.bfloat16  # any GPU the pipeline targets


def test_auto_dtype_can_be_forced_and_refuses_nonsense():
    assert auto_dtype("cpu", AMX, environ={AUTO_DTYPE_ENV: "float32"}) == torch.float32
    assert auto_dtype("cpu", AVX2, environ={AUTO_DTYPE_ENV: "bfloat16"}) == torch.bfloat16
    with pytest.raises(ValueError, match=AUTO_DTYPE_ENV):
        auto_dtype("cpu", AVX2, environ={AUTO_DTYPE_ENV: "fast"})


def test_the_attention_kernel_is_chosen_per_instruction_set_and_dtype():
    assert cpu_attention_kernel(torch.bfloat16, AVX512_BF16) == "chunked"
    assert cpu_attention_kernel(torch.bfloat16, AMX) == "chunked"
    assert cpu_attention_kernel(torch.float32, AVX2) == "sdpa"  # as the official code: 0.88x before (issue 16)
    assert cpu_attention_kernel(torch.bfloat16, AVX2) == "sdpa"  # emulated: never measured faster chunked
    assert cpu_attention_kernel(torch.float16, AVX512_BF16) == "sdpa"  # not measured: PyTorch's own choice


@pytest.mark.timeout(120)
def test_the_avx2_caps_make_torch_report_an_avx2_cpu_without_native_bfloat16():
    """What the emulation of an AVX2 machine changes, read back the way `auto` reads it."""
    script = (
        "import json; from sam3core.cpu import read_cpu_features, auto_dtype; f = read_cpu_features(); "
        "print(json.dumps([f.capability, f.native_bfloat16, str(auto_dtype('cpu', f, environ={}))]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["AVX2", False, "torch.float32"]


def _job(tmp_path: Path, dtype: str) -> JobConfig:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": str(tmp_path / "a.jpg"), "caption": "a cat"}) + "\n")
    return JobConfig.from_dict(
        {
            "input": {"uri": str(manifest)},
            "output": {"uri": str(tmp_path / "out")},
            "model": {"config": "tiny", "random_weights": True, "dtype": dtype},
        }
    )


def test_bfloat16_on_a_cpu_that_emulates_it_gets_one_warning_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cpu_module, "cpu_features", lambda: AVX2)
    with caplog.at_level(logging.WARNING, logger="pipeline.run.preflight"):
        plan = preflight(_job(tmp_path, "bfloat16"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and plan.warnings == warnings
    assert "\n" not in warnings[0]
    assert "bfloat16 is emulated on this CPU" in warnings[0] and "float32" in warnings[0]
    assert "avx2" in warnings[0]
    # auto, float32, a native CPU, or a job whose actors run on GPUs: no warning
    assert emulated_dtype_warning(_job(tmp_path, "auto"), AVX2) is None
    assert emulated_dtype_warning(_job(tmp_path, "float32"), AVX2) is None
    assert emulated_dtype_warning(_job(tmp_path, "bfloat16"), AVX512_BF16) is None
    gpu_job = _job(tmp_path, "bfloat16")
    gpu_job.compute.gpus_per_actor = 1
    assert emulated_dtype_warning(gpu_job, AVX2) is None
