"""A decode step's pass over its logits: torch's logsumexp, division by the temperatures, logsumexp and
top-256 against the native ``logit_stats``, side by side in one process.

SmolLM2's vocabulary (49,152), float32 logits of a search's spread (normal, sd 3), temperatures 0.5-1.5.
Best of ``--reps`` calls each, alternating; checks that the top-k is the same and prints the largest
difference of the log-sum-exps.

Last line: ``native_vs_torch_at_R_rows`` (torch time / native time, the first ``--rows``).

``--base REV`` times instead this checkout's ``logit_stats`` against git revision REV's, each library in
processes of its own, alternating ``--rounds`` times (float32 logits, which every revision takes). Last line:
``native_after_vs_before_at_R_rows`` (before time / after time, median over rounds).

Usage: python bench/logit_stats.py [--rows 37,64] [--threads all CPUs] [--reps 20] [--base REV [--rounds 3]]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.attention_kernel import alternate, best_ms  # noqa: E402
from bench.kernel_revisions import compare, median_ratio  # noqa: E402
from marco.llm.kernels import SOURCE, logit_stats_op, logit_stats_reference  # noqa: E402

VOCAB, K = 49152, 256


def inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rows)
    return torch.randn(rows, VOCAB, generator=g) * 3, torch.rand(rows, generator=g) + 0.5


def time_library(library: str, rows: list[int], reps: int) -> dict[str, float]:
    """(In a process of its own) ``library``'s best time per row count."""
    torch.ops.load_library(library)
    op = torch.ops.marco.logit_stats
    out = {}
    for r in rows:
        x, temps = inputs(r)
        out[str(r)] = best_ms(lambda: op(x, temps, K), reps)
    return out


def compare_with(base: str, args: argparse.Namespace) -> None:
    """This checkout's ``logit_stats`` against revision ``base``'s, alternating processes."""
    print(f"logit_stats: {base} (before) against this checkout (after), [rows, {VOCAB}] float32, top-{K}, "
          f"{args.threads} threads, load {os.getloadavg()[0]:.1f}")
    times = compare(__file__, SOURCE.name, base, ["--rows", args.rows, "--threads", str(args.threads), "--reps",
                                                  str(args.reps)], args.rounds)
    print(f"{'rows':>5}{'before ms':>11}{'after ms':>10}{'ratio':>7}")
    first = None
    for rows in times["before"]:
        ratio = median_ratio(times, rows)
        print(f"{rows:>5}{min(times['before'][rows]):>11.2f}{min(times['after'][rows]):>10.2f}{ratio:>7.2f}")
        first = ratio if first is None else first
    print(f"load {os.getloadavg()[0]:.1f}")
    print(f"native_after_vs_before_at_{args.rows.split(',')[0]}_rows: {first:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="37,64")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--base", help="compare with the kernel of this git revision instead of torch's ops")
    ap.add_argument("--rounds", type=int, default=3, help="alternating before/after processes (with --base)")
    ap.add_argument("--time", help=argparse.SUPPRESS)  # internal: time one library, print JSON
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.time:
        print(json.dumps(time_library(args.time, [int(r) for r in args.rows.split(",")], args.reps)))
        return
    if args.base:
        compare_with(args.base, args)
        return
    op = logit_stats_op()
    if op is None:
        sys.exit("the native kernels did not build here (see the warning above)")
    print(f"logits [rows, {VOCAB}] float32, top-{K}, {args.threads} threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'rows':>5}{'torch ms':>10}{'native ms':>11}{'ratio':>7}  same top-k  max lse difference")
    first: float | None = None
    for rows in (int(r) for r in args.rows.split(",")):
        x, temps = inputs(rows)
        got, want = op(x, temps, K), logit_stats_reference(x, temps, K)
        # the same values in order and the same ids: equal logits may come in either order (the kernel puts the
        # lower id first, torch.topk does not say)
        same = torch.equal(got[2], want[2]) and torch.equal(got[3].sort(-1).values, want[3].sort(-1).values)
        diff = max(float((a - b).abs().max()) for a, b in zip(got[:2], want[:2]))
        a, b = alternate(lambda: logit_stats_reference(x, temps, K), lambda: op(x, temps, K), args.reps)
        ratio = a / b
        first = ratio if first is None else first
        print(f"{rows:>5}{a:>10.2f}{b:>11.2f}{ratio:>7.2f}  {str(same):<10}  {diff:.2g}")
    print(f"native_vs_torch_at_{args.rows.split(',')[0]}_rows: {first:.3f}")


if __name__ == "__main__":
    main()
