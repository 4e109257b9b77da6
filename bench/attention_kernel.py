"""The native decode attention's vector path (AVX-512 for bfloat16, AVX2 for float32) against its portable
loops, side by side in one process.

SmolLM2's shapes: 9 query heads over 3 KV heads of 64, 30 layers each with its own slot buffers (so keys and
values stream from memory, as in a real step), 512 allocated columns, row lengths drawn from 150-454 (a
search's contexts). Best of ``--reps`` 30-layer passes each, alternating. Prints milliseconds, the keys and
values actually read per second, and the largest difference between the two paths.

``--shared`` adds a search's own layout (``decode_attention_shared``): rows in groups of three (a request's
samples) whose first 180-299 columns are one prompt, read once for the group, then 0-149 columns of each
row's own. With ``--base`` it is timed beside the plain rows (``bfloat16/64/shared``).

Last line: ``vector_vs_portable_at_R_rows`` (portable time / vector time, the first ``--rows`` and dtype).

``--base REV`` compares instead the vector path of this checkout's kernel with the one of git revision REV
(built from that revision's ``decode_attention.cpp`` into a temporary library): the two libraries register
the same ops, so each is timed in its own process, alternating, ``--rounds`` times, on the same seeded data.
Last line: ``vector_after_vs_before_at_R_rows`` (REV's time / this checkout's, median over rounds).

Usage: python bench/attention_kernel.py [--rows 36,64] [--dtype float32,bfloat16] [--threads all CPUs] [--shared]
       python bench/attention_kernel.py --base HEAD [--rounds 3] [--rows 64] [--dtype bfloat16] [--shared]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.kernel_revisions import compare, median_ratio  # noqa: E402
from marco.llm.kernels import SOURCE, decode_attention_op  # noqa: E402

LAYERS, HEADS, KV_HEADS, DIM, COLS = 30, 9, 3, 64, 512


def best_ms(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def alternate(before, after, reps: int, rounds: int = 2) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Best milliseconds of ``before`` and of ``after``, timed in alternation (load changes hit both)."""
    a, b = [], []
    for _ in range(rounds):
        a.append(best_ms(before, reps))
        b.append(best_ms(after, reps))
    return min(a), min(b)


def inputs(rows: int, dtype: torch.dtype, seed: int = 0):  # type: ignore[no-untyped-def]
    """A step's queries, each layer's own key and value buffers, and the rows' lengths (seeded)."""
    g = torch.Generator().manual_seed(seed + rows)
    ks = [torch.randn(rows, KV_HEADS, COLS, DIM, generator=g).to(dtype) for _ in range(LAYERS)]
    vs = [torch.randn(rows, KV_HEADS, COLS, DIM, generator=g).to(dtype) for _ in range(LAYERS)]
    return torch.randn(rows, HEADS, DIM, generator=g).to(dtype), ks, vs, torch.randint(150, 455, (rows,), generator=g)


