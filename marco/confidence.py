"""Token confidence, the value signal of Marco-o1's search.

``c_i = exp(lp(t_i)) / sum_{k=1..5} exp(lp(top_k))``: the chosen token's probability against the 5 most
likely tokens at that position, all from the raw (pre-temperature) log-softmax. When the chosen token is
itself in the top 5 it appears once in the denominator; when it was sampled from outside the top 5 it is
*not* added, so its ``c_i`` is small (and can exceed nothing: it stays below ``p(top_5)/sum(top_5)``).
A rollout's value is ``v = mean_i c_i`` over every generated token.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def token_confidences(chosen_logprobs: Sequence[float], top_logprobs: Sequence[Sequence[float]]) -> list[float]:
    """Per-token ``c_i`` for one generation (vectorised over positions)."""
    if len(chosen_logprobs) != len(top_logprobs):
        raise ValueError(
            f"{len(chosen_logprobs)} chosen log-probabilities but {len(top_logprobs)} top-k rows"
        )
    if not chosen_logprobs:
        return []
    chosen = np.asarray(chosen_logprobs, dtype=np.float64)
    top = np.asarray(top_logprobs, dtype=np.float64)
    if top.ndim != 2 or top.shape[1] == 0:
        raise ValueError("top_logprobs must be a non-empty list of top-k log-probabilities per position")
    # log-sum-exp over the top-k, shifted by the row max for stability
    m = top.max(axis=1)
    log_denominator = m + np.log(np.exp(top - m[:, None]).sum(axis=1))
    return np.exp(chosen - log_denominator).tolist()


def rollout_value(confidences: Sequence[float]) -> float | None:
    """``v = mean_i c_i``; None for an empty rollout."""
    if len(confidences) == 0:
        return None
    return float(np.mean(confidences))
