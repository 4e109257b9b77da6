"""The two statistics of a comparison: a 95% Wilson score interval and the exact paired sign test.

Wilson (1927): for ``k`` successes in ``n`` trials, the interval of proportions p whose z-test does not
reject, ``(p̂ + z²/2n ± z·sqrt(p̂(1-p̂)/n + z²/4n²)) / (1 + z²/n)``. Unlike the normal interval it stays inside
[0, 1] and is sensible at 0 or n successes, which matters at the accuracies a small model reaches.

Paired test: on the same problems, count the problems where strategy A scores above B (wins) and below
(losses); ties carry no information. Under "no difference" a win is as likely as a loss, so
``p = P(|Binomial(w + l, 1/2) - (w+l)/2| >= |w - (w+l)/2|)``: the exact McNemar test (one seed), or the sign
test on per-problem mean scores (several seeds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

Z95 = 1.959963984540054  # the 97.5% point of the standard normal


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes`` out of ``n`` (``successes`` may be fractional: a mean over
    seeds per problem, with ``n`` the number of problems). ``(0, 1)`` when ``n`` is 0."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be between 0 and n={n}, got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # at 0 or n successes the bound is exactly 0 or 1 (rounding would leave it a hair off, outside p̂)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return (min(low, p), max(high, p))


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact p-value of ``wins`` against ``losses`` under p = 1/2 (1.0 when both are 0)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """A against B on the problems both solved-or-not: wins (A above B), losses, ties and the exact p."""

    wins: int
    losses: int
    ties: int
    p: float

    @property
    def problems(self) -> int:
        return self.wins + self.losses + self.ties


def paired_test(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Per-problem scores of A and B (same order, same problems; 0/1 or means over seeds)."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same problems ({len(a)} vs {len(b)})")
    wins = sum(1 for x, y in zip(a, b) if x > y)
    losses = sum(1 for x, y in zip(a, b) if x < y)
    return Paired(wins, losses, len(a) - wins - losses, sign_test_p(wins, losses))
