"""Decode attention before and after ``marco.llm.attention``, side by side in one process.

(a) One layer's decode attention at the search's shapes (SmolLM2: 9 query heads over 3 KV heads of 64), in
    the model's dtype: transformers' SDPA over the slot cache's strided ``[:rows, :, :width]`` slice (before)
    against ``decode_attention`` over the contiguous ``[:rows]`` block of the width allocated (after, that
    width rounded up to 64 columns as the slot cache allocates them). Median of ``--reps`` calls each.
(b) The product's MCTS (ministep:32, budget 1024, rollouts up to 384, k = 3) on P MGSM-en problems with the
    same loaded model, alternating before, after, before, after ... (``--rounds`` pairs) so load changes on
    the shared cores hit both. The trees differ a little between the two (the arithmetic rounds differently),
    so each run's own generated tokens over its own seconds are compared.

Last line: ``mcts_tokens_per_s_after_vs_before: X`` (median of the per-round ratios).

Usage: python bench/attention_decode.py [--problems 16] [--rounds 2] [--threads 2] [--dtype auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from marco.llm import load_backend  # noqa: E402
from marco.llm.attention import NAME, decode_attention  # noqa: E402
from marco.llm.base import GenerationRequest  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402
from bench.mcts_batch import mcts_batch  # noqa: E402


def median_ms(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def layer_rows(dtype: torch.dtype, reps: int) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups = 3  # type: ignore[assignment]
    print(f"(a) one layer's decode attention, {str(dtype).removeprefix('torch.')}, median of {reps}")
    print(f"{'rows':>6}{'width':>7}{'before ms':>11}{'after ms':>10}{'ratio':>8}")
    g = torch.Generator().manual_seed(0)
    for rows, width in ((16, 300), (48, 250), (48, 400), (48, 700)):
        alloc = -(-(width + 1) // 64) * 64
        keys = torch.randn(64, 3, alloc + 256, 64, generator=g).to(dtype)  # a buffer reserved wider than used
        values = torch.randn(64, 3, alloc + 256, 64, generator=g).to(dtype)
        query = torch.randn(rows, 9, 1, 64, generator=g).to(dtype)
        lens = torch.randint(width // 2, width, (rows,), generator=g)

        def mask(w: int) -> torch.Tensor:
            return (torch.arange(w)[None, :] <= lens[:, None])[:, None, None, :]

        strided, m_strided = (keys[:rows, :, :width], values[:rows, :, :width]), mask(width)
        block_k = keys[:, :, :alloc].contiguous()  # the slot cache's tight allocation
        block_v = values[:, :, :alloc].contiguous()
        block, m_block = (block_k[:rows], block_v[:rows]), mask(alloc)
        with torch.inference_mode():
            before = median_ms(lambda: sdpa_attention_forward(module, query, *strided, m_strided, scaling=0.125), reps)
            after = median_ms(lambda: decode_attention(module, query, *block, m_block, scaling=0.125), reps)
            a = sdpa_attention_forward(module, query, *strided, m_strided, scaling=0.125)[0].float()
            b = decode_attention(module, query, *block, m_block, scaling=0.125)[0].float()
        print(f"{rows:>6}{width:>7}{before:>11.3f}{after:>10.3f}{before / after:>8.2f}   max |diff| {(a - b).abs().max():.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None, help="auto|float32|bfloat16 (default $MARCO_DTYPE, else auto)")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--budget", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf = load_backend("smollm2", dtype=args.dtype)
    dtype = hf.kv_spec.dtype
    print(f"SmolLM2-135M · {args.threads} threads · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.1f}")
    layer_rows(dtype, args.reps)

    task, problems, config = mcts_batch(args.problems, args.budget)
    hf.generate([GenerationRequest(hf.encode("Hello"), 4)])

    def run(after: bool) -> float:
        hf.decode_attention = after
        hf.model.set_attn_implementation(NAME if after else "sdpa")
        driver = LockstepDriver(hf, task, config)
        t = time.perf_counter()
        driver.run(problems)
        secs = time.perf_counter() - t
        tps = driver.stats.generated_tokens / secs
        print(f"  {'after ' if after else 'before'}  {driver.stats.generated_tokens:>7} tokens {secs:>7.1f}s "
              f"{tps:>7.1f} tokens/s   load {os.getloadavg()[0]:.1f}", flush=True)
        return tps

    print(f"(b) MCTS ministep:32 k=3 budget {args.budget} on {len(problems)} problems, "
          f"{str(dtype).removeprefix('torch.')}, alternating")
    ratios = []
    for _ in range(args.rounds):
        before = run(False)
        after = run(True)
        ratios.append(after / before)
    print(f"mcts_tokens_per_s_after_vs_before: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
