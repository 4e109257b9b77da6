"""A model folder vLLM can load (config, safetensors, tokenizer) made from the bundled GGUF.

vLLM reads no GGUF file here, and ``save_pretrained`` refuses a model loaded from one, so the model is rebuilt
from its config and state dict (transformers dequantises the Q4_1 weights to float32; they are saved in
``dtype``, float32 by default so that the folder holds exactly the numbers the transformers backend computes
with; vLLM casts them to its own dtype). ``vllm:smollm2`` uses :func:`exported_smollm2`: made once under
``${MARCO_CACHE:-~/.cache/marco}/models/``, reused afterwards. ``marco model export smollm2 DIR`` writes one
where a user wants it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DONE = "marco-export.json"  # written last: a folder without it is an interrupted export


def cache_root() -> Path:
    return Path(os.environ.get("MARCO_CACHE") or Path.home() / ".cache" / "marco")


def export_gguf(folder: str, gguf_file: str, out: str | os.PathLike[str], dtype: str = "float32") -> Path:
    """Write ``out`` (config.json, model.safetensors, tokenizer files) from ``folder/gguf_file``."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = Path(out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    state = {k: v.to(getattr(torch, dtype)) for k, v in loaded.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # a tied lm_head is not in the state dict
        raise RuntimeError(f"GGUF export: missing {missing}, unexpected {unexpected}")
    if missing:
        fresh.tie_weights()
    target.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / DONE).write_text(json.dumps({"source": os.path.join(folder, gguf_file), "dtype": dtype}))
    return target


def exported_smollm2(dtype: str = "float32") -> Path:
    """The bundled SmolLM2 as a safetensors folder in the cache, exported on first use."""
    from marco.llm.hf import smollm2_path

    folder, file = smollm2_path()
    target = cache_root() / "models" / f"{Path(file).stem}-{dtype}"
    if (target / DONE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        export_gguf(folder, file, tmp, dtype)
        try:
            tmp.rename(target)
        except OSError:  # another process exported it meanwhile
            if not (target / DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
