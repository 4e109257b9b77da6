"""Which floating-point type the transformers backend computes in.

bfloat16 halves the bytes of weights and KV cache and, on CPUs with hardware support for it (Intel AMX,
AVX512-BF16), runs the matmuls about 3x faster than float32. Elsewhere (AVX2 only, e.g. this project's AMD
dev machine) PyTorch emulates bfloat16 by converting to float32 and back, which is slower than plain float32,
so ``auto`` picks bfloat16 only where the CPU has those instructions (and always on CUDA).

Setting: ``MARCO_DTYPE=auto|float32|bfloat16|float16`` or ``HFConfig.dtype`` / ``load_backend(dtype=...)``
(the explicit argument wins over the environment). Whatever the weights, confidences are computed from a
float32 log-softmax of the logits (:class:`marco.llm.hf._DecodeBatch` casts them up).
"""

from __future__ import annotations

import os

import torch

ENV_DTYPE = "MARCO_DTYPE"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
# /proc/cpuinfo flags of hardware bfloat16 matmul: AMX's bf16 tiles, AVX512's dot product instructions
BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags listed in ``/proc/cpuinfo`` text (the ``flags`` lines on x86)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags.update(value.split())
    return flags


def local_cpu_flags() -> set[str]:
    """This machine's CPU flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return cpu_flags(f.read())
    except OSError:
        return set()


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX-BF16 or AVX512-BF16).

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when not given). ``amx_tile`` alone does not count: a CPU
    could have AMX tiles with only the int8 instructions. Where ``/proc/cpuinfo`` is missing or lists no flags
    (not Linux, not x86), PyTorch's own CPU feature probe answers.
    """
    flags = cpu_flags(cpuinfo) if cpuinfo is not None else local_cpu_flags()
    if flags:
        return bool(flags & BF16_CPU_FLAGS)
    # every CPU with AMX-BF16 so far also has AVX512-BF16, which is what PyTorch probes
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def resolve_dtype(setting: str | None, device: torch.device, cpuinfo: str | None = None) -> torch.dtype:
    """The dtype for ``setting`` (``None``: ``$MARCO_DTYPE``, else ``auto``) on ``device``.

    ``auto``: bfloat16 on CUDA, and on a CPU with AMX or AVX512-BF16; float32 on any other CPU.
    """
    source = "dtype"
    if setting is None:
        setting, source = os.environ.get(ENV_DTYPE, "").strip() or "auto", ENV_DTYPE
    name = setting.strip().lower()
    if name not in DTYPE_CHOICES:
        raise ValueError(f"{source}={setting!r} is not one of {', '.join(DTYPE_CHOICES)}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16(cpuinfo) else torch.float32
    return getattr(torch, name)
