"""The transformers backend's sampler against the exact temperature + top-p (nucleus) distribution.

``HFBackend._sample`` is called directly on synthetic logits (no model needed): many rows with the same
logits, each with its own generator, give independent draws; their frequencies are checked with a
chi-square goodness-of-fit test against the exact nucleus distribution, on both paths: the top-256
shortcut and the full sort taken when the top 256 tokens hold less than top_p of the mass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marco.llm.hf import HFBackend, _row_generator

BINS = 20  # at most; a token heavier than 1/BINS is a bin of its own
DRAWS = 10_000


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> np.ndarray:
    """The exact distribution: softmax(logits / T), keep the smallest most-likely prefix whose mass reaches
    top_p, renormalise."""
    p = torch.softmax(logits.double() / temperature, -1).numpy()
    order = np.argsort(-p, kind="stable")
    cum = np.cumsum(p[order])
    keep = order[(cum - p[order]) < top_p]
    out = np.zeros_like(p)
    out[keep] = p[keep]
    return out / out.sum()


def draw(logits: torch.Tensor, temperature: float, top_p: float, n: int, seed: int) -> np.ndarray:
    """``n`` draws from ``HFBackend._sample``: n rows of the same logits, row j seeded with (seed, j)."""
    backend = HFBackend.__new__(HFBackend)  # _sample uses no model state
    rows = logits.float()[None, :].expand(n, -1).contiguous()
    greedy = rows.argmax(-1)
    act = torch.arange(n)
    samp = torch.ones(n, dtype=torch.bool)
    temps = torch.full((n,), temperature)
    top_ps = torch.full((n,), top_p)
    gens = [_row_generator(seed, j, torch.device("cpu")) for j in range(n)]
    return backend._sample(rows, greedy, act, samp, temps, top_ps, gens).numpy()


def critical_value(df: int, z: float = 3.0902) -> float:
    """The chi-square 0.999 quantile (z = the standard normal's 0.999 point) by the Wilson-Hilferty cube
    approximation, within 2% of the exact value for df >= 5: a fixed, seeded test fails by chance 1 in 1000."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * h**0.5) ** 3


def chi_square(tokens: np.ndarray, expected_p: np.ndarray) -> tuple[float, int, int]:
    """Pearson's statistic over bins of consecutive tokens (descending probability), each bin holding at
    least 1/BINS of the mass; returns (statistic, degrees of freedom, draws outside the nucleus)."""
    order = np.argsort(-expected_p, kind="stable")
    inside = order[expected_p[order] > 0]
    bin_of_token = np.full(len(expected_p), -1)
    masses: list[float] = [0.0]
    for t in inside:
        if masses[-1] >= 1.0 / BINS:
            masses.append(0.0)
        bin_of_token[t] = len(masses) - 1
        masses[-1] += expected_p[t]
    if len(masses) > 1 and masses[-1] < 1.0 / BINS:  # fold a light last bin into the one before
        bin_of_token[bin_of_token == len(masses) - 1] = len(masses) - 2
        last = masses.pop()
        masses[-1] += last
    exp = np.array(masses) * len(tokens)
    bins = bin_of_token[tokens]
    outside = int((bins < 0).sum())
    obs = np.bincount(bins[bins >= 0], minlength=len(masses))
    assert (exp >= 5).all(), "every bin needs an expected count of at least 5"
    return float(((obs - exp) ** 2 / exp).sum()), len(masses) - 1, outside


def peaked_logits(vocab: int = 2000) -> torch.Tensor:
    """A few dozen likely tokens: the nucleus fits in the top 256."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(vocab, generator=g) * 3.0


def flat_logits(vocab: int = 3000) -> torch.Tensor:
    """Mass spread over thousands of tokens: the top 256 hold far less than top_p."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(vocab, generator=g) * 0.4


def test_critical_value_matches_the_tables() -> None:
    for df, table in ((5, 20.515), (10, 29.588), (19, 43.820), (30, 59.703)):  # chi-square 0.999 quantiles
        assert abs(critical_value(df) - table) / table < 0.02


@pytest.mark.parametrize(
    "make, temperature, top_p, shortcut",
    [
        (peaked_logits, 0.7, 0.9, True),
        (peaked_logits, 1.3, 0.8, True),
        (flat_logits, 1.0, 0.95, False),
        (flat_logits, 0.6, 0.7, False),
    ],
)
def test_draws_follow_the_exact_nucleus_distribution(make, temperature: float, top_p: float, shortcut: bool) -> None:
    logits = make()
    top256 = torch.softmax(logits / temperature, -1).topk(256).values.sum().item()
    assert (top256 >= top_p) is shortcut  # the case exercises the path it is meant to
    expected = nucleus(logits, temperature, top_p)
    tokens = draw(logits, temperature, top_p, DRAWS, seed=11)
    stat, df, outside = chi_square(tokens, expected)
    assert outside == 0, f"{outside} draws fell outside the nucleus"
    assert df >= 5
    assert stat < critical_value(df), f"chi-square {stat:.1f} >= {critical_value(df):.1f} ({df} df, p < 0.001)"
    if not shortcut:
        assert (expected > 0).sum() > 256  # the nucleus really is wider than the shortcut's 256 tokens
        assert np.isin(tokens, np.argsort(-expected)[256:]).any()  # and draws land past the top 256


def test_the_test_rejects_a_wrong_distribution() -> None:
    """The same statistic on draws at the wrong temperature is far over the critical value (the test has power)."""
    logits = peaked_logits()
    tokens = draw(logits, 1.0, 0.9, DRAWS, seed=11)
    stat, df, _ = chi_square(tokens, nucleus(logits, 0.7, 0.9))
    assert stat > critical_value(df)


def test_rows_of_both_paths_in_one_batch_draw_as_they_would_alone() -> None:
    """A row's draw is decided per row: batching a shortcut row with a full-sort row changes neither."""
    backend = HFBackend.__new__(HFBackend)
    peaked, flat = peaked_logits(3000), flat_logits(3000)
    rows = torch.stack([peaked, flat, peaked, flat])
    temps, top_ps = torch.tensor([0.7, 1.0, 0.7, 1.0]), torch.tensor([0.9, 0.95, 0.9, 0.95])
    samp = torch.tensor([True, True, False, True])
    gens = [_row_generator(5, j, torch.device("cpu")) for j in range(4)]
    together = backend._sample(rows, rows.argmax(-1), torch.arange(4), samp, temps, top_ps, gens)
    assert together[2].item() == peaked.argmax().item()  # a greedy row keeps its argmax
    for j in (0, 1, 3):
        alone = backend._sample(rows[j : j + 1], rows[j : j + 1].argmax(-1), torch.arange(1), samp[j : j + 1],
                                temps[j : j + 1], top_ps[j : j + 1], [_row_generator(5, j, torch.device("cpu"))])
        assert alone.item() == together[j].item()


def middle_logits(vocab: int = 20_000) -> torch.Tensor:
    """~300 likely tokens in a large vocabulary: the top 256 hold less than top_p, the top 4096 more."""
    g = torch.Generator().manual_seed(3)
    logits = torch.full((vocab,), -10.0) + torch.randn(vocab, generator=g) * 0.1
    logits[torch.randperm(vocab, generator=g)[:300]] = torch.randn(300, generator=g) * 0.3
    return logits


def test_rows_past_the_top_256_draw_from_the_top_4096_as_the_full_sort_would() -> None:
    """The middle candidate list (a top-4096, no full sort of the vocabulary) gives the full sort's draws, and
    those follow the exact nucleus distribution."""
    logits, temperature, top_p = middle_logits(), 1.0, 0.95
    p = torch.softmax(logits / temperature, -1)
    assert p.topk(256).values.sum() < top_p <= p.topk(4096).values.sum()  # the middle path is the one taken
    n = 4000
    fast = draw(logits, temperature, top_p, n, seed=7)
    full = HFBackend.__new__(HFBackend)
    full.SAMPLE_CANDIDATES = (256, 1 << 62)  # the former sampler: the top 256, else the full sort
    rows = logits[None, :].expand(n, -1).contiguous()
    gens = [_row_generator(7, j, torch.device("cpu")) for j in range(n)]
    reference = full._sample(rows, rows.argmax(-1), torch.arange(n), torch.ones(n, dtype=torch.bool),
                             torch.full((n,), temperature), torch.full((n,), top_p), gens).numpy()
    assert (fast == reference).all()
    assert np.isin(fast, p.topk(256).indices.numpy(), invert=True).any()  # draws land past the top 256
    stat, df, outside = chi_square(fast, nucleus(logits, temperature, top_p))
    assert outside == 0 and df >= 5
    assert stat < critical_value(df), f"chi-square {stat:.1f} >= {critical_value(df):.1f} ({df} df, p < 0.001)"
