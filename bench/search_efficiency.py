"""How efficiently the search uses the model, measured side by side in one run on the real model.

(a) Throughput: generated tokens per second of lockstep MCTS over P problems, against the backend's raw
    batched generation of the same number of tokens at the same batch width (P x k rows, no stops): the
    limit this machine allows for that batch.
(b) Lockstep vs sequential: the same P searches advanced together (one model call per round across
    every tree) against the same searches run one after another.
(c) Depth per token: mean tree depth reached per 1,000 tokens, with and without rollout reuse.

Last line: ``mcts_vs_raw_throughput: X``.
Usage: python bench/search_efficiency.py [--problems 16] [--budget 768] [--children 3] [--model smollm2]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco.llm import load_backend  # noqa: E402
from marco.llm.base import GenerationRequest  # noqa: E402
from marco.search.base import SearchConfig  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402
from marco.tasks import default_data_dir, get_task  # noqa: E402


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
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--budget", type=int, default=768, help="tokens per search")
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--rollout", type=int, default=96, help="max tokens of one rollout")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--skip-sequential", action="store_true")
    args = ap.parse_args()

    backend = load_backend(args.model)
    data = default_data_dir()
    task = get_task("mgsm" if data else "demo")
    problems = task.load(data, ["en"], args.problems) if data else task.load(None, None, args.problems)
    config = SearchConfig(strategy="mcts", action="ministep:32", budget=args.budget, children=args.children,
                          max_answer_tokens=args.rollout, seed=1)

    # warm-up (allocator, kernels) so the first measured call is not penalised
    backend.generate([GenerationRequest(backend.encode("Hello"), 4)])

    def cold() -> None:  # every measured run starts with an empty prefix cache
        cache = getattr(backend, "prefix_cache", None)
        if cache is not None:
            cache.clear()

    cold()
    driver = LockstepDriver(backend, task, config)
    t = time.perf_counter()
    results = driver.run(problems)
    mcts_s = time.perf_counter() - t
    tokens = driver.stats.generated_tokens
    width = len(problems) * args.children

    prompts = [backend.apply_chat_template(task.messages(p), "<Thought>\n") for p in problems]
    per_row = max(1, round(tokens / width))
    # no stop: every row generates exactly per_row tokens (EOS is ignored by asking for a stop-free budget)
    reqs = [GenerationRequest(p, per_row, n=args.children, temperature=0.7, seed=i, ignore_eos=True)
            for i, p in enumerate(prompts)]
    cold()
    t = time.perf_counter()
    raw = backend.generate(reqs)
    raw_s = time.perf_counter() - t
    raw_tokens = sum(g.num_tokens for gs in raw for g in gs)

    seq_s = None
    if not args.skip_sequential:
        cold()
        t = time.perf_counter()
        for p in problems:
            LockstepDriver(backend, task, config).run([p])
        seq_s = time.perf_counter() - t

    mcts_tps, raw_tps = tokens / mcts_s, raw_tokens / raw_s
    print(f"model {args.model} · {len(problems)} problems · mcts ministep:32 k={args.children} budget {args.budget}")
    print(f"{'run':<28}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    print(f"{'lockstep MCTS':<28}{tokens:>8}{mcts_s:>10.1f}{mcts_tps:>10.1f}")
    print(f"{'raw batched generate':<28}{raw_tokens:>8}{raw_s:>10.1f}{raw_tps:>10.1f}")
    if seq_s is not None:
        print(f"{'sequential MCTS':<28}{tokens:>8}{seq_s:>10.1f}{tokens / seq_s:>10.1f}")
    st = driver.stats
    print(f"rounds {st.rounds} · model calls {st.backend_calls} · mean width {st.rows / max(1, st.backend_calls):.1f}"
          f" · time in model {st.generate_s / mcts_s:.0%}")
    print(f"answers: {sum(r.correct or False for r in results)}/{len(results)} correct")
    if seq_s is not None:
        print(f"lockstep_vs_sequential_speedup: {seq_s / mcts_s:.2f}")
    depth_per_token(backend, task, problems, config)
    print(f"mcts_vs_raw_throughput: {mcts_tps / raw_tps:.3f}")


if __name__ == "__main__":
    main()
