"""A decode step's matmuls, F.linear against weights prepacked once for oneDNN, side by side.

``marco.llm.decode_step`` keeps copies of each layer's weights in oneDNN's blocked layout (q/k/v and gate/up
fused): in bfloat16 so that a matmul does not reorder its weight on every call, in float32 where oneDNN's
sgemm beats MKL's on the CPU. This times SmolLM2's 30 layers of projections (random weights of its shapes,
each layer its own tensors, so they stream from memory as in a real step) and then its LM head at several
batch widths, both ways alternately, and checks the outputs: the same to the bit in bfloat16 (one kernel),
the largest difference in float32 (two libraries). Where the native panel kernel builds in the dtype
(``marco/llm/kernels/linear.cpp``; float32: AVX2 and FMA, bfloat16: AVX512-BF16) it also times that against the
packed oneDNN products, in a second table whose lines start with ``panels``, and prints
``panels_vs_packed_at_64_rows``.

Last line: ``packed_vs_plain_at_64_rows`` (plain time / packed time, layers and LM head together).

Usage: python bench/packed_linear.py [--threads all CPUs] [--rows 1,8,32,64,128] [--reps 10]
       [--dtype bfloat16 where oneDNN has it natively, else float32]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.attention_decode import median_ms  # noqa: E402
from marco.llm.decode_step import Panels, _pack, _packed_linear, _panels_linear  # noqa: E402
from marco.llm.kernels import linear_panels_op  # noqa: E402

# SmolLM2-135M: hidden 576, 9 query and 3 KV heads of 64, MLP 1536, 30 layers
SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}
LAYERS = 30
VOCAB = 49152


# the decode step's own packing and matmul, so this times what the product runs
pack, packed_linear = _pack, _packed_linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rows", default="1,8,32,64,128")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default=None)
    args = ap.parse_args()
    if not torch.backends.mkldnn.is_available():
        sys.exit("this torch build has no oneDNN: the decode step keeps F.linear")
    bf16_here = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    dtype = getattr(torch, args.dtype or ("bfloat16" if bf16_here else "float32"))
    if dtype == torch.bfloat16 and not bf16_here:
        sys.exit("oneDNN has no bfloat16 matmul on this CPU: the decode step keeps F.linear here")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    layers = [{k: (torch.randn(*s, generator=g) * 0.05).to(dtype) for k, s in SHAPES.items()} for _ in range(LAYERS)]
    packed = [{"qkv": pack(torch.cat([w["q"], w["k"], w["v"]])), "o": pack(w["o"]),
               "gate_up": pack(torch.cat([w["gate"], w["up"]])), "down": pack(w["down"])} for w in layers]
    head = (torch.randn(VOCAB, 576, generator=g) * 0.05).to(dtype)
    head_packed = pack(head)
    use_panels = linear_panels_op(dtype) is not None
    if use_panels:
        panels = [{"qkv": Panels.of(torch.cat([w["q"], w["k"], w["v"]])), "o": Panels.of(w["o"]),
                   "gate_up": Panels.of(torch.cat([w["gate"], w["up"]])), "down": Panels.of(w["down"])}
                  for w in layers]
        head_panels = Panels.of(head)
    panel_lines: list[str] = []
    panel_ratios: dict[int, float] = {}
    print(f"SmolLM2's {LAYERS} layers of projections and its LM head, {str(dtype).removeprefix('torch.')}, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'rows':>5}{'F.linear ms':>13}{'packed ms':>11}{'ratio':>8}{'head F.linear':>15}{'head packed':>13}"
          f"{'ratio':>8}  max difference")
    ratios: dict[int, float] = {}
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, 576, generator=g).to(dtype)
        h = torch.randn(rows, 1536, generator=g).to(dtype)

        def plain() -> None:
            for w in layers:
                for name in ("q", "k", "v", "o", "gate", "up"):
                    F.linear(x, w[name])
                F.linear(h, w["down"])

        def fast() -> None:
            for w in packed:
                for name in ("qkv", "o", "gate_up"):
                    packed_linear(x, w[name])
                packed_linear(h, w["down"])

        pairs = [(packed_linear(x, packed[0]["qkv"]),
                  torch.cat([F.linear(x, layers[0][n]) for n in ("q", "k", "v")], dim=1)),
                 (packed_linear(h, packed[0]["down"]), F.linear(h, layers[0]["down"])),
                 (packed_linear(x, head_packed), F.linear(x, head))]
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
        a, b, c, d = [], [], [], []
        for _ in range(2):  # alternate, so a load change hits both
            a.append(median_ms(plain, args.reps))
            b.append(median_ms(fast, args.reps))
            c.append(median_ms(lambda: F.linear(x, head), args.reps))
            d.append(median_ms(lambda: packed_linear(x, head_packed), args.reps))
        ratios[rows] = (min(a) + min(c)) / (min(b) + min(d))
        print(f"{rows:>5}{min(a):>13.1f}{min(b):>11.1f}{min(a) / min(b):>8.2f}{min(c):>15.1f}{min(d):>13.1f}"
              f"{min(c) / min(d):>8.2f}  {diff:.2g}")
        if use_panels:
            def native() -> None:
                for w in panels:
                    for name in ("qkv", "o", "gate_up"):
                        _panels_linear(x, w[name])
                    _panels_linear(h, w["down"])

            pairs = [(_panels_linear(x, panels[0]["qkv"]), packed_linear(x, packed[0]["qkv"])),
                     (_panels_linear(h, panels[0]["down"]), packed_linear(h, packed[0]["down"])),
                     (_panels_linear(x, head_panels), packed_linear(x, head_packed))]
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
            e, f, k, m = [], [], [], []
            for _ in range(2):
                e.append(median_ms(fast, args.reps))
                f.append(median_ms(native, args.reps))
                k.append(median_ms(lambda: packed_linear(x, head_packed), args.reps))
                m.append(median_ms(lambda: _panels_linear(x, head_panels), args.reps))
            panel_ratios[rows] = (min(e) + min(k)) / (min(f) + min(m))
            panel_lines.append(f"panels{rows:>5}{min(e):>11.1f}{min(f):>11.1f}{min(e) / min(f):>8.2f}{min(k):>13.1f}"
                               f"{min(m):>13.1f}{min(k) / min(m):>8.2f}  {diff:.2g}")
    if panel_lines:
        print(f"\nthe packed products against the native panel kernel (linear.cpp), load {os.getloadavg()[0]:.1f}")
        print(f"{'':6}{'rows':>5}{'packed ms':>11}{'panels ms':>11}{'ratio':>8}{'head packed':>13}{'head panels':>13}"
              f"{'ratio':>8}  max difference")
        print("\n".join(panel_lines))
        key = 64 if 64 in panel_ratios else max(panel_ratios)
        print(f"panels_vs_packed_at_{key}_rows: {panel_ratios[key]:.3f}")
    key = 64 if 64 in ratios else max(ratios)
    print(f"packed_vs_plain_at_{key}_rows: {ratios[key]:.3f}")


if __name__ == "__main__":
    main()
