"""Decode-step attention for the transformers backend's slot cache.

A decode step has one query per row. The slot cache (:mod:`marco.llm.kvcache`) hands attention each
layer's keys and values as ``buffer[:rows]``, a contiguous ``[rows, kv_heads, columns, head_dim]`` block
whose columns past a row's length are masked out. Over such a block, two batched matmuls (the ``g`` query
heads that share a KV head form the rows of one small matrix, so keys are never repeated) read the cache
once each; PyTorch's fused CPU attention kernel took about twice as long at the search's shapes (48 rows,
3 KV heads, 400 columns: 0.9 ms against 0.4 ms per layer in bfloat16, ``bench/attention_decode.py``).

Scores are computed in the model's dtype and soft-maxed in float32. In bfloat16 that rounds each score to
8 significant bits before the softmax, where the fused kernel keeps float32 scores; the difference is of the
size of bfloat16's own rounding of the queries and keys (``tests/test_attention.py`` states the bound).

Everything else (a prefill's many queries, a mask that is not boolean, a non-contiguous cache, gradients)
goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from marco.llm.kernels import decode_attention_op

NAME = "marco_decode"
# the slot cache's decode step passes each row's length (``model(..., marco_lens=lens)``: transformers hands
# extra keyword arguments down to the attention function); with it the native kernel reads only the row's
# own columns, without it (or where the kernel could not be built) the batched matmuls below run
LENS_KWARG = "marco_lens"


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for ``query`` of one position per row (``[n, heads, 1, d]``); the output is
    ``[n, 1, heads, d]``, as transformers' attention functions return it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n, heads, q_len, d = query.shape
    kv_heads, width = key.shape[1], key.shape[2]
    if (q_len != 1 or dropout or torch.is_grad_enabled() or not key.is_contiguous() or not value.is_contiguous()
            or heads % kv_heads or (attention_mask is not None and attention_mask.dtype != torch.bool)
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    group = heads // kv_heads
    scale = scaling if scaling is not None else d**-0.5
    lens = kwargs.get(LENS_KWARG)
    if lens is not None and query.dtype in (torch.float32, torch.bfloat16):
        op = decode_attention_op()
        if op is not None:  # reads each row's own columns only (marco.llm.kernels)
            out = op(query.reshape(n, heads, d), key, value, lens, float(scale))
            return out.view(n, 1, heads, d), None
    # query heads h*group .. h*group + group - 1 share KV head h (transformers' repeat_kv order)
    q = (query * scale).reshape(n * kv_heads, group, d)
    scores = torch.bmm(q, key.view(n * kv_heads, width, d).transpose(1, 2)).float()
    if attention_mask is not None:
        scores.view(n, kv_heads, group, width).masked_fill_(~attention_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.bmm(probs, value.view(n * kv_heads, width, d))
    return out.view(n, 1, heads, d), None


def register() -> str:
    """Make ``NAME`` a transformers attention implementation (SDPA's boolean masks); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
