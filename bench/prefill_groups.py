"""A job's first prefill, its prompts in one forward against grouped by length (``marco.llm.hf.prefill_groups``).

A job's first expansion admits its P problems' prompts together. One forward pads every prompt to the
longest uncached part; the backend now runs them in groups of similar length instead (padding within
``PREFILL_PAD_WASTE`` of the real tokens). This times both on the bundled model in one process, in
alternation, each from an empty prefix cache (the shared system prompt is prefilled once either way), and
prints the tokens each ran and the ratio.

Usage: python bench/prefill_groups.py [--problems 64] [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import marco.llm.hf as hf_module  # noqa: E402
from bench.mcts_batch import mcts_batch  # noqa: E402
from marco.llm import load_backend  # noqa: E402
from marco.llm.base import GenerationRequest  # noqa: E402
from marco.search.state import ASSISTANT_PREFIX  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=64, help="prompts admitted together (a job's chunk)")
    ap.add_argument("--rounds", type=int, default=2, help="one-forward/grouped pairs")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task, problems, _ = mcts_batch(args.problems)
    hf = load_backend("smollm2")
    prompts = [hf.apply_chat_template(task.messages(p), ASSISTANT_PREFIX) for p in problems]
    requests = [GenerationRequest(p, 1, ignore_eos=True) for p in prompts]
    grouped_waste = hf_module.PREFILL_PAD_WASTE
    padded: dict[str, int] = {}

    def run(label: str, waste: float) -> float:
        hf_module.PREFILL_PAD_WASTE = waste
        assert hf.prefix_cache is not None
        hf.prefix_cache.clear()
        seen: list[int] = []
        inner = hf._prefill

        def counting(ps):  # type: ignore[no-untyped-def]
            out = inner(ps)
            seen.append(len(ps) * out[4])  # rows x the longest uncached part: the tokens the forward ran
            return out

        hf._prefill = counting  # type: ignore[method-assign]
        t = time.perf_counter()
        try:
            hf.generate(requests)
        finally:
            del hf._prefill
        padded[label] = sum(seen[1:])  # [0]: the shared prefix
        return time.perf_counter() - t

    run("grouped", grouped_waste)  # warm-up
    one, grouped = [], []
    for _ in range(args.rounds):
        one.append(run("one", 1e9))
        grouped.append(run("grouped", grouped_waste))
    hf_module.PREFILL_PAD_WASTE = grouped_waste
    real = sum(len(p) for p in prompts)
    print(f"{len(prompts)} prompts, {real} tokens ({real / len(prompts):.0f} a prompt) · {args.threads} threads · "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"one forward: {min(one):6.2f} s, {padded['one']} tokens run past the shared prefix")
    print(f"grouped:     {min(grouped):6.2f} s, {padded['grouped']} tokens run past the shared prefix")
    print(f"grouped_vs_one_forward: {min(one) / min(grouped):.3f}")


if __name__ == "__main__":
    main()
