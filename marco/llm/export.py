"""GGUF models as plain safetensors folders, converted once and cached.

transformers reads a GGUF file slowly: every ``from_pretrained(..., gguf_file=)`` (config, tokenizer, weights)
parses the whole file again, 49k vocabulary strings included, so loading the bundled SmolLM2 took 20-36 s on
a 2-core machine. vLLM reads no GGUF at all, and ``save_pretrained`` refuses a model loaded from one. So a
GGUF model is converted once: transformers dequantises the Q4_1 weights to float32, the model is rebuilt from
its config and state dict, and the folder (config, float32 safetensors, tokenizer files, generation config)
is cached under ``${MARCO_CACHE:-~/.cache/marco}/models/``, keyed by the file's path, size and mtime. Every
later load of ``smollm2`` or a ``.gguf`` path (the transformers backend, vLLM, training, tokenizers) reads
the folder: the same float32 numbers, a few seconds.

``marco model export smollm2 DIR`` writes such a folder where a user wants it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

DONE = "marco-export.json"  # written last: a folder without it is an interrupted export
BUNDLED = "smollm2"


def cache_root() -> Path:
    """``$MARCO_CACHE``, else ``$MARCO_CACHE_DIR`` (its older name), else ``~/.cache/marco``."""
    root = os.environ.get("MARCO_CACHE") or os.environ.get("MARCO_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "marco"


def gguf_location(spec: str) -> tuple[str, str] | None:
    """``(folder, file)`` of the GGUF model ``spec`` names (``smollm2`` or a ``.gguf`` path), else None."""
    if spec == BUNDLED:
        from marco.llm.hf import smollm2_path

        return smollm2_path()
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"no GGUF file at {spec}")
        folder, file = os.path.split(os.path.abspath(spec))
        return folder, file
    return None


def local_model(spec: str) -> str:
    """What ``from_pretrained`` should load for ``spec``: the cached folder of a GGUF model (converted on
    first use), else ``spec`` as it is (a model folder or a hub id)."""
    gguf = gguf_location(spec)
    return str(materialize_gguf(*gguf)) if gguf else spec


def export_gguf(folder: str, gguf_file: str, out: str | os.PathLike[str], dtype: str = "float32") -> Path:
    """Write ``out`` (config.json, model.safetensors, tokenizer and generation config) from ``folder/gguf_file``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    state = {k: v.to(getattr(torch, dtype)) for k, v in loaded.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # a tied lm_head is not in the state dict
        raise RuntimeError(f"GGUF export: missing {missing}, unexpected {unexpected}")
    if missing:
        fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    target.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / DONE).write_text(json.dumps({"source": os.path.join(folder, gguf_file), "dtype": dtype}))
    return target


def materialize_gguf(folder: str, file: str, cache: Path | None = None) -> Path:
    """The float32 safetensors folder of ``folder/file`` in the cache, exported on first use.

    Keyed by the file's resolved path, size and mtime, so a replaced file is converted again. Safe against
    concurrent first uses: each exports into its own temporary folder and renames it into place."""
    path = Path(folder) / file
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = (cache or cache_root()) / "models" / f"{path.stem}-{key}"
    if (target / DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        export_gguf(folder, file, tmp)
        tmp.chmod(0o755)  # mkdtemp made it private; the cache is shared like any other
        try:
            tmp.rename(target)
        except OSError:  # another process exported it meanwhile
            if not (target / DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

