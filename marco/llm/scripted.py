"""A deterministic backend for unit tests of search logic.

Tokens are characters (id = code point + 1; id 0 is end-of-sequence). A *responder* maps a prefix text
and a random generator to the continuation the "model" would write; log-probabilities come from a
*scorer*. Both are plain functions, so tests state exactly what the model does. A sample depends only on
(prefix, seed, sample index), never on batching, as with the real backends.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import time
from typing import Callable, Sequence

from marco.llm.base import TOP_K_LOGPROBS, Generation, GenerationRequest

EOS = 0
ASSISTANT_TURN = "<|assistant|>\n"
Responder = Callable[[str, random.Random], str]
Scorer = Callable[[str, int], float]  # (text generated so far incl. this token, position) -> confidence c_i


def _stable_rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def default_responder(prefix: str, rng: random.Random) -> str:
    """Writes 1-3 short steps, closes the thought and answers 41 or 42 (42 more often)."""
    if "</Thought>" in prefix:
        return "\n<Output>42</Output>" if "<Output>" not in prefix else ""
    done = prefix.count("\n\n")
    steps = [f"Step {done + k + 1}: work on the numbers.\n\n" for k in range(rng.randint(0, 2))]
    answer = "42" if rng.random() < 0.7 else "41"
    return "".join(steps) + f"So the answer is {answer}.\n</Thought>\n<Output>{answer}</Output>"


def default_scorer(text: str, position: int) -> float:
    """Confident on the digit 2, unsure on the digit 1, mildly varied elsewhere."""
    ch = text[-1] if text else ""
    if ch == "2":
        return 0.95
    if ch == "1":
        return 0.2
    return 0.6 + (ord(ch) % 7) / 40.0 if ch else 0.9


class ScriptedBackend:
    """A :class:`~marco.llm.base.Backend` whose outputs are fixed by a responder function."""

    def __init__(
        self, responder: Responder = default_responder, scorer: Scorer = default_scorer, name: str = "scripted",
        continuous: bool = True,
    ) -> None:
        self.responder = responder
        self.scorer = scorer
        self.name = name
        self.calls: list[int] = []  # rows per generate() call, for tests of batching
        self.chunk: int | None = None
        self.round_delay_s = 0.0  # sleep per generate step: a slow model, for fault tests that need timing
        self.max_context: int | None = None  # prompt tokens it accepts (None: unlimited)
        if not continuous:
            self.generate_continuous = None  # type: ignore[assignment,method-assign]

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 1 for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(t - 1) for t in token_ids if t != EOS)

    def apply_chat_template(self, messages: list[dict[str, str]], assistant_prefix: str = "") -> list[int]:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + ASSISTANT_TURN
        return self.encode(text + assistant_prefix)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        self.calls.append(sum(r.n for r in requests))
        if self.round_delay_s:
            time.sleep(self.round_delay_s)
        return [[self._one(r, j) for j in range(r.n)] for r in requests]

    def generate_continuous(
        self,
        requests: Sequence[GenerationRequest],
        refill: Callable[[list[tuple[int, list[Generation]]]], Sequence[GenerationRequest]],
    ) -> None:
        """Continuous batching, emulated: requests complete ``chunk`` at a time (all at once when None), so
        tests see searches move on while others are still "decoding"."""
        pending = list(enumerate(requests))
        next_id = len(requests)
        while pending:
            self.calls.append(sum(r.n for _, r in pending))
            if self.round_delay_s:
                time.sleep(self.round_delay_s)
            take = pending if self.chunk is None else pending[: self.chunk]
            pending = pending[len(take):]
            new = list(refill([(rid, [self._one(r, j) for j in range(r.n)]) for rid, r in take]))
            pending.extend((next_id + k, r) for k, r in enumerate(new))
            next_id += len(new)

    def _one(self, req: GenerationRequest, sample: int) -> Generation:
        # the responder sees only the assistant's turn so far (as a model "continues" its answer)
        prefix = self.decode(req.prompt_ids).rpartition(ASSISTANT_TURN)[2]
        greedy = req.temperature <= 0
        rng = _stable_rng(prefix, 0 if greedy else req.seed, 0 if greedy else sample)
        full = self.responder(prefix, rng)
        ids: list[int] = []
        text = ""
        finish = "length"
        for ch in full:
            if len(ids) >= req.max_new_tokens:
                break
            ids.append(ord(ch) + 1)
            text += ch
            if any(text.endswith(s) for s in req.stop if s):
                finish = "stop"
                break
        else:
            if len(ids) < req.max_new_tokens:
                ids.append(EOS)
                finish = "stop"
        chosen, tops = [], []
        written = ""
        for pos, t in enumerate(ids):
            written += chr(t - 1) if t != EOS else ""
            c = 0.98 if t == EOS else min(max(self.scorer(prefix + written, pos), 1e-6), 1.0 - 1e-6)
            # the top-5 probabilities are c and four equal alternatives summing to 1 - c, so c_i == c exactly
            rest = math.log((1.0 - c) / (TOP_K_LOGPROBS - 1))
            chosen.append(math.log(c))
            tops.append(sorted([math.log(c)] + [rest] * (TOP_K_LOGPROBS - 1), reverse=True))
        return Generation(
            token_ids=ids, text=self.decode(ids), logprobs=chosen, top_logprobs=tops, finish_reason=finish,
        )


def from_spec(spec: str) -> ScriptedBackend:
    """``scripted`` or ``scripted:load=S,round=S,context=N``: a scripted backend that takes ``load`` seconds
    to load, sleeps ``round`` seconds per generate step and accepts prompts under ``context`` tokens (fault
    tests use it to control timing: a slow model load, a round longer than the lease)."""
    values = parse_spec(spec)
    if values.get("load"):
        time.sleep(values["load"])
    backend = ScriptedBackend(name=spec)
    # $MARCO_SCRIPTED_SLOWDOWN: this process's model is that many times slower (a bad GPU, for bench/fleet.py)
    backend.round_delay_s = values.get("round", 0.0) * float(os.environ.get("MARCO_SCRIPTED_SLOWDOWN") or 1.0)
    backend.max_context = int(values["context"]) if "context" in values else None
    return backend


def parse_spec(spec: str) -> dict[str, float]:
    """The options of a ``scripted:...`` spec; ``ValueError`` names a bad one."""
    _, _, opts = spec.partition(":")
    values: dict[str, float] = {}
    for part in filter(None, opts.split(",")):
        key, _, raw = part.partition("=")
        if key not in ("load", "round", "context"):
            raise ValueError(f"unknown scripted backend option {key!r} in {spec!r}; use load=S, round=S, context=N")
        try:
            values[key] = float(raw)
        except ValueError:
            raise ValueError(f"scripted backend option {key} needs a number, got {raw!r}") from None
    return values
