"""Resolve a base-model spec to a directory ``from_pretrained`` loads quickly.

GGUF models (``smollm2``, a ``.gguf`` path) are dequantized to float32 once and cached as safetensors, so
the ranks of a torchrun launch each load a plain checkpoint instead of each dequantizing the GGUF.
``checkpoint:ID`` goes through a resolver the store registers (:func:`set_checkpoint_resolver`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

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


def cache_root() -> Path:
    """``$MARCO_CACHE_DIR`` or ``~/.cache/marco``."""
    return Path(os.environ.get("MARCO_CACHE_DIR") or Path.home() / ".cache" / "marco")


def _gguf_location(spec: str) -> tuple[str, str] | None:
    if spec == "smollm2":
        from marco.llm.hf import smollm2_path

        return smollm2_path()
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"no GGUF file at {spec}")
        folder, file = os.path.split(os.path.abspath(spec))
        return folder, file
    return None


def materialize_gguf(folder: str, file: str, cache: Path | None = None) -> str:
    """Dequantize ``folder/file`` to a float32 safetensors directory (cached by the file's identity)."""
    path = Path(folder) / file
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = (cache or cache_root()) / "models" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import torch

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
        # The loaded model is dequantized but still flagged as GGUF-quantized, which save_pretrained refuses:
        # copy its weights into a plain model of the same architecture.
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process got there first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_base(spec: str) -> str:
    """A directory or Hugging Face id for ``spec``: ``smollm2``, a ``.gguf`` file, ``checkpoint:ID``, a local
    model directory, or a hub id (returned as is)."""
    if spec.startswith("checkpoint:"):
        if _checkpoint_resolver is None:
            raise ValueError(f"{spec}: checkpoints are resolved through the store, which is not configured")
        return _checkpoint_resolver(spec.split(":", 1)[1])
    gguf = _gguf_location(spec)
    if gguf is not None:
        return materialize_gguf(*gguf)
    if os.path.isdir(spec):
        if not (Path(spec) / "config.json").is_file():
            raise FileNotFoundError(f"{spec} is a directory without config.json, not a model checkpoint")
        return spec
    if os.path.exists(spec) or spec.startswith((".", "/")):
        raise FileNotFoundError(f"no model at {spec} (expected a model directory or a .gguf file)")
    return spec
