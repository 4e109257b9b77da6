"""The k samples of a request reading their shared prompt once (``decode_attention_shared``) against each
reading its own copy, in the product's MCTS batch.

A request's samples are admitted together and their slots hold copies of one prefill's prompt columns, most
of each row's context. The decode step's attention reads those columns once for the whole group where the
kernel has the vector path (float32 with AVX2, bfloat16 with AVX-512; see
``marco/llm/kernels/decode_attention.cpp``). This runs the same search both ways on the bundled model in
one process, in alternation (the machine's speed drifts between runs), from an empty prefix cache each time,
and prints tokens/s, the attention kernel's time a step and the ratio. Both ways give the same tokens: a
row's arithmetic does not depend on the grouping.

Usage: python bench/shared_columns.py [--problems 64] [--rounds 2] [--budget 1024] [--threads 2]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import marco.llm.hf as hf_module  # noqa: E402
from marco.llm.precision import local_cpu_flags  # noqa: E402
from bench.mcts_batch import search_from_cold, side_by_side_setup, timed_into  # noqa: E402


def main() -> None:
    args, task, problems, config, hf = side_by_side_setup(__doc__, 2, "own/shared pairs")
    fast = hf.fast_decoder()
    if fast is None or fast._attend_shared is None:
        raise SystemExit("the fast decode step or the native kernels do not apply here")
    flags = local_cpu_flags()
    shares = (fast.dtype == torch.float32 and "avx2" in flags) or (fast.dtype == torch.bfloat16 and "avx512f" in flags)
    if not shares:
        print(f"note: the model runs {fast.dtype}; the kernel shares reads only in float32 with AVX2 and bfloat16 "
              "with AVX-512, so both ways are the same here")
    spent = {"attention": 0.0, "columns": 0, "once": 0}

    def counted(fn: Any) -> Any:
        def run(q: Any, k: Any, v: Any, lens: torch.Tensor, src: torch.Tensor, split: torch.Tensor, scale: float) -> Any:
            # columns the rows attend to, and those a group's other rows did not read again
            spent["columns"] += int(lens.sum()) + len(lens)
            spent["once"] += int(split[src != torch.arange(len(src))].sum())
            return fn(q, k, v, lens, src, split, scale)
        return run

    fast._attend = timed_into(spent, "attention", fast._attend)
    fast._attend_shared = counted(timed_into(spent, "attention", fast._attend_shared))
    shared_columns = hf_module._DecodeBatch._shared_columns

    def own_columns(self: Any) -> tuple[torch.Tensor, torch.Tensor]:
        src, split = shared_columns(self)
        return torch.arange(len(src)), split  # the same split, each row its own source

    results: dict[str, list[tuple[float, float, int]]] = {"own": [], "shared": []}
    for _ in range(args.rounds):
        for label in ("own", "shared"):
            hf_module._DecodeBatch._shared_columns = own_columns if label == "own" else shared_columns
            spent.update(attention=0.0, columns=0, once=0)
            tokens, wall, steps = search_from_cold(hf, task, problems, config)
            ms = 1000 * spent["attention"] / max(1, steps)
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
