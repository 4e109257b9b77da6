"""A CPU loss head for TRL's SFT step that scores only the positions that carry a label.

TRL (1.16) replaces the model's LM head with a fused, tiled log-probability function. On a GPU with Triton it
scores only the labelled positions; everywhere else it scores *every* position (prompt and padding
included), in float32 tiles, computing entropy and top-1 agreement elementwise over the whole vocabulary and
recomputing each tile's logits in the backward pass. On a 2-core CPU that function took 46% of an SFT step
(``torch.profiler``, SmolLM2-135M, batch 8 × 192 tokens), and the SFT path ran at 0.73 of a bare PyTorch loop
on the same batches (``bench/sft_throughput.py``).

:func:`add_compact_lm_head` wraps that forward: with ``fused_lm_head=True`` on a CPU it runs the backbone,
projects only the labelled positions through the LM head and takes one ``log_softmax``; it returns the same
:class:`trl.trainer.utils.FusedCausalLMOutput` fields TRL's loss and metrics read (``log_probs``, ``entropy``,
``is_top1``, ``label_mask``), equal to TRL's to float rounding (``tests/test_sft.py``). Anything else (a
GPU, pre-shifted labels, a model whose logits are scaled or soft-capped, MoE router losses) goes to TRL's
forward unchanged. Its logits are materialised for the labelled positions only, which on a CPU's memory is
the cheaper trade.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch

# config fields that change the logits after the LM head (TRL's fused head applies them; this one does not)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")  # fmt: skip


def compact_head_applies(model: Any) -> bool:
    """Whether :func:`add_compact_lm_head` computes this model's loss itself (plain logits, no MoE)."""
    config = model.config.get_text_config()
    if any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        return False
    return not getattr(config, "output_router_logits", False)


def add_compact_lm_head(model: Any) -> bool:
    """Wrap ``model.forward`` (already given TRL's fused head) so that CPU calls with ``fused_lm_head=True``
    score only labelled positions. Returns False, leaving the model alone, when the model is not plain."""
    from trl.trainer.utils import FusedCausalLMOutput

    if not compact_head_applies(model):
        return False
    fused_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:  # fmt: skip
        head = self.get_output_embeddings()
        if not fused_lm_head or shift_labels is not None or labels is None or head.weight.device.type != "cpu":
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)  # fmt: skip
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        logits = head(hidden[mask]).float()
        log_softmax = torch.log_softmax(logits, dim=-1)
        picked = target[mask]
        token_log_probs = log_softmax.gather(1, picked[:, None]).squeeze(1)
        with torch.no_grad():
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
            is_top1 = logits.argmax(-1) == picked
        # zero on ignored positions, as TRL's fields are (masked_scatter keeps an all-masked batch differentiable)
        log_probs = token_log_probs.new_zeros(mask.shape).masked_scatter(mask, token_log_probs)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
            is_top1=is_top1.new_zeros(mask.shape).masked_scatter(mask, is_top1),
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)
    return True
