"""How efficiently the search uses the model, measured side by side in one run on the real model.

(a) Throughput: generated tokens per second of lockstep MCTS over P problems, against the backend's raw
    batched generation of the same number of tokens at the same batch width (P x k rows, no stops): the
    limit this machine allows for that batch.
(b) Lockstep vs sequential: the same P searches advanced together (one model call per round across
    every tree) against the same searches run one after another.
(c) Depth per token: mean tree depth reached per 1,000 tokens, with and without rollout reuse.

Each part also prints the process's peak resident memory while it ran and the KV cache's peak bytes
(slots + prefix cache, inside the ``MARCO_KV_CACHE_MB`` budget).

``--shapes small`` (default): 16 problems, rollouts of at most 96 tokens, budget 768.
``--shapes default``: the product's defaults as `marco run` uses them: 64 problems (one job, ``--chunk 64``),
rollouts of at most 384 tokens, budget 1024; sequential MCTS is skipped (hours on a CPU) unless asked.

Last line: ``mcts_vs_raw_throughput: X``.
Usage: python bench/search_efficiency.py [--shapes small|default] [--problems N] [--budget N] [--children 3]
       [--model smollm2]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco.llm import load_backend  # noqa: E402
from marco.llm.base import GenerationRequest  # noqa: E402
from marco.search.base import SearchConfig  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402
from bench.mcts_batch import mcts_batch  # noqa: E402


SHAPES = {  # problems, budget, rollout
    "small": (16, 768, 96),
    "default": (64, 1024, 384),  # marco run's --chunk, --budget and SearchConfig.max_answer_tokens
}


class PeakRSS:
    """Peak resident memory of this process during a ``with`` block, sampled every 20 ms from /proc."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> "PeakRSS":
        self.peak = self.now()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def depth_per_token(backend, task, problems, config: SearchConfig) -> float:  # type: ignore[no-untyped-def]
    """(c) Rollout reuse: mean tree depth reached per 1,000 generated tokens, the same MCTS with and
    without reuse on the same problems. Prints both and returns with / without."""
    rates = {}
    for reuse in (False, True):
        results = LockstepDriver(backend, task, replace(config, reuse=reuse)).run(problems)
        depth = sum(r.depth for r in results) / len(results)
        tokens = sum(r.tokens for r in results) / len(results)
        rates[reuse] = 1000 * depth / max(tokens, 1)
        print(f"{'MCTS ' + ('with' if reuse else 'without') + ' rollout reuse':<28}{tokens:>8.0f} tokens/problem"
              f"  depth {depth:.2f}  depth per 1k tokens {rates[reuse]:.2f}")
    print(f"depth_per_1k_tokens_reuse_vs_none: {rates[True] / max(rates[False], 1e-9):.2f}")
    return rates[True] / max(rates[False], 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="small", help="preset problems/budget/rollout")
    ap.add_argument("--problems", type=int, default=None)
    ap.add_argument("--budget", type=int, default=None, help="tokens per search")
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--rollout", type=int, default=None, help="max tokens of one rollout")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--sequential", action="store_true", help="run sequential MCTS with --shapes default too")
    ap.add_argument("--skip-depth", action="store_true", help="skip (c), the depth-per-token part")
    args = ap.parse_args()
    preset = SHAPES[args.shapes]
    custom = any(v is not None for v in (args.problems, args.budget, args.rollout))
    args.problems = args.problems or preset[0]
    args.budget = args.budget or preset[1]
    args.rollout = args.rollout or preset[2]
    if args.shapes == "default" and not args.sequential:
        args.skip_sequential = True

    backend = load_backend(args.model)
    task, problems, config = mcts_batch(args.problems, args.budget, args.rollout, args.children)

    # warm-up (allocator, kernels) so the first measured call is not penalised
    backend.generate([GenerationRequest(backend.encode("Hello"), 4)])

    kv = getattr(backend, "kv_budget", None)
    memory: dict[str, tuple[int, int | None]] = {}  # part -> (peak RSS, peak KV cache bytes)

    def cold() -> None:  # every measured run starts with an empty prefix cache
        cache = getattr(backend, "prefix_cache", None)
        if cache is not None:
            cache.clear()
        if kv is not None:
            kv.reset_limit()
            kv.peak = kv.used

    cold()
    driver = LockstepDriver(backend, task, config)
    t = time.perf_counter()
    with PeakRSS() as rss:
        results = driver.run(problems)
    mcts_s = time.perf_counter() - t
    memory["lockstep MCTS"] = (rss.peak, kv.peak if kv is not None else None)
    tokens = driver.stats.generated_tokens
    width = len(problems) * args.children

    prompts = [backend.apply_chat_template(task.messages(p), "<Thought>\n") for p in problems]
    per_row = max(1, round(tokens / width))
    # no stop: every row generates exactly per_row tokens (EOS is ignored by asking for a stop-free budget)
    reqs = [GenerationRequest(p, per_row, n=args.children, temperature=0.7, seed=i, ignore_eos=True)
            for i, p in enumerate(prompts)]
    cold()
    t = time.perf_counter()
    with PeakRSS() as rss:
        raw = backend.generate(reqs)
    raw_s = time.perf_counter() - t
    memory["raw batched generate"] = (rss.peak, kv.peak if kv is not None else None)
    raw_tokens = sum(g.num_tokens for gs in raw for g in gs)

    seq_s = None
    if not args.skip_sequential:
        cold()
        t = time.perf_counter()
        with PeakRSS() as rss:
            for p in problems:
                LockstepDriver(backend, task, config).run([p])
        seq_s = time.perf_counter() - t
        memory["sequential MCTS"] = (rss.peak, kv.peak if kv is not None else None)

    mcts_tps, raw_tps = tokens / mcts_s, raw_tokens / raw_s
    mib = 1 << 20

    def mem(part: str) -> str:
        rss_b, kv_b = memory[part]
        return f"{rss_b / mib:>10.0f}{(f'{kv_b / mib:.0f}' if kv_b is not None else '-'):>9}"

    budget = f" · KV budget {kv.total / mib:.0f} MiB" if kv is not None else ""
    print(f"model {args.model} · {len(problems)} problems · mcts ministep:32 k={args.children} budget {args.budget}"
          f" · rollouts <= {args.rollout} tokens ({'custom' if custom else args.shapes} shapes){budget}"
          f" · load {os.getloadavg()[0]:.1f}")
    print(f"{'run':<28}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}{'peak RSS MiB':>14}{'KV MiB':>9}")
    print(f"{'lockstep MCTS':<28}{tokens:>8}{mcts_s:>10.1f}{mcts_tps:>10.1f}    {mem('lockstep MCTS')}")
    print(f"{'raw batched generate':<28}{raw_tokens:>8}{raw_s:>10.1f}{raw_tps:>10.1f}    {mem('raw batched generate')}")
    if seq_s is not None:
        print(f"{'sequential MCTS':<28}{tokens:>8}{seq_s:>10.1f}{tokens / seq_s:>10.1f}    {mem('sequential MCTS')}")
    st = driver.stats
    print(f"rounds {st.rounds} · model calls {st.backend_calls} · mean width {st.rows / max(1, st.backend_calls):.1f}"
          f" · time in model {st.generate_s / mcts_s:.0%}")
    print(f"answers: {sum(r.correct or False for r in results)}/{len(results)} correct")
    if seq_s is not None:
        print(f"lockstep_vs_sequential_speedup: {seq_s / mcts_s:.2f}")
    if not args.skip_depth:
        depth_per_token(backend, task, problems, config)
    print(f"mcts_vs_raw_throughput: {mcts_tps / raw_tps:.3f}")


if __name__ == "__main__":
    main()
