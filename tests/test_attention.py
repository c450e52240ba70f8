"""The trunk's attention: chunked on a CPU, equal to SDPA, one opaque op when compiled.

Which kernel a CPU runs depends on its instruction set and the dtype (`cpu_attention_kernel`, tested in
test_cpu_choices.py); the tests of the chunked op force it, whatever this machine's table says.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sam3core.attention as attention_module
from sam3core.attention import attention, chunk_shape


@pytest.fixture(autouse=True)
def chunked_on_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from sam3core.cpu import cpu_features

    isa = cpu_features().isa
    table = {(isa, dtype): "chunked" for dtype in (torch.float32, torch.bfloat16, torch.float16)}
    monkeypatch.setattr(attention_module, "CPU_KERNELS", table)


def qkv(batch: int, heads: int, length: int, head_dim: int = 16) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, heads, length, head_dim, generator=generator) for _ in range(3))


def test_chunk_shape_keeps_the_scores_of_a_chunk_within_the_budget() -> None:
    budget = attention_module.SCORES_PER_CHUNK
    # what counts is bytes: float32 scores get half as many per chunk as bfloat16 ones
    assert chunk_shape(16, 5184, element_bytes=4)[1] == budget // 2 // 5184
    assert chunk_shape(144, 576) == (budget // (576 * 576), 576)  # windows: whole maps, several heads at once
    sequences, queries = chunk_shape(16, 5184)  # a global block at 1008 px: one head, a slice of the queries
    assert sequences == 1 and queries == budget // 5184
    assert chunk_shape(2, 8) == (2, 8)  # a tiny input is one chunk
    for count, length in ((144, 576), (16, 5184), (3, 100_000)):
        sequences, queries = chunk_shape(count, length)
        assert sequences * queries * length <= max(budget, length)


@pytest.mark.parametrize("budget", [10**9, 40 * 37, 37 * 37 * 3 + 5])
def test_chunked_attention_equals_sdpa_whatever_the_chunks(monkeypatch: pytest.MonkeyPatch, budget: int) -> None:
    # one chunk; chunks of 40 queries with a short last one; chunks of 3 whole maps with a short last one
    monkeypatch.setattr(attention_module, "SCORES_PER_CHUNK", budget)
    q, k, v = qkv(2, 3, 37)
    expected = F.scaled_dot_product_attention(q, k, v)
    actual = attention(q, k, v)
    assert actual.shape == expected.shape and actual.is_contiguous()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_chunked_attention_reads_strided_views_as_the_trunk_passes_them() -> None:
    # the trunk's v is a permuted view of the fused qkv projection
    fused = torch.randn(2, 50, 3, 4, 16, generator=torch.Generator().manual_seed(1))
    q, k, v = fused.permute(2, 0, 3, 1, 4).unbind(0)
    assert not v.is_contiguous()
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_bfloat16_chunked_attention_stays_at_bfloat16_noise() -> None:
    q, k, v = qkv(1, 4, 576, 64)
    expected = F.scaled_dot_product_attention(q, k, v)
    actual = attention(*(t.bfloat16() for t in (q, k, v)))
    assert actual.dtype == torch.bfloat16
    assert F.cosine_similarity(actual.float().flatten(), expected.flatten(), dim=0) > 0.9999


@pytest.mark.timeout(120)
def test_compiled_attention_is_one_opaque_op_and_matches_eager() -> None:
    graphs: list[torch.fx.GraphModule] = []

    def keep_graph(graph_module: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        graphs.append(graph_module)
        return graph_module.forward

    q, k, v = qkv(1, 2, 300)
    with torch.inference_mode():
        traced = torch.compile(attention, backend=keep_graph, fullgraph=True)(q, k, v)
        inductor = torch.compile(attention, fullgraph=True)(q, k, v)
    assert len(graphs) == 1
    code = graphs[0].code
    assert "chunked_attention" in code and "softmax" not in code and "scaled_dot_product" not in code
    torch.testing.assert_close(traced, attention(q, k, v))
    torch.testing.assert_close(inductor, attention(q, k, v))
    # and in the graph torch.export makes for an AOTInductor package (sam3core.aot_package: non-strict)

    class Attention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return attention(q, k, v)

    with torch.inference_mode():
        exported = torch.export.export(Attention(), (q, k, v), strict=False).graph_module.code
    assert "chunked_attention" in exported and "bmm" not in exported and "softmax" not in exported


def test_where_the_table_says_sdpa_the_cpu_runs_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_module, "CPU_KERNELS", {})
    calls: list[str] = []
    monkeypatch.setattr(attention_module, "chunked_attention", lambda *a: calls.append("chunked"))
    monkeypatch.setattr(attention_module, "chunked_attention_loop", lambda *a: calls.append("chunked"))
    q, k, v = qkv(1, 2, 30)
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert calls == []


def test_off_the_cpu_attention_is_sdpa() -> None:
    # the meta device stands for an accelerator here; FLOP counting on meta copies relies on this path too
    q, k, v = (t.to("meta") for t in qkv(1, 2, 10))
    out = attention(q, k, v)
    assert out.device.type == "meta" and out.shape == (1, 2, 10, 16)


def test_where_a_gradient_is_wanted_attention_runs_sdpa_and_backpropagates() -> None:
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 20))
    attention(q, k, v).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    expected = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*expected).square().sum().backward()
    for actual, reference in zip(grads, expected, strict=True):
        torch.testing.assert_close(actual, reference.grad)


def test_chunks_take_the_same_share_of_a_smaller_l3_cache() -> None:
    budget = attention_module.SCORES_PER_CHUNK
    assert chunk_shape(16, 5184, 2, l3_bytes=32 * 2**20)[1] == budget // 5184  # the cache it was measured on
    assert chunk_shape(16, 5184, 2, l3_bytes=16 * 2**20)[1] == budget // 2 // 5184  # half the cache, half the chunk
    assert chunk_shape(16, 5184, 4, l3_bytes=16 * 2**20)[1] == budget // 4 // 5184


@pytest.mark.timeout(60)
def test_eager_chunked_attention_does_not_import_dynamo() -> None:
    # Calling the custom op imports torch._dynamo (1.4 s of CPU), which every eager model actor would pay.
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "import sam3core.attention as a\n"
        "a.CPU_KERNELS = {(a.cpu_features().isa, torch.bfloat16): 'chunked'}\n"
        "q = torch.randn(1, 2, 40, 16, dtype=torch.bfloat16)\n"
        "with torch.inference_mode():\n"
        "    out = a.attention(q, q, q)\n"
        "    assert 'torch._dynamo' not in sys.modules, 'the eager call imported torch._dynamo'\n"
        "    torch.testing.assert_close(out, a.chunked_attention(q, q, q))\n"  # the op computes the same
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr[-2000:]
