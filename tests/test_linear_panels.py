"""marco/llm/kernels/linear.cpp: products on weights packed into panels (the decode step's kernel: float32 on
AVX2 CPUs in 16-column panels and on AVX-512 CPUs in 32-column panels; bfloat16 on AVX512-BF16 CPUs, 32-column
panels of input pairs, multiplied on AMX's tiles where the CPU has them and the input size is a multiple of 32) equal ``F.linear`` within their dtype's rounding, whatever the shapes, and a row's result
never depends on the other rows of the batch or on the thread count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from marco.llm.kernels import linear_panels_op
from marco.llm.precision import local_cpu_flags

pytestmark = pytest.mark.skipif(linear_panels_op() is None, reason="no AVX2/FMA or AVX-512 panel kernel here")
BF16 = pytest.mark.skipif(linear_panels_op(torch.bfloat16) is None, reason="no AVX512-BF16 panel kernel here")


def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.marco.linear_panels(x, torch.ops.marco.pack_panels(w), w.shape[0])


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 11, 12, 13, 25, 58, 129])
@pytest.mark.parametrize(("fan_in", "fan_out"), [(1, 1), (33, 15), (64, 16), (40, 17), (40, 32), (40, 47), (576, 100), (96, 960)])
def test_products_match_f_linear_at_every_shape(rows: int, fan_in: int, fan_out: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + fan_in + fan_out)
    x, w = torch.randn(rows, fan_in, generator=g), torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
    got, want = product(x, w), F.linear(x, w)
    assert got.shape == (rows, fan_out) and got.dtype == torch.float32
    # one float32 accumulator per output over the input index in order: rounding grows with fan_in
    torch.testing.assert_close(got, want, atol=2e-6 * fan_in**0.5, rtol=1e-5)


def test_panels_hold_the_weights_a_panel_width_at_a_time_padded_with_zeros() -> None:
    width = 32 if "avx512f" in local_cpu_flags() else 16  # one AVX-512 tile's two vectors, or AVX2's
    w = torch.arange((width + 4) * 3, dtype=torch.float32).view(width + 4, 3)
    p = torch.ops.marco.pack_panels(w)
    assert p.shape == (2, 3, width) and p.is_contiguous()
    assert torch.equal(p[0], w[:width].t()) and torch.equal(p[1, :, :4], w[width:].t())
    assert not p[1, :, 4:].any()


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16)])
def test_a_rows_result_does_not_depend_on_the_batch_or_the_threads(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(61, 576, generator=g).to(dtype), (torch.randn(1536, 576, generator=g) / 24).to(dtype)
    panels = torch.ops.marco.pack_panels(w)
    full = torch.ops.marco.linear_panels(x, panels, 1536)
    perm = torch.randperm(61, generator=g)
    assert torch.equal(torch.ops.marco.linear_panels(x[perm], panels, 1536), full[perm])
    # every tile height's first and last rows, in both dtypes; on AMX, blocks of 16 rows in pairs and a last one
    for i in (0, 5, 6, 11, 12, 15, 16, 31, 32, 47, 48, 60):
        assert torch.equal(torch.ops.marco.linear_panels(x[i : i + 1], panels, 1536), full[i : i + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(torch.ops.marco.linear_panels(x, panels, 1536), full)
    finally:
        torch.set_num_threads(threads)


def test_strided_inputs_and_empty_batches() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 40, generator=g)
    x = torch.randn(40, 9, generator=g).t()  # not contiguous
    torch.testing.assert_close(product(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
    assert product(torch.empty(0, 40), w).shape == (0, 48)


def test_wrong_inputs_say_what_is_wrong() -> None:
    w = torch.randn(32, 8)
    panels = torch.ops.marco.pack_panels(w)
    with pytest.raises(RuntimeError, match="x has 9 columns but the panels were packed for 8"):
        torch.ops.marco.linear_panels(torch.randn(2, 9), panels, 32)
    with pytest.raises(RuntimeError, match=r"out=64 does not match [12] panels"):
        torch.ops.marco.linear_panels(torch.randn(2, 8), panels, 64)
    with pytest.raises(RuntimeError, match="x must be a 2-d float32"):
        torch.ops.marco.linear_panels(torch.randn(2, 8, dtype=torch.float64), panels, 32)
    with pytest.raises(RuntimeError, match="w must be a 2-d float32 or bfloat16"):
        torch.ops.marco.pack_panels(w.double())
    with pytest.raises(RuntimeError, match="in the panels' dtype"):
        torch.ops.marco.linear_panels(torch.randn(2, 8).bfloat16(), panels, 32)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=BF16)])
@pytest.mark.parametrize("rows", [1, 6, 7, 13, 58])
@pytest.mark.parametrize(("fan_in", "fan_out"), [(40, 17), (576, 576), (1536, 576), (33, 47)])
def test_the_residual_add_equals_adding_after_the_product_to_the_bit(
    rows: int, fan_in: int, fan_out: int, dtype: torch.dtype,
) -> None:
    """``linear_panels_add(x, p, out, res)`` adds each tile's block to the residual while it is in cache: the same
    sum as torch's ``res + linear_panels(x, p, out)``, whatever the rows, tails and panel tails (bfloat16: the
    product rounded, then the sum)."""
    fan_in += fan_in % 2 if dtype == torch.bfloat16 else 0  # bfloat16 panels take pairs of inputs
    g = torch.Generator().manual_seed(rows + fan_in + fan_out)
    x, w = torch.randn(rows, fan_in, generator=g), torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
    x, w = x.to(dtype), w.to(dtype)
    res = (torch.randn(rows, fan_out, generator=g) * 10).to(dtype)
    panels = torch.ops.marco.pack_panels(w)
    got = torch.ops.marco.linear_panels_add(x, panels, fan_out, res)
    assert got.dtype == dtype
    assert torch.equal(got, res + torch.ops.marco.linear_panels(x, panels, fan_out))
    # a strided residual (a slice) is read as the values it holds
    wide = torch.randn(rows, fan_out + 3, generator=g).to(dtype)
    assert torch.equal(torch.ops.marco.linear_panels_add(x, panels, fan_out, wide[:, :fan_out]),
                       wide[:, :fan_out] + torch.ops.marco.linear_panels(x, panels, fan_out))


def test_the_residual_add_says_what_is_wrong() -> None:
    panels = torch.ops.marco.pack_panels(torch.randn(32, 8))
    with pytest.raises(RuntimeError, match=r"residual must be float32 \[rows, out\] = \[2, 32\]"):
        torch.ops.marco.linear_panels_add(torch.randn(2, 8), panels, 32, torch.randn(3, 32))
    with pytest.raises(RuntimeError, match="in the panels' dtype"):
        torch.ops.marco.linear_panels_add(torch.randn(2, 8).bfloat16(), panels, 32, torch.randn(2, 32))
    if linear_panels_op(torch.bfloat16) is not None:
        bf = torch.ops.marco.pack_panels(torch.randn(32, 8).bfloat16())
        with pytest.raises(RuntimeError, match=r"residual must be bfloat16 \[rows, out\]"):
            torch.ops.marco.linear_panels_add(torch.randn(2, 8).bfloat16(), bf, 32, torch.randn(2, 32))
    empty = torch.ops.marco.pack_panels(torch.randn(32, 0))
    res = torch.randn(2, 32)
    assert torch.equal(torch.ops.marco.linear_panels_add(torch.randn(2, 0), empty, 32, res), res)


@BF16
@pytest.mark.parametrize("rows", [1, 11, 12, 13, 16, 33, 58, 64, 129])
@pytest.mark.parametrize(("fan_in", "fan_out"), [(2, 1), (34, 15), (64, 32), (40, 33), (576, 100), (96, 960)])
def test_bfloat16_products_match_f_linear_within_one_bfloat16_step(rows: int, fan_in: int, fan_out: int) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + fan_in + fan_out)
    x = torch.randn(rows, fan_in, generator=g).bfloat16()
    w = (torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5).bfloat16()
    got = product(x, w)
    assert got.shape == (rows, fan_out) and got.dtype == torch.bfloat16
    exact = F.linear(x.double(), w.double())  # the exact sums of the same bfloat16 inputs
    # float32 sums, then one rounding to bfloat16 (8 significant bits): within a bfloat16 step of the exact sum
    torch.testing.assert_close(got.double(), exact, atol=1e-3 * fan_in**0.5, rtol=2**-8)
    # and what oneDNN's F.linear gives, but for a rare output rounded the other way
    assert (got != F.linear(x, w)).float().mean() < 0.01


@BF16
def test_bfloat16_panels_hold_input_pairs_thirty_two_columns_at_a_time() -> None:
    w = torch.arange(40 * 4, dtype=torch.float32).view(40, 4).bfloat16()
    p = torch.ops.marco.pack_panels(w)
    assert p.shape == (2, 2, 32, 2) and p.dtype == torch.bfloat16 and p.is_contiguous()
    assert torch.equal(p[0, 1, 5], w[5, 2:4])  # panel 0, input pair 1, column 5: w[5, 2], w[5, 3]
    assert torch.equal(p[1, 0, :8], w[32:, 0:2]) and not p[1, :, 8:].any()
    with pytest.raises(RuntimeError, match="even number of input columns, not 5"):
        torch.ops.marco.pack_panels(torch.ones(4, 5).bfloat16())
