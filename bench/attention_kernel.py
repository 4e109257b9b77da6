"""The native decode attention's vector path (AVX-512 for bfloat16, AVX2 for float32) against its portable
loops, side by side in one process.

SmolLM2's shapes: 9 query heads over 3 KV heads of 64, 30 layers each with its own slot buffers (so keys and
values stream from memory, as in a real step), 512 allocated columns, row lengths drawn from 150-454 (a
search's contexts). Best of ``--reps`` 30-layer passes each, alternating. Prints milliseconds, the keys and
values actually read per second, and the largest difference between the two paths.

Last line: ``vector_vs_portable_at_R_rows`` (portable time / vector time, the first ``--rows`` and dtype).

Usage: python bench/attention_kernel.py [--rows 36,64] [--dtype float32,bfloat16] [--threads all CPUs]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from marco.llm.kernels import decode_attention_op  # noqa: E402

LAYERS, HEADS, KV_HEADS, DIM, COLS = 30, 9, 3, 64, 512


def best_ms(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="36,64")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if decode_attention_op() is None:
        sys.exit("the native kernels did not build here (see the warning above)")
    torch.set_num_threads(args.threads)
    vector, portable = torch.ops.marco.decode_attention, torch.ops.marco.decode_attention_portable
    print(f"decode attention, {LAYERS} layers, {HEADS}/{KV_HEADS} heads of {DIM}, {COLS} columns, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'dtype':<10}{'rows':>5}{'portable ms':>13}{'vector ms':>11}{'ratio':>7}{'GB/s':>7}  max difference")
    first: float | None = None
    g = torch.Generator().manual_seed(0)
    for name in args.dtype.split(","):
        dtype = getattr(torch, name)
        for rows in (int(r) for r in args.rows.split(",")):
            ks = [torch.randn(rows, KV_HEADS, COLS, DIM, generator=g).to(dtype) for _ in range(LAYERS)]
            vs = [torch.randn(rows, KV_HEADS, COLS, DIM, generator=g).to(dtype) for _ in range(LAYERS)]
            q = torch.randn(rows, HEADS, DIM, generator=g).to(dtype)
            lens = torch.randint(150, 455, (rows,), generator=g)
            diff = float((vector(q, ks[0], vs[0], lens, 0.125).float()
                          - portable(q, ks[0], vs[0], lens, 0.125).float()).abs().max())
            a, b = [], []
            for _ in range(2):
                a.append(best_ms(lambda: [portable(q, ks[i], vs[i], lens, 0.125) for i in range(LAYERS)], args.reps))
                b.append(best_ms(lambda: [vector(q, ks[i], vs[i], lens, 0.125) for i in range(LAYERS)], args.reps))
            read = int((lens + 1).sum()) * KV_HEADS * DIM * 2 * ks[0].element_size() * LAYERS
            ratio = min(a) / min(b)
            first = ratio if first is None else first
            print(f"{name:<10}{rows:>5}{min(a):>13.1f}{min(b):>11.1f}{ratio:>7.2f}{read / min(b) / 1e6:>7.1f}  {diff:.2g}")
    print(f"vector_vs_portable_at_{args.rows.split(',')[0]}_rows: {first:.3f}")


if __name__ == "__main__":
    main()
