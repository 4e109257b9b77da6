"""``marco.llm.attention``: decode attention over the slot cache's contiguous block, against transformers' SDPA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from marco.llm.attention import NAME, decode_attention
from marco.llm.base import GenerationRequest


def gqa_module(groups: int = 3) -> torch.nn.Module:
    module = torch.nn.Module()
    module.num_key_value_groups = groups  # type: ignore[assignment]
    return module


def case(rows: int = 6, width: int = 40, alloc: int = 64, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A query per row, a KV block ``alloc`` columns wide whose columns past each row's length hold garbage,
    and the boolean mask transformers builds for it."""
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, 9, 1, 64, generator=g)
    keys = torch.randn(rows, 3, alloc, 64, generator=g)
    values = torch.randn(rows, 3, alloc, 64, generator=g)
    lens = torch.randint(1, width, (rows,), generator=g)
    mask = torch.arange(alloc)[None, :] <= lens[:, None]
    keys[~mask[:, None, :].expand(-1, 3, -1)] = 1e4  # stale columns must not leak through the mask
    values[~mask[:, None, :].expand(-1, 3, -1)] = 1e4
    return query.to(dtype), keys.to(dtype), values.to(dtype), mask[:, None, None, :], lens


def test_decode_attention_equals_sdpa_on_the_narrow_slice_in_float32() -> None:
    query, keys, values, mask, lens = case()
    width = int(lens.max()) + 1
    with torch.inference_mode():
        ours, _ = decode_attention(gqa_module(), query, keys, values, mask, scaling=0.125)
        ref, _ = sdpa_attention_forward(gqa_module(), query, keys[:, :, :width], values[:, :, :width],
                                        mask[..., :width], scaling=0.125)
    assert ours.shape == ref.shape == (6, 1, 9, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_grouped_heads_use_their_own_kv_head() -> None:
    """Query heads 0-2 read KV head 0, 3-5 head 1, 6-8 head 2 (transformers' repeat_kv order): with one
    column per row, each query head's output is that KV head's value."""
    query, keys, values = torch.randn(2, 9, 1, 8), torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
    with torch.inference_mode():
        out, _ = decode_attention(gqa_module(), query, keys, values, None, scaling=1.0)
    for h in range(9):
        torch.testing.assert_close(out[:, 0, h], values[:, h // 3, 0])


def test_bfloat16_stays_within_bfloat16s_own_error() -> None:
    """In bfloat16 the scores are rounded to 8 bits before the softmax (SDPA keeps them in float32). Against
    the float32 result, ours must stay within 1.5x SDPA's own bfloat16 error, plus 0.01 (outputs here are
    of order 0.3; bfloat16's relative step is 2^-8)."""
    q32, k32, v32, mask, _ = case(rows=16, width=300, alloc=320, seed=3)
    with torch.inference_mode():
        ref, _ = decode_attention(gqa_module(), q32, k32, v32, mask, scaling=0.125)
        q, k, v = (t.to(torch.bfloat16) for t in (q32, k32, v32))
        ours, _ = decode_attention(gqa_module(), q, k, v, mask, scaling=0.125)
        sdpa, _ = sdpa_attention_forward(gqa_module(), q, k, v, mask, scaling=0.125)
    ours_err = (ours.float() - ref).abs().max().item()
    sdpa_err = (sdpa.float() - ref).abs().max().item()
    assert ours_err <= 1.5 * sdpa_err + 0.01, (ours_err, sdpa_err)


@pytest.mark.parametrize("why", ["prefill", "strided", "grad"])
def test_what_it_does_not_handle_goes_to_sdpa_unchanged(why: str) -> None:
    query, keys, values, mask, _ = case()
    if why == "prefill":
        query = torch.randn(6, 9, 4, 64)
        mask = mask.expand(-1, -1, 4, -1)
    if why == "strided":
        keys, values, mask = keys[:, :, :50], values[:, :, :50], mask[..., :50]
    with torch.set_grad_enabled(why == "grad"):
        ours, _ = decode_attention(gqa_module(), query, keys, values, mask, scaling=0.125)
        ref, _ = sdpa_attention_forward(gqa_module(), query, keys, values, mask, scaling=0.125)
    assert torch.equal(ours, ref)


@pytest.mark.slow
def test_the_backend_decodes_the_same_with_it_and_with_sdpa(smollm2) -> None:
    """float32 on the real model: greedy tokens identical and top-5 log-probabilities within 1e-4 whether the
    decode steps run through ``marco.llm.attention`` (the default) or transformers' SDPA."""
    assert smollm2.decode_attention and smollm2.model.config._attn_implementation == NAME
    prompts = [smollm2.apply_chat_template([{"role": "user", "content": q}], "<Thought>\n")
               for q in ("What is 7 times 8?", "Anna has 3 cats and gets 4 more. How many cats?")]
    reqs = [GenerationRequest(p, 40) for p in prompts]
    # Both runs start from an empty prefix cache, so both prefill their prompts: a prompt cached by an earlier
    # test (or by the first run) would join through the decode steps instead, and a prefill's logits and a
    # one-row step's differ by float32 rounding (2.4e-4 seen on an AMX Xeon), which is not what this compares.
    smollm2.prefix_cache.clear()
    ours = smollm2.generate(reqs)
    try:
        smollm2.decode_attention = False
        smollm2.model.set_attn_implementation("sdpa")
        smollm2.prefix_cache.clear()
        ref = smollm2.generate(reqs)
    finally:
        smollm2.decode_attention = True
        smollm2.model.set_attn_implementation(NAME)
    for a, b in zip(ours, ref):
        assert a[0].token_ids == b[0].token_ids
        np.testing.assert_allclose(np.array(a[0].top_logprobs), np.array(b[0].top_logprobs), atol=1e-4)
