"""Tokenize chats for SFT with the loss on assistant tokens only.

TRL's ``assistant_only_loss`` needs a chat template with ``{% generation %}`` markers, which SmolLM2's
template does not have (and TRL has no training variant of it). So the mask is built here, for any chat
template: the tokens an assistant turn adds are those between the template rendered up to the turn (with
the generation prompt) and the template rendered through the turn. The turn's text and its end-of-turn
token are trained; the role header before it and anything after the end-of-turn token (ChatML's newline)
are not. The result feeds TRL as a pre-tokenized dataset (``input_ids`` + ``assistant_masks``), from which
TRL builds the labels.
"""

from __future__ import annotations

from typing import Any, Sequence

Message = dict[str, str]


def _render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding regardless
        ids = ids["input_ids"]
    return list(ids)


def tokenize_chat(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """``(input_ids, assistant_mask)`` of a chat; mask 1 marks tokens of assistant turns (and their end).

    Raises ValueError when the template does not render turn by turn as a prefix of the whole chat (the
    mask would be wrong) or when there is no assistant turn.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(full)
    eos_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None}
    found = False
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        found = True
        start_ids = _render(tokenizer, messages[:i], add_generation_prompt=True)
        end_ids = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(start_ids)] != start_ids or full[: len(end_ids)] != end_ids:
            raise ValueError("the chat template does not render a conversation turn by turn; cannot mask it")
        stop = len(end_ids)
        # Train the turn's end-of-turn token, not what the template puts after it.
        for j in range(len(start_ids), len(end_ids)):
            if full[j] in eos_ids:
                stop = j + 1
                break
        for j in range(len(start_ids), stop):
            mask[j] = 1
    if not found:
        raise ValueError("the conversation has no assistant turn to train on")
    return full, mask


def tokenize_chats(
    tokenizer: Any, chats: Sequence[Sequence[Message]], max_length: int | None = None
) -> dict[str, list[list[int]]]:
    """Columns ``input_ids`` and ``assistant_masks`` for a pre-tokenized TRL dataset, truncated to
    ``max_length`` (chats left with no assistant token after truncation are dropped)."""
    ids_col: list[list[int]] = []
    mask_col: list[list[int]] = []
    for messages in chats:
        ids, mask = tokenize_chat(tokenizer, messages)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        if any(mask):
            ids_col.append(ids)
            mask_col.append(mask)
    return {"input_ids": ids_col, "assistant_masks": mask_col}
