"""Token ids → text for synthesis: a path is decoded as ONE sequence with its model's tokenizer.

Decoding each node on its own and joining the texts corrupts any character whose bytes a (mini-)step
boundary splits: both halves decode to U+FFFD (30 of 68 cut points of one MGSM-zh sentence on SmolLM2's
tokenizer). :func:`decoder_for` gives the decode function of a model spec (tokenizer only, no weights for
Hugging Face models); it is cached per spec.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

Decoder = Callable[[Sequence[int]], str]


@functools.lru_cache(maxsize=8)
def decoder_for(spec: str) -> Decoder:
    """The decode function of the model ``spec`` names (as ``load_backend`` takes it), special tokens kept."""
    if spec == "scripted" or spec.startswith("scripted:"):
        from marco.llm.scripted import ScriptedBackend

        return ScriptedBackend().decode
    if spec.startswith(("server:", "server+", "vllm:")):
        from marco.llm import load_backend

        return load_backend(spec).decode
    from transformers import AutoTokenizer

    from marco.llm import resolve_checkpoint
    from marco.llm.export import local_model

    path = resolve_checkpoint(spec) if spec.startswith("checkpoint:") else local_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(path)

    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=False))

    return decode
