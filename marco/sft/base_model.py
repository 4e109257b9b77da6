"""Resolve a base-model spec to a directory ``from_pretrained`` loads quickly.

GGUF models (``smollm2``, a ``.gguf`` path) are dequantized to float32 once and cached as safetensors
(:mod:`marco.llm.export`), so the ranks of a torchrun launch each load a plain checkpoint instead of each
dequantizing the GGUF.
``checkpoint:ID`` goes through a resolver the store registers (:func:`set_checkpoint_resolver`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from marco.llm.export import gguf_location, materialize_gguf

CheckpointResolver = Callable[[str], str]
_checkpoint_resolver: CheckpointResolver | None = None


def set_checkpoint_resolver(resolver: CheckpointResolver | None) -> None:
    """Install how ``checkpoint:ID`` becomes a directory (the store does this; None removes it)."""
    global _checkpoint_resolver
    _checkpoint_resolver = resolver


@contextmanager
def checkpoint_resolver(resolver: CheckpointResolver) -> Iterator[None]:
    """Resolve ``--base checkpoint:ID`` with ``resolver`` inside the block, then restore the previous one."""
    previous = _checkpoint_resolver
    set_checkpoint_resolver(resolver)
    try:
        yield
    finally:
        set_checkpoint_resolver(previous)


def resolve_base(spec: str) -> str:
    """A directory or Hugging Face id for ``spec``: ``smollm2``, a ``.gguf`` file, ``checkpoint:ID``, a local
    model directory, or a hub id (returned as is)."""
    if spec.startswith("checkpoint:"):
        if _checkpoint_resolver is None:
            raise ValueError(f"{spec}: checkpoints are resolved through the store, which is not configured")
        return _checkpoint_resolver(spec.split(":", 1)[1])
    gguf = gguf_location(spec)
    if gguf is not None:
        return str(materialize_gguf(*gguf))
    if os.path.isdir(spec):
        if not (Path(spec) / "config.json").is_file():
            raise FileNotFoundError(f"{spec} is a directory without config.json, not a model checkpoint")
        return spec
    if os.path.exists(spec) or spec.startswith((".", "/")):
        raise FileNotFoundError(f"no model at {spec} (expected a model directory or a .gguf file)")
    return spec
