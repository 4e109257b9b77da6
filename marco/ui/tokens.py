"""Per-token text pieces of a stored node, so the explorer can colour its text token by token by ``c_i``.

The nodes table keeps token ids and per-token confidences, not token strings. The pieces come from the
model's own tokenizer: the scripted backend's (one character per token) costs nothing; a transformers
tokenizer (the bundled SmolLM2 GGUF, a model directory, a trained checkpoint) is loaded once per model in a
background thread, from local files only, and saved as a ``tokenizer.json`` under :func:`cache_dir` so the
next start reads it in about a second without importing transformers. When no tokenizer can be had (or it is
still loading), or the pieces do not add up to the stored text, :meth:`TokenPieces.pieces` returns None and
the page falls back to the plain text plus one colour block per token (as ``marco traces tree --html``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

Decoder = Callable[[Sequence[int]], str]


def cache_dir() -> Path:
    """Where converted tokenizers are kept (``${MARCO_CACHE:-~/.cache/marco}/tokenizers``)."""
    from marco.llm.export import cache_root

    return cache_root() / "tokenizers"


def _source(spec: str, checkpoint_path: Callable[[str], str | None]) -> str:
    """The folder or hub id the model's tokenizer loads from."""
    if spec.startswith("checkpoint:"):
        path = checkpoint_path(spec)
        if not path:
            raise FileNotFoundError(f"no checkpoint directory recorded for {spec}")
        return path
    if spec == "smollm2" or spec.endswith(".gguf"):
        from marco.llm.export import local_model

        return local_model(spec)  # the cached export's tokenizer files (marco.llm.export)
    return spec


def _load_decoder(spec: str, checkpoint_path: Callable[[str], str | None]) -> Decoder | None:
    if spec == "scripted":
        from marco.llm.scripted import ScriptedBackend

        return ScriptedBackend().decode
    where = _source(spec, checkpoint_path)
    stamp = os.path.getmtime(where) if os.path.exists(where) else 0.0
    cached = cache_dir() / (hashlib.sha1(f"{where}:{stamp}".encode()).hexdigest() + ".json")
    if cached.exists():  # a converted tokenizer: ~1 s, without importing transformers
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(cached))
        return lambda ids: tok.decode(list(ids), skip_special_tokens=False)
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(where, local_files_only=True)  # never downloads
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is not None and not getattr(hf, "clean_up_tokenization_spaces", False):
        try:  # the next start reads this without importing transformers
            cached.parent.mkdir(parents=True, exist_ok=True)
            backend.save(str(cached))
        except OSError as exc:
            log.info("cannot cache the tokenizer of %s at %s: %s", spec, cached, exc)
    return lambda ids: hf.decode(list(ids), skip_special_tokens=False)


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
    """Per-model decoders, loaded once and cached; thread-safe (the server answers from a thread pool).

    Loading a transformers tokenizer can take a while (importing transformers, converting a GGUF
    vocabulary), so with ``wait=False`` a model's decoder loads in a background thread and, until it is
    ready, :meth:`pieces` answers None (the page shows colour blocks and says the text is on its way).
    """

    def __init__(self, enabled: bool = True, checkpoint_path: Callable[[str], str | None] = lambda _s: None) -> None:
        self.enabled = enabled
        self.checkpoint_path = checkpoint_path
        self._decoders: dict[str, Decoder | None] = {}
        self._loading: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def _load(self, spec: str) -> None:
        try:
            decoder = _load_decoder(spec, self.checkpoint_path)
        except Exception as exc:  # no tokenizer for this model here: colour blocks
            log.warning("no tokenizer for %s (%s): tokens shown as colour blocks", spec, exc)
            decoder = None
        with self._lock:
            self._decoders[spec] = decoder
            self._loading.pop(spec, None)

    def decoder(self, spec: str | None, wait: bool = True) -> Decoder | None:
        """The decoder of model ``spec``; None when there is none, or (``wait=False``) not loaded yet."""
        if not self.enabled or not spec:
            return None
        with self._lock:
            if spec in self._decoders:
                return self._decoders[spec]
            thread = self._loading.get(spec)
            if thread is None:
                thread = threading.Thread(target=self._load, args=(spec,), name=f"tokenizer:{spec}", daemon=True)
                self._loading[spec] = thread
                thread.start()
        if wait or spec == "scripted":
            thread.join()
            return self._decoders.get(spec)
        return None

    def loading(self, spec: str | None) -> bool:
        """True while the tokenizer of ``spec`` is being loaded."""
        with self._lock:
            return bool(spec) and spec in self._loading

    def pieces(self, spec: str | None, token_ids: Sequence[int], text: str, wait: bool = True) -> list[str] | None:
        """The text piece of every token, or None when they cannot be had (yet) or do not spell ``text``."""
        decode = self.decoder(spec, wait)
        if decode is None or not token_ids:
            return None
        for incremental in (False, True):
            got = split_pieces(decode, token_ids, incremental)
            if "".join(got) == text:
                return got
        return None

    def preload(self, specs: Any) -> None:
        """Start loading the decoders of ``specs`` in the background."""
        for spec in specs:
            self.decoder(spec, wait=False)