def shared_layout(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lens, src, split)`` of a search's rows: groups of three sharing a 180-299-column prompt, then 0-149
    columns of their own (the columns the shared rows copy hold the same values in the timing: only the
    lead row's are read)."""
    g = torch.Generator().manual_seed(seed + rows)
    split = torch.randint(180, 300, ((rows + 2) // 3,), generator=g).repeat_interleave(3)[:rows]
    return split + torch.randint(0, 150, (rows,), generator=g), torch.arange(rows) // 3 * 3, split


def shared_bytes(lens: torch.Tensor, src: torch.Tensor, split: torch.Tensor, element: int) -> int:
    """Bytes of keys and values one layer of ``decode_attention_shared`` reads."""
    lead = src == torch.arange(len(src))
    return (int(split[lead].sum()) + int((lens + 1 - split).sum())) * KV_HEADS * DIM * 2 * element


def shared_ms(q: torch.Tensor, ks: list[torch.Tensor], vs: list[torch.Tensor], layout: tuple, reps: int) -> float:
    """Best 30-layer time of ``decode_attention_shared`` over ``layout`` (:func:`shared_layout`)."""
    lens, src, split = layout
    return best_ms(lambda: [torch.ops.marco.decode_attention_shared(q, ks[i], vs[i], lens, src, split, 0.125)
                            for i in range(LAYERS)], reps)


def time_library(library: str, rows: list[int], dtypes: list[str], reps: int, shared: bool = False) -> dict[str, float]:
    """(In a process of its own) the vector path's best 30-layer time of ``library`` per dtype and rows."""
    torch.ops.load_library(library)
    op = torch.ops.marco.decode_attention
    out = {}
    for name in dtypes:
        for r in rows:
            q, ks, vs, lens = inputs(r, getattr(torch, name))
            out[f"{name}/{r}"] = best_ms(lambda: [op(q, ks[i], vs[i], lens, 0.125) for i in range(LAYERS)], reps)
            if shared:
                out[f"{name}/{r}/shared"] = shared_ms(q, ks, vs, shared_layout(r), reps)
    return out


def compare_with(base: str, args: argparse.Namespace) -> None:
    """This checkout's kernel against revision ``base``'s, alternating processes."""
    print(f"decode attention, vector path: {base} (before) against this checkout (after), {LAYERS} layers, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f}")
    times = compare(__file__, SOURCE.name, base, ["--rows", args.rows, "--dtype", args.dtype, "--threads",
                                                  str(args.threads), "--reps", str(args.reps),
                                                  *(["--shared"] if args.shared else [])], args.rounds)
    print(f"{'dtype':<10}{'rows':>12}{'before ms':>11}{'after ms':>10}{'ratio':>7}")
    first = None
    for key in times["before"]:
        name, rows = key.split("/", 1)
        ratio = median_ratio(times, key)
        print(f"{name:<10}{rows:>12}{min(times['before'][key]):>11.1f}{min(times['after'][key]):>10.1f}{ratio:>7.2f}")
        first = ratio if first is None else first
    print(f"load {os.getloadavg()[0]:.1f}")
    print(f"vector_after_vs_before_at_{args.rows.split(',')[0]}_rows: {first:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="36,64")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--base", help="compare with the kernel of this git revision instead of the portable loops")
    ap.add_argument("--rounds", type=int, default=3, help="alternating before/after processes (with --base)")
    ap.add_argument("--shared", action="store_true",
                    help="also the search's layout: groups of three rows reading their shared prompt once")
    ap.add_argument("--time", help=argparse.SUPPRESS)  # internal: time one library, print JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.time:
        print(json.dumps(time_library(args.time, [int(r) for r in args.rows.split(",")], args.dtype.split(","),
                                      args.reps, args.shared)))
        return
    if args.base:
        compare_with(args.base, args)
        return
    if decode_attention_op() is None:
        sys.exit("the native kernels did not build here (see the warning above)")
    vector, portable = torch.ops.marco.decode_attention, torch.ops.marco.decode_attention_portable
    print(f"decode attention, {LAYERS} layers, {HEADS}/{KV_HEADS} heads of {DIM}, {COLS} columns, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'dtype':<10}{'rows':>5}{'portable ms':>13}{'vector ms':>11}{'ratio':>7}{'GB/s':>7}  max difference")
    first: float | None = None
    for name in args.dtype.split(","):
        dtype = getattr(torch, name)
        for rows in (int(r) for r in args.rows.split(",")):
            q, ks, vs, lens = inputs(rows, dtype)
            diff = float((vector(q, ks[0], vs[0], lens, 0.125).float()
                          - portable(q, ks[0], vs[0], lens, 0.125).float()).abs().max())
            a, b = alternate(lambda: [portable(q, ks[i], vs[i], lens, 0.125) for i in range(LAYERS)],
                             lambda: [vector(q, ks[i], vs[i], lens, 0.125) for i in range(LAYERS)], args.reps)
            read = int((lens + 1).sum()) * KV_HEADS * DIM * 2 * ks[0].element_size() * LAYERS
            ratio = a / b
            first = ratio if first is None else first
            print(f"{name:<10}{rows:>5}{a:>13.1f}{b:>11.1f}{ratio:>7.2f}{read / b / 1e6:>7.1f}  {diff:.2g}")
            if args.shared:  # the search's layout: no portable counterpart, the vector path alone
                layout = shared_layout(rows)
                ms = shared_ms(q, ks, vs, layout, args.reps)
                read = shared_bytes(*layout, ks[0].element_size()) * LAYERS
                print(f"{name:<10}{rows:>5} shared prompts in groups of 3: {ms:.1f} ms, {read / ms / 1e6:.1f} GB/s")
    print(f"vector_vs_portable_at_{args.rows.split(',')[0]}_rows: {first:.3f}")


if __name__ == "__main__":
    main()
