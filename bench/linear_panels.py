"""The product's MCTS batch with the decode step's float32 products on the native panel kernel against
oneDNN's prepacked sgemm, side by side in one process.

``marco/llm/kernels/linear.cpp`` multiplies a step's rows by weights packed into 16-column panels with
AVX2/FMA tiles of 6 rows x 16 columns (``marco.llm.decode_step.panels_wanted`` picks it for float32 on
AVX2 CPUs without AVX-512). This runs the same search with each weight format in alternation (the machine's
speed drifts between runs), from an empty prefix cache each time, and prints tokens/s, the time a fast step
spent in its products and the ratio. The two libraries round differently (within 1e-5 a product), so a
sampled token can differ and the two runs' token counts with it: both are printed.

Last line: ``panels_vs_onednn: X`` (tokens/s with the panels / tokens/s with oneDNN, mean over rounds).

Usage: python bench/linear_panels.py [--problems 64] [--rounds 1] [--budget 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.mcts_batch import mcts_batch  # noqa: E402
from marco.llm import load_backend  # noqa: E402
from marco.llm.base import GenerationRequest  # noqa: E402
from marco.llm.decode_step import LlamaDecode  # noqa: E402
from marco.llm.kernels import linear_panels_op  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=64, help="problems searched in lockstep (marco run's --chunk)")
    ap.add_argument("--rounds", type=int, default=1, help="oneDNN/panels pairs")
    ap.add_argument("--budget", type=int, default=1024, help="tokens per search (the CLI default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task, problems, config = mcts_batch(args.problems, args.budget)
    hf = load_backend("smollm2", dtype="float32")
    hf.generate([GenerationRequest(hf.encode("Hello"), 4)])
    if hf.fast_decoder() is None or linear_panels_op() is None:
        raise SystemExit("the fast decode step or the native panel kernel (AVX2 and FMA) does not apply here")
    decoders = {w: LlamaDecode(hf.model, weights=w) for w in ("onednn", "panels")}
    spent = {"linear": 0.0}

    def timed(fn: Any) -> Any:
        def run(*a: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                spent["linear"] += time.perf_counter() - t
        return run

    for d in decoders.values():
        d.linear = timed(d.linear)
    results: dict[str, list[tuple[float, float, int]]] = {w: [] for w in decoders}
    for _ in range(args.rounds):
        for label, decoder in decoders.items():
            hf._fast = decoder  # what fast_decoder() returns
            assert hf.prefix_cache is not None
            hf.prefix_cache.clear()
            spent["linear"] = 0.0
            steps = hf.fast_steps
            driver = LockstepDriver(hf, task, config)
            t = time.perf_counter()
            driver.run(problems)
            wall = time.perf_counter() - t
            tokens = driver.stats.generated_tokens
            ms = 1000 * spent["linear"] / max(1, hf.fast_steps - steps)
            results[label].append((tokens / wall, ms, tokens))
            print(f"{label:<7} {tokens} tokens in {wall:6.1f} s = {tokens / wall:6.1f} tokens/s · products "
                  f"{ms:5.1f} ms a step · load {os.getloadavg()[0]:.1f}", flush=True)
    ratios = [p[0] / o[0] for o, p in zip(results["onednn"], results["panels"])]
    products = [o[1] / p[1] for o, p in zip(results["onednn"], results["panels"])]
    print(f"{args.problems} problems · {args.threads} threads · tokens: "
          f"{', '.join(f'{w} {r[2]}' for w, rs in results.items() for r in rs)}")
    print(f"products oneDNN/panels per round: {', '.join(f'{a:.2f}' for a in products)}")
    print(f"panels_vs_onednn: {sum(ratios) / len(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
