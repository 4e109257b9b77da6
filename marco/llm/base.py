"""The backend protocol every inference engine implements.

A backend takes a batch of :class:`GenerationRequest` and returns, per request, ``n`` :class:`Generation`
objects. Prefixes are token ids (the prompt plus any partial reasoning), which is what lets a search
continue exactly from a stored node, and what vLLM's ``TokensPrompt`` and OpenAI-compatible completion
servers accept as well.

Log-probabilities are *raw*: the log-softmax of the model's logits, before temperature and top-p, so the
confidence score does not depend on the sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

TOP_K_LOGPROBS = 5


@dataclass(frozen=True)
class GenerationRequest:
    """One prefix to continue, ``n`` times.

    ``seed`` makes sampling reproducible per request, independent of how requests are batched: sample
    ``j`` of a request uses the seed ``(seed, j)``.
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks)


@dataclass
class Generation:
    """One sampled continuation.

    ``top_logprobs[i]`` holds the raw log-probabilities of the 5 most likely tokens at position ``i``
    (descending); ``top_ids[i]`` their ids. ``finish_reason`` is ``"stop"`` (a stop string or an
    end-of-sequence token ended it) or ``"length"`` (``max_new_tokens`` reached).
    """

    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[float]]
    top_ids: list[list[int]] = field(default_factory=list)
    finish_reason: str = "length"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class Backend(Protocol):
    """A batched text generator with log-probabilities."""

    name: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        """Continue every request; result ``[i][j]`` is sample ``j`` of request ``i``."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens added."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` (special tokens kept, so stored traces show what the model saw)."""
        ...

    def apply_chat_template(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> list[int]:
        """Prompt ids for ``messages`` with the generation prompt, followed by ``assistant_prefix``."""
        ...
