"""The transformers decode loop before and after the sampler fix, side by side in one process.

Issue 16's profile of a 64-row batch at the search's sampling settings (temperature 0.7, top-p 0.95) found a
full sort of the 49k-token vocabulary in ~30% of the decode time: every row whose top 256 tokens hold less
than top-p of the mass was sorted whole. The fix looks in the top 4096 first (``HFBackend.SAMPLE_CANDIDATES``)
and gives the same draws. Both samplers run here on the same loaded model, alternating before, after, before,
after ... so load changes on the shared cores hit both; each run is P x k rows of ``--tokens`` new tokens
(a ministep is 32), no stops, prompts already in the prefix cache (a warm-up run puts them there), as in
a search's expansion round. Model time (the forward calls) and the rest (sampling, top-5, bookkeeping) are
timed apart.

Last lines: ``decode_tokens_per_s_after_vs_before`` (median of the per-round ratios) and
``non_model_share_before`` / ``non_model_share_after`` (the part of a run's time outside the model's forward).

Usage: python bench/decode_before_after.py [--problems 21] [--children 3] [--tokens 32] [--rounds 2] [--threads 1]
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
from marco.llm.base import GenerationRequest  # noqa: E402
from marco.llm.hf import HFBackend  # noqa: E402
from marco.search.base import SearchConfig  # noqa: E402
from marco.tasks import default_data_dir, get_task  # noqa: E402

BEFORE = (256, 1 << 62)  # the former sampler: the top 256, else a full sort


class TimedModel:
    """The model with its forward calls timed (everything else passes through)."""

    def __init__(self, model: Any) -> None:
        self.inner = model
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds += time.perf_counter() - t
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def run(backend: HFBackend, requests: list[GenerationRequest], candidates: tuple[int, ...]) -> tuple[float, float]:
    """(tokens per second, share of the time outside the model) of one batched generation."""
    backend.SAMPLE_CANDIDATES = candidates
    timed: TimedModel = backend.model  # type: ignore[assignment]
    timed.seconds = 0.0
    t = time.perf_counter()
    out = backend.generate(requests)
    secs = time.perf_counter() - t
    tokens = sum(g.num_tokens for gs in out for g in gs)
    return tokens / secs, 1.0 - timed.seconds / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=21, help="MGSM-en problems; x children rows (64 at most run at once)")
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per row (a ministep)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default=None, help="auto|float32|bfloat16 (default: $MARCO_DTYPE, else auto)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = SearchConfig()
    data = default_data_dir()
    task = get_task("mgsm" if data else "demo")
    problems = task.load(data, ["en"], args.problems) if data else task.load(None, None, args.problems)
    backend = load_backend("smollm2", dtype=args.dtype)
    assert isinstance(backend, HFBackend)
    backend.model = TimedModel(backend.model)  # type: ignore[assignment]
    prompts = [backend.apply_chat_template(task.messages(p), "<Thought>\n") for p in problems]

    def requests(seed: int) -> list[GenerationRequest]:
        return [GenerationRequest(p, args.tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=args.children,
                                  seed=seed * 1000 + i, ignore_eos=True) for i, p in enumerate(prompts)]

    backend.generate([GenerationRequest(p, 2) for p in prompts])  # warm-up: the prompts enter the prefix cache
    print(f"{len(prompts)} x {args.children} rows, {args.tokens} tokens each, temperature {cfg.temperature}, "
          f"top-p {cfg.top_p}, {backend.kv_spec.dtype}, {args.threads} threads")
    print(f"{'round':<7}{'before tok/s':>14}{'after tok/s':>13}{'after/before':>14}"
          f"{'non-model before':>18}{'non-model after':>17}{'load':>7}")
    ratios: list[float] = []
    shares: dict[str, list[float]] = {"before": [], "after": []}
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        b, sb = run(backend, requests(r), BEFORE)
        a, sa = run(backend, requests(r), HFBackend.SAMPLE_CANDIDATES)
        ratios.append(a / b)
        shares["before"].append(sb)
        shares["after"].append(sa)
        print(f"{r + 1:<7}{b:>14.1f}{a:>13.1f}{a / b:>14.3f}{sb:>18.1%}{sa:>17.1%}{load:>7.1f}", flush=True)
    print(f"non_model_share_before: {statistics.median(shares['before']):.3f}")
    print(f"non_model_share_after: {statistics.median(shares['after']):.3f}")
    print(f"decode_tokens_per_s_after_vs_before: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
