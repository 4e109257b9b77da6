"""The product's default MCTS batch, the one the throughput benchmarks time: MGSM-en problems (the demo set
where no data is installed), ``mcts`` with ``ministep:32`` actions, k children, seed 1."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from marco.search.base import SearchConfig
from marco.tasks import default_data_dir, get_task


def mcts_batch(problems: int, budget: int = 1024, rollout: int = 384, children: int = 3) -> tuple[Any, list[Any], SearchConfig]:
    """``(task, problems, config)``: the first ``problems`` MGSM-en problems and the search config."""
    data = default_data_dir()
    task = get_task("mgsm" if data else "demo")
    loaded = task.load(data, ["en"], problems) if data else task.load(None, None, problems)
    config = SearchConfig(strategy="mcts", action="ministep:32", budget=budget, children=children,
                          max_answer_tokens=rollout, seed=1)
    return task, loaded, config


def dataset_name() -> str:
    """``mgsm``, or ``demo`` where no data is installed (for the benchmarks' headers)."""
    return "mgsm" if default_data_dir() else "demo"


def side_by_side_setup(
    doc: str, rounds: int, rounds_help: str, dtype: str | None = None,
) -> tuple[argparse.Namespace, Any, list[Any], SearchConfig, Any]:
    """For a benchmark that runs the MCTS batch one way and another in alternation, in one process: its options
    (--problems --rounds --budget --threads), the batch and the bundled model loaded and warmed up:
    ``(args, task, problems, config, backend)``."""
    import torch

    from marco.llm import load_backend
    from marco.llm.base import GenerationRequest

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=64, help="problems searched in lockstep (marco run's --chunk)")
    ap.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    ap.add_argument("--budget", type=int, default=1024, help="tokens per search (the CLI default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task, problems, config = mcts_batch(args.problems, args.budget)
    backend = load_backend("smollm2", dtype=dtype)
    backend.generate([GenerationRequest(backend.encode("Hello"), 4)])
    return args, task, problems, config, backend


def timed_into(spent: dict[str, Any], key: str, fn: Any) -> Any:
    """``fn``, adding the seconds each call takes to ``spent[key]``."""
    def run(*a: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*a)
        finally:
            spent[key] += time.perf_counter() - t
    return run


def search_from_cold(backend: Any, task: Any, problems: list[Any], config: SearchConfig) -> tuple[int, float, int]:
    """One run of the batch on ``backend`` from an empty prefix cache: ``(tokens, seconds, decode steps)``."""
    from marco.search.driver import LockstepDriver

    if backend.prefix_cache is not None:
        backend.prefix_cache.clear()
    steps = backend.decode_steps
    driver = LockstepDriver(backend, task, config)
    t = time.perf_counter()
    driver.run(problems)
    return driver.stats.generated_tokens, time.perf_counter() - t, backend.decode_steps - steps


def alternate_searches(
    hf: Any, task: Any, problems: list[Any], config: SearchConfig, steps: dict[str, Any], rounds: int,
    spent: dict[str, float], key: str, what: str,
) -> dict[str, list[tuple[float, float, int]]]:
    """The batch from cold with each of ``steps`` (label -> the decode step for ``hf.fast_decoder()`` to return)
    in turn, ``rounds`` times (the machine's speed drifts between runs): label -> [(tokens/s, ms of
    ``spent[key]`` a fast step, tokens)]. Prints each run as ``label N tokens in S s = T tokens/s · what M ms
    a step · load L``."""
    results: dict[str, list[tuple[float, float, int]]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            hf._fast = step
            spent[key] = 0.0
            fast = hf.fast_steps
            tokens, wall, _ = search_from_cold(hf, task, problems, config)
            ms = 1000 * spent[key] / max(1, hf.fast_steps - fast)
            results[label].append((tokens / wall, ms, tokens))
            print(f"{label:<7} {tokens} tokens in {wall:6.1f} s = {tokens / wall:6.1f} tokens/s · {what} "
                  f"{ms:5.1f} ms a step · load {os.getloadavg()[0]:.1f}", flush=True)
    return results


def pair_ratios(
    results: dict[str, list[tuple[float, float, int]]], base: str, new: str,
) -> tuple[list[float], list[float], str]:
    """From :func:`alternate_searches`' results, per round: tokens/s ``new / base``, ms a step ``base / new``,
    and the runs' token counts as one line's text."""
    speed = [n[0] / b[0] for b, n in zip(results[base], results[new])]
    step = [b[1] / n[1] for b, n in zip(results[base], results[new])]
    tokens = ", ".join(f"{label} {r[2]}" for label, rs in results.items() for r in rs)
    return speed, step, tokens
