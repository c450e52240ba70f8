"""The rotary embedding's two forms: eager code multiplies complex numbers (one pass), compiled graphs run the
rotation written out (inductor fuses it; it compiles no complex arithmetic). Both must give the same bits."""

from __future__ import annotations

import pytest
import torch

from sam3core.rope import AxialRoPE, rotate_complex, rotate_real


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [8, 24])
def test_complex_rotation_is_bit_identical_to_the_written_out_one(dtype: torch.dtype, grid: int) -> None:
    rope = AxialRoPE(64, grid, 10000.0, position_scale=0.5)
    x = torch.randn(3, 4, grid * grid, 64, generator=torch.Generator().manual_seed(grid)).to(dtype)
    expected = rotate_real(x, rope.cos, rope.sin)
    actual = rotate_complex(x, rope.cos, rope.sin)
    assert actual.dtype == dtype and actual.shape == x.shape
    assert torch.equal(actual, expected)


def test_eager_calls_take_the_complex_form_and_compiled_graphs_the_real_one() -> None:
    from torch._dynamo.testing import CompileCounter

    rope = AxialRoPE(16, 4, 10000.0, 1.0)
    q = torch.randn(2, 2, 16, 16)
    k = torch.randn(2, 2, 16, 16)
    eager = rope(q, k)
    counter = CompileCounter()
    compiled = torch.compile(rope, backend=counter, fullgraph=True)(q, k)  # fullgraph: no complex graph break
    assert counter.frame_count == 1
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)
    torch._dynamo.reset()


def test_the_rotation_keeps_its_gradient() -> None:
    rope = AxialRoPE(16, 4, 10000.0, 1.0)
    q = torch.randn(1, 2, 16, 16, requires_grad=True)
    rotated, _ = rope(q, q.detach())
    rotated.sum().backward()
    reference = q.detach().clone().requires_grad_(True)
    rotate_real(reference, rope.cos, rope.sin).sum().backward()
    torch.testing.assert_close(q.grad, reference.grad)
