"""The native panel products (``marco/llm/kernels/linear.cpp``) of this checkout against a git revision's.

SmolLM2's decode-step products: 30 layers of q, k, v, o, gate, up and down (random weights of its shapes,
each layer its own tensors, so they stream from memory as in a real step), then the LM head, at several
batch widths. REV's ``linear.cpp`` is built into a library of its own; the two libraries register the same
ops, so each is timed in its own process, alternating, ``--rounds`` times, on the same seeded data (see
``bench/kernel_revisions.py``). Prints the best milliseconds of layers and head per width, the ratios, and the
largest difference of either library's LM head outputs from the exact (float64) products.

Last line: ``panels_after_vs_before_at_R_rows`` (REV's time / this checkout's, layers and head together, the
first ``--rows``; median over rounds).

Usage: python bench/linear_kernel.py --base REV [--rows 16,64,128] [--dtype float32] [--rounds 3]
       [--threads all CPUs] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.attention_kernel import best_ms  # noqa: E402
from bench.kernel_revisions import compare, median_ratio  # noqa: E402

# SmolLM2-135M: hidden 576, 9 query and 3 KV heads of 64, MLP 1536, 30 layers
SHAPES = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))
LAYERS, HIDDEN, VOCAB = 30, 576, 49152


def time_library(library: str, rows: list[int], dtype: torch.dtype, reps: int) -> dict[str, float]:
    """(In a process of its own) best milliseconds of the 30 layers' and the head's products per width, and the
    largest difference of a checksum row from ``F.linear`` in float64 (``err/R``)."""
    torch.ops.load_library(library)
    pack, linear = torch.ops.marco.pack_panels, torch.ops.marco.linear_panels
    g = torch.Generator().manual_seed(0)
    weights = [[(torch.randn(o, i, generator=g) / i**0.5).to(dtype) for o, i in SHAPES] for _ in range(LAYERS)]
    head = (torch.randn(VOCAB, HIDDEN, generator=g) / HIDDEN**0.5).to(dtype)
    panels = [(pack(w), o, i) for layer in weights for w, (o, i) in zip(layer, SHAPES)]
    head_panels = pack(head)
    out: dict[str, float] = {}
    for r in rows:
        xs = {i: torch.randn(r, i, generator=g).to(dtype) for i in (576, 1536)}
        products = [(xs[i], p, o) for p, o, i in panels]
        out[f"layers/{r}"] = best_ms(lambda: [linear(x, p, o) for x, p, o in products], reps)
        out[f"head/{r}"] = best_ms(lambda: linear(xs[576], head_panels, VOCAB), reps)
        got = linear(xs[576], head_panels, VOCAB).double()
        out[f"err/{r}"] = (got - F.linear(xs[576].double(), head.double())).abs().max().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", help="the git revision whose linear.cpp to compare with")
    ap.add_argument("--rows", default="16,64,128", help="batch widths, comma-separated")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--rounds", type=int, default=3, help="alternating before/after processes")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--time", help=argparse.SUPPRESS)  # internal: time one library, print JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    if args.time:
        print(json.dumps(time_library(args.time, rows, getattr(torch, args.dtype), args.reps)))
        return
    if not args.base:
        ap.error("--base REV is required: the git revision whose linear.cpp to compare with")
    print(f"panel products in {args.dtype}: {args.base} (before) against this checkout (after), {LAYERS} layers "
          f"and the LM head, {args.threads} threads, load {os.getloadavg()[0]:.1f}")
    times = compare(__file__, "linear.cpp", args.base, ["--rows", args.rows, "--dtype", args.dtype, "--threads",
                                                        str(args.threads), "--reps", str(args.reps)], args.rounds)
    print(f"{'rows':>5}{'layers before':>15}{'after':>8}{'ratio':>7}{'head before':>13}{'after':>8}{'ratio':>7}"
          f"{'max |head - exact|':>20}")
    for r in rows:
        lb, la = min(times["before"][f"layers/{r}"]), min(times["after"][f"layers/{r}"])
        hb, ha = min(times["before"][f"head/{r}"]), min(times["after"][f"head/{r}"])
        err = max(times["before"][f"err/{r}"] + times["after"][f"err/{r}"])
        print(f"{r:>5}{lb:>15.2f}{la:>8.2f}{median_ratio(times, f'layers/{r}'):>7.2f}{hb:>13.2f}{ha:>8.2f}"
              f"{median_ratio(times, f'head/{r}'):>7.2f}{err:>20.2e}")
    both = {w: [a + b for a, b in zip(times[w][f"layers/{rows[0]}"], times[w][f"head/{rows[0]}"])] for w in times}
    ratio = statistics.median(b / a for b, a in zip(both["before"], both["after"]))
    print(f"load {os.getloadavg()[0]:.1f}")
    print(f"panels_after_vs_before_at_{rows[0]}_rows: {ratio:.3f}")


if __name__ == "__main__":
    main()
