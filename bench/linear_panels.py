"""The product's MCTS batch with the decode step's products on the native panel kernel against oneDNN's
prepacked matmul, side by side in one process, in the dtype the model runs here (``--dtype``, default
``auto``).

``marco/llm/kernels/linear.cpp`` multiplies a step's rows by weights packed into panels: float32 in AVX2/FMA
tiles of 6 rows x 16 columns, bfloat16 in AVX512-BF16 tiles of 12 rows x 32 columns
(``marco.llm.decode_step.panels_wanted`` picks them for float32 on AVX2 CPUs without AVX-512, and for
bfloat16 on AVX512-BF16 CPUs without AMX). This runs the same search with each weight format in alternation
(the machine's speed drifts between runs), from an empty prefix cache each time, and prints tokens/s, the
time a fast step spent in its products and the ratio. The two libraries round differently (float32: within
1e-5 a product; bfloat16: a few outputs in 10^5 one bfloat16 step apart), so a sampled token can differ and
the two runs' token counts with it: both are printed.

Last line: ``panels_vs_onednn: X`` (tokens/s with the panels / tokens/s with oneDNN, mean over rounds).

Usage: python bench/linear_panels.py [--problems 64] [--rounds 1] [--budget 1024] [--threads 2]
       (MARCO_DTYPE=float32 to compare float32 on a bfloat16 CPU)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mcts_batch import alternate_searches, pair_ratios, side_by_side_setup, timed_into  # noqa: E402
from marco.llm.decode_step import LlamaDecode  # noqa: E402
from marco.llm.kernels import linear_panels_op  # noqa: E402


def main() -> None:
    args, task, problems, config, hf = side_by_side_setup(__doc__, 1, "oneDNN/panels pairs")
    if hf.fast_decoder() is None or linear_panels_op(hf.model.dtype) is None:
        raise SystemExit(f"the fast decode step or the native panel kernel in {hf.model.dtype} (float32: AVX2 and "
                         "FMA; bfloat16: AVX512-BF16) does not apply here")
    decoders = {w: LlamaDecode(hf.model, weights=w) for w in ("onednn", "panels")}
    spent = {"linear": 0.0}

    for d in decoders.values():
        d.linear = timed_into(spent, "linear", d.linear)
        if d._add is not None:  # the o and down products with their residual adds
            d._add = timed_into(spent, "linear", d._add)
    results = alternate_searches(hf, task, problems, config, decoders, args.rounds, spent, "linear", "products")
    ratios, products, tokens = pair_ratios(results, "onednn", "panels")
    print(f"{args.problems} problems · {args.threads} threads · {hf.model.dtype} · tokens: {tokens}")
    print(f"products oneDNN/panels per round: {', '.join(f'{a:.2f}' for a in products)}")
    print(f"panels_vs_onednn: {sum(ratios) / len(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
