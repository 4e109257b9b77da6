"""The machine's limit for decoding a model: its fastest matmul at the model's shapes and the model's FLOPs.

``model_flops_per_token(config, context)``: 2 x the multiply-adds of one decoded token (every linear layer,
the LM head included, plus attention's two products over ``context`` earlier tokens). The embedding lookup,
norms, activations and softmax are left out (they are a few MFLOP against ~0.27 GFLOP for SmolLM2-135M).

``matmul_roofline(config, rows, dtype)``: times ``torch.nn.functional.linear``, and oneDNN's matmul on a weight
prepacked once (``marco.llm.decode_step``'s packed weights) where oneDNN runs the dtype, on ``rows`` x ``in``
inputs for every linear shape of one decoder layer and the LM head, with the threads torch is set to, and in
float32 the project's panel kernel (``marco/llm/kernels/linear.cpp``) where it builds; the fastest counts for
each shape (the fastest matmul this CPU offers). It returns the effective rate at the model's mix of shapes (all of one token's linear FLOPs / the time to do them at
the measured rates). The decode limit in tokens/s is that rate / the FLOPs per token: what an engine could
reach if nothing but those matmuls ran and attention ran at the same rate.

Run alone: ``python bench/roofline.py [--rows 64] [--threads 2]`` prints both dtypes' figures.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a decoder's arithmetic (read from a transformers config)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> "ModelShape":
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size, vocab=config.vocab_size,
        )

    def linears(self) -> list[tuple[int, int, int]]:
        """(in, out, count per token) of every linear layer: q, k, v, o, gate, up, down per layer; the LM head."""
        h, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        n = self.layers
        return [(h, q, n), (h, kv, 2 * n), (q, h, n), (h, f, 2 * n), (f, h, n), (h, self.vocab, 1)]


def model_flops_per_token(config: Any, context: float) -> float:
    """FLOPs of decoding one token that attends to ``context`` tokens (2 per multiply-add)."""
    s = ModelShape.of(config)
    linear = sum(i * o * c for i, o, c in s.linears())
    attention = s.layers * 2 * s.heads * s.head_dim * context  # q.k over the context, then p.v
    return 2.0 * (linear + attention)


@dataclass
class Roofline:
    dtype: torch.dtype
    rows: int
    threads: int
    per_shape: list[tuple[int, int, float]]  # (in, out, GFLOP/s)
    gflops: float  # effective rate over one token's mix of shapes

    def tokens_per_s(self, flops_per_token: float) -> float:
        return self.gflops * 1e9 / flops_per_token


def packing_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN runs prepacked matmuls in ``dtype`` here (bfloat16 needs AVX512-BF16 or AMX)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def panels_available(dtype: torch.dtype) -> bool:
    """Whether the project's panel kernel runs here in ``dtype`` (float32: AVX2 and FMA; bfloat16: AVX512-BF16;
    ``marco/llm/kernels/linear.cpp``)."""
    from marco.llm.kernels import linear_panels_op

    return linear_panels_op(dtype) is not None


def time_linear(rows: int, fan_in: int, fan_out: int, dtype: torch.dtype, seconds: float = 0.3,
                packed: bool = False, panels: bool = False) -> float:
    """GFLOP/s of ``linear(x[rows, in], w[out, in])``: the best of repeated timings over ``seconds``
    (best, not mean: other processes share the cores and only ever slow a run down). ``packed``: oneDNN's
    matmul on ``w`` reordered once into its blocked layout, as the fast decode step multiplies. ``panels``:
    the panel kernel on ``w`` packed once."""
    x = torch.randn(rows, fan_in).to(dtype)
    w = (torch.randn(fan_out, fan_in) / fan_in**0.5).to(dtype)
    if panels:
        pw = torch.ops.marco.pack_panels(w)

        def call() -> torch.Tensor:
            return torch.ops.marco.linear_panels(x, pw, fan_out)
    elif packed:
        pw = torch.ops.mkldnn._reorder_linear_weight(w, rows)

        def call() -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [None], "")
    else:
        def call() -> torch.Tensor:
            return torch.nn.functional.linear(x, w)
    with torch.inference_mode():
        call()  # warm-up: packing, thread pool
        best = float("inf")
        deadline = time.perf_counter() + seconds
        reps = 0
        while reps < 3 or time.perf_counter() < deadline:
            t = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t)
            reps += 1
    return 2.0 * rows * fan_in * fan_out / best / 1e9


def matmul_roofline(config: Any, rows: int = 64, dtype: torch.dtype = torch.float32) -> Roofline:
    """The effective matmul rate at the model's linear shapes with ``rows`` rows (see the module docstring)."""
    s = ModelShape.of(config)
    per_shape = []
    flops = secs = 0.0
    for fan_in, fan_out, count in s.linears():
        rate = time_linear(rows, fan_in, fan_out, dtype)
        if packing_available(dtype):
            rate = max(rate, time_linear(rows, fan_in, fan_out, dtype, packed=True))
        if panels_available(dtype):
            rate = max(rate, time_linear(rows, fan_in, fan_out, dtype, panels=True))
        per_shape.append((fan_in, fan_out, rate))
        f = 2.0 * fan_in * fan_out * count  # per token
        flops += f
        secs += f / (rate * 1e9)
    return Roofline(dtype, rows, torch.get_num_threads(), per_shape, flops / secs / 1e9)


def candidate_dtypes() -> list[torch.dtype]:
    """The dtypes worth timing: float32 always, bfloat16 too (fast where the CPU has AMX/AVX512-BF16)."""
    return [torch.float32, torch.bfloat16]


def machine_limit(config: Any, rows: int, dtypes: list[torch.dtype] | None = None) -> list[Roofline]:
    """One :class:`Roofline` per dtype, fastest first: the first is the machine's limit."""
    lines = [matmul_roofline(config, rows, d) for d in (dtypes or candidate_dtypes())]
    return sorted(lines, key=lambda r: -r.gflops)


def smollm2_config() -> Any:
    """The bundled SmolLM2's config (from its cached export, see marco.llm.export)."""
    from transformers import AutoConfig

    from marco.llm.export import local_model

    return AutoConfig.from_pretrained(local_model("smollm2"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=float, default=400.0, help="tokens attended per decoded token")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = smollm2_config()
    fpt = model_flops_per_token(config, args.context)
    print(f"SmolLM2-135M: {fpt / 1e9:.3f} GFLOP per token at context {args.context:.0f}")
    for r in machine_limit(config, args.rows):
        shapes = ", ".join(f"{i}x{o} {g:.0f}" for i, o, g in r.per_shape)
        print(f"{str(r.dtype):<16} {r.rows} rows, {r.threads} threads: {r.gflops:.1f} GFLOP/s "
              f"-> {r.tokens_per_s(fpt):.0f} tokens/s  ({shapes})")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
