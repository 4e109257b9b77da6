"""The k samples of a request reading their shared prompt once (``decode_attention_shared``) against each
reading its own copy, in the product's MCTS batch.

A request's samples are admitted together and their slots hold copies of one prefill's prompt columns, most
of each row's context. The decode step's attention reads those columns once for the whole group where the
kernel has the vector path (float32 with AVX2; see ``marco/llm/kernels/decode_attention.cpp``). This runs
the same search both ways on the bundled model in one process, in alternation (the machine's speed drifts
between runs), from an empty prefix cache each time, and prints tokens/s, the attention kernel's time a
step and the ratio. Both ways give the same tokens: a row's arithmetic does not depend on the grouping.

Usage: python bench/shared_columns.py [--problems 64] [--rounds 2] [--budget 1024] [--threads 2]
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

import marco.llm.hf as hf_module  # noqa: E402
from bench.mcts_batch import mcts_batch  # noqa: E402
from marco.llm import load_backend  # noqa: E402
from marco.llm.base import GenerationRequest  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=64, help="problems searched in lockstep (marco run's --chunk)")
    ap.add_argument("--rounds", type=int, default=2, help="own/shared pairs")
    ap.add_argument("--budget", type=int, default=1024, help="tokens per search (the CLI default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task, problems, config = mcts_batch(args.problems, args.budget)
    hf = load_backend("smollm2")
    hf.generate([GenerationRequest(hf.encode("Hello"), 4)])
    fast = hf.fast_decoder()
    if fast is None or fast._attend_shared is None:
        raise SystemExit("the fast decode step or the native kernels do not apply here")
    if fast.dtype != torch.float32:
        print(f"note: the model runs {fast.dtype}; the kernel shares reads only in float32 (AVX2), so both ways "
              "are the same here")
    spent = {"attention": 0.0, "columns": 0, "once": 0}

    def timed(fn: Any) -> Any:
        def run(*a: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                spent["attention"] += time.perf_counter() - t
        return run

    def counted(fn: Any) -> Any:
        def run(q: Any, k: Any, v: Any, lens: torch.Tensor, src: torch.Tensor, split: torch.Tensor, scale: float) -> Any:
            # columns the rows attend to, and those a group's other rows did not read again
            spent["columns"] += int(lens.sum()) + len(lens)
            spent["once"] += int(split[src != torch.arange(len(src))].sum())
            return fn(q, k, v, lens, src, split, scale)
        return run

    fast._attend, fast._attend_shared = timed(fast._attend), counted(timed(fast._attend_shared))
    shared_columns = hf_module._DecodeBatch._shared_columns

    def own_columns(self: Any) -> tuple[torch.Tensor, torch.Tensor]:
        src, split = shared_columns(self)
        return torch.arange(len(src)), split  # the same split, each row its own source

    results: dict[str, list[tuple[float, float, int]]] = {"own": [], "shared": []}
    for _ in range(args.rounds):
        for label in ("own", "shared"):
            hf_module._DecodeBatch._shared_columns = own_columns if label == "own" else shared_columns
            assert hf.prefix_cache is not None
            hf.prefix_cache.clear()
            spent.update(attention=0.0, columns=0, once=0)
            steps = hf.decode_steps
            driver = LockstepDriver(hf, task, config)
            t = time.perf_counter()
            driver.run(problems)
            wall = time.perf_counter() - t
            tokens = driver.stats.generated_tokens
            ms = 1000 * spent["attention"] / max(1, hf.decode_steps - steps)
            results[label].append((tokens / wall, ms, tokens))
            print(f"{label:<7} {tokens} tokens in {wall:6.1f} s = {tokens / wall:6.1f} tokens/s · attention "
                  f"{ms:5.1f} ms a step, {spent['once'] / max(1, spent['columns']):.0%} of the columns a group's shared prompt · "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    hf_module._DecodeBatch._shared_columns = shared_columns
    ratios = [s[0] / o[0] for o, s in zip(results["own"], results["shared"])]
    attention = [o[1] / s[1] for o, s in zip(results["own"], results["shared"])]
    same = len({r[2] for rs in results.values() for r in rs}) == 1
    print(f"{args.problems} problems · {args.threads} threads · the same tokens both ways: {same}")
    print(f"attention kernel own/shared per round: {', '.join(f'{a:.2f}' for a in attention)}")
    print(f"shared_vs_own_columns: {sum(ratios) / len(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
