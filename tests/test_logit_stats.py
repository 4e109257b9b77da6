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
