"""A decode step's pass over its logits: torch's logsumexp, division by the temperatures, logsumexp and
top-256 against the native ``logit_stats``, side by side in one process.

SmolLM2's vocabulary (49,152), float32 logits of a search's spread (normal, sd 3), temperatures 0.5-1.5.
Best of ``--reps`` calls each, alternating; checks that the top-k is the same and prints the largest
difference of the log-sum-exps.

Last line: ``native_vs_torch_at_R_rows`` (torch time / native time, the first ``--rows``).

Usage: python bench/logit_stats.py [--rows 37,64] [--threads all CPUs] [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.attention_kernel import alternate  # noqa: E402
from marco.llm.kernels import logit_stats_op, logit_stats_reference  # noqa: E402

VOCAB, K = 49152, 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="37,64")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    op = logit_stats_op()
    if op is None:
        sys.exit("the native kernels did not build here (see the warning above)")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"logits [rows, {VOCAB}] float32, top-{K}, {args.threads} threads, load {os.getloadavg()[0]:.1f}")
    print(f"{'rows':>5}{'torch ms':>10}{'native ms':>11}{'ratio':>7}  same top-k  max lse difference")
    first: float | None = None
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, VOCAB, generator=g) * 3
        temps = torch.rand(rows, generator=g) + 0.5
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
