"""sam3core.compile: the plan per device, compiled == eager to bfloat16 noise, the eager fallback."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from sam3core import build_sam3_vl_backbone
from sam3core.compile import (
    CPU_COMPILE_MIN_TFLOP,
    CompilePlan,
    apply_compile,
    compile_pays_off,
    compile_plan,
    is_compiled,
    trunk_flops,
)
from sam3core.config import get_config

IMGSZ = 56


def test_plan_per_device_and_dtype():
    assert compile_plan("auto", "cpu", torch.bfloat16) == CompilePlan(enabled=True, options={"freezing": True})
    assert not compile_plan("auto", "cpu", torch.float32).enabled  # compiling costs more than it saves there
    assert compile_plan("on", "cpu", torch.float32).options == {"freezing": True}
    assert compile_plan(True, "cpu", torch.float32).enabled and not compile_plan(False, "cpu", torch.bfloat16).enabled
    assert compile_plan("auto", "cuda", torch.bfloat16).mode == "max-autotune-no-cudagraphs"
    assert not compile_plan("off", "cuda", torch.bfloat16).enabled
    with pytest.raises(ValueError, match="compile must be one of"):
        compile_plan("fast", "cpu", torch.float32)


@pytest.mark.parametrize(("config", "imgsz", "tolerance"), [("tiny", 224, 0.15), ("sam3", 336, 0.02)])
def test_trunk_flops_agree_with_torchs_flop_counter(config: str, imgsz: int, tolerance: float) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    trunk = build_sam3_vl_backbone(config=config, imgsz=imgsz, device="meta").vision_backbone.trunk
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        trunk(torch.zeros(1, 3, imgsz, imgsz, device="meta"))
    estimate = trunk_flops(get_config(config), imgsz)
    assert estimate == pytest.approx(counter.get_total_flops(), rel=tolerance)


def test_compiling_pays_on_a_cpu_only_for_enough_work() -> None:
    sam3_1008 = trunk_flops(get_config("sam3"), 1008)  # 5.4 TFLOP an image
    tiny_224 = trunk_flops(get_config("tiny"), 224)
    assert not compile_pays_off("cpu", 3, sam3_1008) and compile_pays_off("cpu", 4, sam3_1008)
    assert not compile_pays_off("cpu", 22_000, tiny_224)  # the size of a nightly increment in bench/incremental
    assert compile_pays_off("cpu", int(CPU_COMPILE_MIN_TFLOP * 1e12 / tiny_224) + 1, tiny_224)
    assert compile_pays_off("cpu", None, tiny_224)  # rows unknown: as before, compile
    assert compile_pays_off("cuda", 1, tiny_224)  # a GPU always compiles


def _min_cosine(a: dict, b: dict) -> float:
    pairs = zip(
        [*a["backbone_fpn"], *a["vision_pos_enc"], *a["sam2_backbone_out"]["backbone_fpn"]],
        [*b["backbone_fpn"], *b["vision_pos_enc"], *b["sam2_backbone_out"]["backbone_fpn"]],
        strict=True,
    )
    return min(F.cosine_similarity(x.float().flatten(), y.float().flatten(), dim=0).item() for x, y in pairs)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_bfloat16_matches_eager_to_bfloat16_noise():
    torch.manual_seed(0)
    eager = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ, dtype="bfloat16", add_sam2_neck=True)
    compiled = build_sam3_vl_backbone(
        config="tiny", imgsz=IMGSZ, dtype="bfloat16", add_sam2_neck=True, compile_visual="auto"
    )
    compiled.load_state_dict(eager.state_dict())  # before the first call: freezing captures the weights then
    assert compiled.compile_plan.options == {"freezing": True}
    compiled.warm_up(2)
    assert is_compiled(compiled.vision_backbone)
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        expected = eager.forward_image(images)
        actual = compiled.forward_image(images)
        only = compiled.forward_vision_features(images)
    assert _min_cosine(actual, expected) > 0.999
    for a, b in zip(actual["backbone_fpn"], expected["backbone_fpn"], strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
    # the one-level path is the same computation as the level forward_image returns
    torch.testing.assert_close(only, actual["vision_features"])
    assert list(compiled.state_dict()) == list(eager.state_dict())


def _failing_backend(graph_module: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
    raise RuntimeError("this compiler cannot compile anything")


@pytest.mark.timeout(120)
def test_warm_up_falls_back_to_eager_with_a_warning_when_compilation_fails():
    torch.manual_seed(0)
    model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ)
    apply_compile(model.vision_backbone, CompilePlan(enabled=True, backend=_failing_backend))
    assert is_compiled(model.vision_backbone)
    with pytest.warns(RuntimeWarning, match="(?s)running it eagerly.*cannot compile anything"):
        seconds = model.warm_up(2, vision_features_only=True)
    assert seconds > 0 and not is_compiled(model.vision_backbone)
    images = torch.zeros(2, 3, IMGSZ, IMGSZ)
    with torch.inference_mode():
        features = model.forward_vision_features(images)  # eager from now on, no error
    assert features.shape == (2, model.config.d_model, IMGSZ // 14, IMGSZ // 14)


def test_warm_up_does_not_hide_errors_of_an_eager_model():
    model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ)
    model.vision_backbone.trunk.imgsz = 28  # a broken model: RoPE tables sized for 56 px, inputs of 28 px
    with pytest.raises(RuntimeError):
        model.warm_up(1)


def test_every_module_compiled_in_place_yields_a_graph():
    """Each module `apply_compile` compiles is traced by Dynamo (a bare `nn.Sequential` of torch layers is not:
    Dynamo skips torch's own `Sequential.forward` frame, so the neck's levels ran eagerly while reported compiled)."""
    from torch._dynamo.testing import CompileCounter

    from sam3core.compile import compiled_modules

    torch._dynamo.reset()
    model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ, add_sam2_neck=True)
    counters = []
    for module in compiled_modules(model.vision_backbone):
        counter = CompileCounter()
        module.compile(backend=counter)
        counters.append((type(module).__name__, counter))
    with torch.inference_mode():
        model.forward_image(torch.zeros(1, 3, IMGSZ, IMGSZ))
    assert len(counters) == 1 + 2 * len(model.config.scale_factors)
    assert [name for name, counter in counters if counter.frame_count == 0] == []
    torch._dynamo.reset()


def test_out_of_memory_in_warm_up_is_raised_not_taken_for_a_compilation_failure():
    """A batch too large for the device is the user's setting to change; falling back to eager would hide it (and
    run out of memory again on the first real batch)."""
    from sam3core.compile import compile_fallback, warm_up

    model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ)
    apply_compile(model.vision_backbone, CompilePlan(enabled=True, backend="eager"))

    def out_of_memory():
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        except torch.OutOfMemoryError as exc:
            raise RuntimeError("backend compiler failed") from exc  # how inductor wraps errors of its own

    with pytest.raises(RuntimeError, match="backend compiler failed"):
        warm_up(out_of_memory, model.vision_backbone)
    assert is_compiled(model.vision_backbone) and compile_fallback(model.vision_backbone) is None


@pytest.mark.timeout(120)
def test_a_compilation_failure_is_recorded_for_the_metadata():
    from sam3core.compile import compile_fallback

    torch.manual_seed(0)
    model = build_sam3_vl_backbone(config="tiny", imgsz=IMGSZ)
    apply_compile(model.vision_backbone, CompilePlan(enabled=True, backend=_failing_backend))
    with pytest.warns(RuntimeWarning):
        model.warm_up(1, vision_features_only=True)
    assert "cannot compile anything" in compile_fallback(model.vision_backbone)


def test_compile_threads_follow_the_process_not_the_host(monkeypatch: pytest.MonkeyPatch):
    import torch._inductor.config as inductor_config

    from sam3core.compile import set_compile_threads

    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    with inductor_config.patch(compile_threads=64):  # as on a 64-core host; restored afterwards
        set_compile_threads(3)
        assert inductor_config.compile_threads == 3 and os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == "3"
        monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "5")  # an explicit setting wins
        set_compile_threads(2)
        assert inductor_config.compile_threads == 3


@pytest.mark.timeout(60)
def test_an_eager_model_actor_builds_and_embeds_without_importing_dynamo_or_inductor() -> None:
    """Importing them costs about half a second per actor (and per pipeline run in tests); a model assembled on the meta
    device imported both through `normal_` of a meta tensor until the text encoder stopped initialising there, and
    sympy through `torch.empty_like` of a meta tensor until the build made its CPU tensors itself."""
    import subprocess
    import sys

    script = (
        "import sys, numpy as np, pyarrow as pa\n"
        "from pipeline.model.embed import EmbedSettings, EmbedWorker\n"
        "from pipeline.dataset import schema\n"
        "settings = EmbedSettings(checkpoint=None, model_config='tiny', imgsz=56, dtype='bfloat16', compile='off',\n"
        "    bpe_path=None, features=('image_embedding', 'text_embedding'), feature_dtype='float32',\n"
        "    multi_caption=False, batch_size=2)\n"
        "worker = EmbedWorker(settings)\n"
        "pixels = pa.array([bytes(56 * 56 * 3)] * 2, pa.binary())\n"
        "batch = pa.table({schema.STATUS: ['ok', 'ok'], schema.PIXELS: pixels,\n"
        "    schema.TOKENS: [[ids] for ids in worker.backbone.tokenizer(['a cat', '']).tolist()]})\n"
        "out = worker(batch)\n"
        "assert out.num_rows == 2, out.num_rows\n"
        "loaded = [m for m in ('torch._dynamo', 'torch._inductor', 'sympy') if m in sys.modules]\n"
        "assert not loaded, f'the eager actor imported {loaded}'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_eager_process_sets_compile_threads_without_importing_inductor() -> None:
    import subprocess
    import sys

    script = (
        "import sys, os\n"
        "os.environ.pop('TORCHINDUCTOR_COMPILE_THREADS', None)\n"
        "from sam3core.compile import set_compile_threads\n"
        "set_compile_threads(3)\n"
        "assert 'torch._inductor.config' not in sys.modules, 'imported inductor'\n"
        "import torch._inductor.config as c\n"
        "assert c.compile_threads == 3, c.compile_threads\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]
