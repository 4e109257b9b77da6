"""Per-token text pieces of a stored node, so the explorer can colour its text token by token by ``c_i``.

The nodes table keeps token ids and per-token confidences, not token strings. The pieces come from the
model's own tokenizer: the scripted backend's (one character per token) costs nothing; a transformers
tokenizer (the bundled SmolLM2 GGUF, a model directory, a trained checkpoint) is loaded once per model, the
first time a tree of that model is shown. When no tokenizer can be had, or the pieces do not add up to the
stored text (a stop string trimmed it), :meth:`TokenPieces.pieces` returns None and the page falls back to
the plain text plus one colour block per token (as ``marco traces tree --html`` draws it).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

Decoder = Callable[[Sequence[int]], str]


def _load_decoder(spec: str, checkpoint_path: Callable[[str], str | None]) -> Decoder | None:
    if spec == "scripted":
        from marco.llm.scripted import ScriptedBackend

        return ScriptedBackend().decode
    from transformers import AutoTokenizer

    if spec.startswith("checkpoint:"):
        path = checkpoint_path(spec)
        if not path:
            return None
        tok = AutoTokenizer.from_pretrained(path)
    elif spec == "smollm2":
        from marco.llm.hf import smollm2_path

        folder, file = smollm2_path()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    elif spec.endswith(".gguf"):
        import os

        folder, file = os.path.split(os.path.abspath(spec))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    else:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)  # never downloads
    return lambda ids: tok.decode(list(ids), skip_special_tokens=False)


def split_pieces(decode: Decoder, token_ids: Sequence[int], incremental: bool = False) -> list[str]:
    """Each token's text piece. A token that ends inside a multi-byte character gets "" and the token
    completing it gets the whole character.

    By default each piece is decoded on its own (linear; right for byte-level BPE such as SmolLM2's);
    ``incremental`` decodes growing prefixes instead (quadratic; right for tokenizers whose decoding
    depends on context, e.g. SentencePiece's leading-space marker).
    """
    pieces: list[str] = []
    start, done = 0, ""
    for i in range(len(token_ids)):
        if incremental:
            now = decode(token_ids[: i + 1])
            if now.endswith("\ufffd") or not now.startswith(done):
                pieces.append("")
                continue
            pieces.append(now[len(done) :])
            done = now
        else:
            piece = decode(token_ids[start : i + 1])
            if piece.endswith("\ufffd") and i + 1 < len(token_ids):
                pieces.append("")
                continue
            pieces.append(piece)
            start = i + 1
    return pieces


class TokenPieces:
    """Per-model decoders, loaded lazily and cached; thread-safe (the server answers from a thread pool)."""

    def __init__(self, enabled: bool = True, checkpoint_path: Callable[[str], str | None] = lambda _s: None) -> None:
        self.enabled = enabled
        self.checkpoint_path = checkpoint_path
        self._decoders: dict[str, Decoder | None] = {}
        self._lock = threading.Lock()

    def decoder(self, spec: str | None) -> Decoder | None:
        if not self.enabled or not spec:
            return None
        with self._lock:
            if spec not in self._decoders:
                try:
                    self._decoders[spec] = _load_decoder(spec, self.checkpoint_path)
                except Exception as exc:  # no tokenizer for this model here: fall back to colour blocks
                    log.warning("no tokenizer for %s (%s): tokens shown as colour blocks", spec, exc)
                    self._decoders[spec] = None
            return self._decoders[spec]

    def pieces(self, spec: str | None, token_ids: Sequence[int], text: str) -> list[str] | None:
        """The text piece of every token, or None when they cannot be had or do not spell ``text``."""
        decode = self.decoder(spec)
        if decode is None or not token_ids:
            return None
        for incremental in (False, True):
            got = split_pieces(decode, token_ids, incremental)
            if "".join(got) == text:
                return got
        return None

    def preload(self, specs: Any) -> None:
        for spec in specs:
            self.decoder(spec)
