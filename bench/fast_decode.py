"""The transformers backend's MCTS batch with decode steps through the model's forward and through
``marco.llm.decode_step``, side by side in one process on one loaded model.

Each run is the product's default search (``bench/mcts_batch.py``: ministep:32, budget 1024, k = 3, seed 1)
over the same P MGSM-en problems; the runs alternate (forward, fast, forward, fast ...) so load changes on the
shared cores hit both. The fast step does the model's operations in the model's order and dtype, so in
float32 the two runs generate the same tokens: the benchmark checks that and says so. In bfloat16 they may
part at a near-tie: the fast step's attention reads a request's shared prompt once, in softmax blocks split at
the prompt's end, and its sums round to bfloat16 a step apart now and then (``tests/test_decode_step.py``).

Last line: ``fast_decode_vs_forward`` (median of the per-round ratios of tokens/s).

Usage: python bench/fast_decode.py [--problems 32] [--budget 1024] [--rounds 1] [--threads all CPUs] [--dtype auto]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from marco.llm import load_backend  # noqa: E402
from marco.llm.hf import HFBackend  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402
from bench.mcts_batch import dataset_name, mcts_batch  # noqa: E402


def run(backend: HFBackend, fast: bool, problems: int, budget: int) -> tuple[int, float, int, list[str]]:
    """Tokens, seconds, decode steps and the final answers of one MCTS run."""
    backend.fast_decode = fast
    if backend.prefix_cache is not None:
        backend.prefix_cache.clear()  # each run starts cold, as a new batch would
    task, loaded, config = mcts_batch(problems, budget)
    steps, fast_before = backend.decode_steps, backend.fast_steps
    driver = LockstepDriver(backend, task, config)
    t = time.perf_counter()
    results = driver.run(loaded)
    seconds = time.perf_counter() - t
    if fast != (backend.fast_steps > fast_before):
        raise RuntimeError(f"fast={fast} but {backend.fast_steps - fast_before} fast steps ran")
    return driver.stats.generated_tokens, seconds, backend.decode_steps - steps, [str(r.answer) for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="forward/fast pairs")
    ap.add_argument("--budget", type=int, default=1024, help="tokens per search (the CLI default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default=None, help="auto|float32|bfloat16 (default: $MARCO_DTYPE, else auto)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    backend = load_backend("smollm2", dtype=args.dtype)
    assert isinstance(backend, HFBackend)
    if backend.fast_decoder() is None:
        sys.exit("the fast decode step does not apply here (see marco.llm.decode_step.unsupported)")
    load = os.getloadavg()[0]
    print(f"{args.problems} {dataset_name()} problems · mcts ministep:32 k=3 budget {args.budget} · SmolLM2-135M "
          f"({backend.kv_spec.dtype}) · {args.threads} threads · load {load:.1f}")
    print(f"{'round':<7}{'decode step':<14}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'steps':>7}{'ms/step':>9}")
    ratios, same = [], True
    for r in range(args.rounds):
        tps = {}
        answers = {}
        for fast in (False, True):
            tokens, seconds, steps, answers[fast] = run(backend, fast, args.problems, args.budget)
            tps[fast] = tokens / seconds
            name = "fast" if fast else "forward"
            print(f"{r:<7}{name:<14}{tokens:>8}{seconds:>9.1f}{tps[fast]:>10.1f}{steps:>7}"
                  f"{1000 * seconds / max(steps, 1):>9.1f}")
        same = same and answers[False] == answers[True]
        ratios.append(tps[True] / tps[False])
    print(f"same answers on every problem: {same} · load {os.getloadavg()[0]:.1f}")
    print(f"fast_decode_vs_forward: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
