"""The native pass over a decode step's logits (``torch.ops.marco.logit_stats``): the top-k and both
log-sum-exps equal torch's, and the sampler draws the same tokens from them.

Tolerance for the log-sum-exps: 1e-5 absolute (another summation order over 49k terms and the kernel's exp
polynomial, relative error ~2e-7); the top-k values and ids are exact, ties broken towards the lower id."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marco.llm.hf import HFBackend, _row_generator, _Top
from marco.llm.kernels import logit_stats_op, logit_stats_reference

pytestmark = pytest.mark.skipif(logit_stats_op() is None, reason="the native kernels did not build here")


@pytest.mark.parametrize("vocab,k", [(49152, 256), (1000, 5), (300, 300), (37, 1)])
def test_it_equals_torchs_logsumexp_and_topk(vocab: int, k: int) -> None:
    g = torch.Generator().manual_seed(vocab + k)
    x = torch.randn(9, vocab, generator=g) * 4
    x[1] = -1e4  # a flat row: all ties
    x[2, ::7] = 9.0  # many equal maxima
    temps = torch.tensor([1.0, 0.7, 1.3, 1e-6, 2.0, 0.5, 1.0, 0.9, 1.1])
    lse, lse_t, values, ids = logit_stats_op()(x, temps, k)
    want = logit_stats_reference(x, temps, k)
    torch.testing.assert_close(lse, want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(lse_t[[0, 1, 2, 4, 5, 6, 7, 8]], want[1][[0, 1, 2, 4, 5, 6, 7, 8]], atol=1e-5, rtol=1e-6)
    assert torch.isfinite(lse_t[3])  # temperature ~0: a huge scale, still a finite log-sum-exp
    assert torch.equal(values, want[2])
    assert torch.equal(values, torch.gather(x, 1, ids))
    for r in range(9):  # ties: the lower id first
        for a, b in zip(range(k - 1), range(1, k)):
            if values[r, a] == values[r, b]:
                assert ids[r, a] < ids[r, b]
    assert torch.equal(ids[1], torch.arange(k))


@pytest.mark.parametrize("shape", ["peaked", "flat_tail", "sorted_up", "few_finite"])
def test_the_top_k_is_exact_whatever_the_spread(shape: str) -> None:
    """The top-k comes from the blocks with the highest maxima: spreads that put many or few of the top logits
    in one block, and a row with fewer finite logits than k."""
    g = torch.Generator().manual_seed(len(shape))
    rows, vocab, k = 6, 49152, 256
    if shape == "peaked":  # a search's logits: a few likely tokens, a long tail
        x = torch.randn(rows, vocab, generator=g) * 2 - 10
        x[:, torch.randint(0, vocab, (20,), generator=g)] += 15
    elif shape == "flat_tail":  # the top 256 all in the first few blocks
        x = torch.randn(rows, vocab, generator=g) * 0.01
        x[:, :300] += 5
    elif shape == "sorted_up":  # the top 256 in the last blocks, the first blocks' maxima lowest
        x = torch.arange(vocab, dtype=torch.float32).repeat(rows, 1) / 1000
    else:
        x = torch.full((rows, vocab), float("-inf"))
        x[:, 100:150] = torch.randn(rows, 50, generator=g)
    temps = torch.full((rows,), 0.7)
    _, _, values, ids = logit_stats_op()(x, temps, k)
    want = x.topk(k, dim=-1)
    assert torch.equal(values, want.values)
    assert torch.equal(values, torch.gather(x, 1, ids))
    assert all(len(set(r)) == k for r in ids.tolist())  # no id twice


def test_bfloat16_logits_give_what_their_float32_copy_gives() -> None:
    """The decode step's bfloat16 logits go in as they are: widened exactly inside the pass, no float32 copy."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 49152, generator=g) * 3).to(torch.bfloat16)  # bfloat16 logits tie often
    temps = torch.tensor([1.0, 0.7, 1.3, 0.5, 2.0, 0.9, 1.1])
    got, want = logit_stats_op()(x, temps, 256), logit_stats_op()(x.float(), temps, 256)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_nan_logits_neither_crash_nor_repeat_an_id() -> None:
    x = torch.randn(3, 5000)
    x[0, ::3] = float("nan")
    x[1] = float("nan")
    _, _, values, ids = logit_stats_op()(x, torch.ones(3), 256)
    assert all(len(set(r)) == 256 for r in ids.tolist())
    assert torch.equal(values[2], x[2].topk(256).values)


def test_the_sampler_draws_the_same_tokens_from_it_as_from_torchs_topk() -> None:
    """Both of the sampler's paths: rows whose top 256 hold top_p, and rows drawn again from a wider list."""
    g = torch.Generator().manual_seed(5)
    n, vocab = 64, 49152
    logits = torch.randn(n, vocab, generator=g) * 3
    logits[n // 2 :] = torch.full((n // 2, vocab), -10.0) + torch.randn(n // 2, vocab, generator=g) * 0.1
    logits[n // 2 :, :300] = torch.randn(n // 2, 300, generator=g) * 0.3  # ~300 likely tokens: past the top 256
    temps = torch.rand(n, generator=g) + 0.5
    top_ps = torch.full((n,), 0.95)
    b = HFBackend.__new__(HFBackend)
    samp = torch.ones(n, dtype=torch.bool)

    def draw(top):  # type: ignore[no-untyped-def]
        gens = [_row_generator(11, j, torch.device("cpu")) for j in range(n)]
        return b._sample(logits, logits.argmax(-1), torch.arange(n), samp, temps, top_ps, gens, top=top).numpy()

    _, lse_t, values, ids = logit_stats_op()(logits, temps, 256)
    native = draw(_Top(values, ids, lse_t[:, None]))
    torch_top = draw(logits.topk(256, dim=-1))
    assert (native == torch_top).all()
    assert np.isin(native[n // 2 :], np.arange(256), invert=True).any()  # some draws came from the wider list
