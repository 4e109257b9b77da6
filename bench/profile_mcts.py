"""Where an MCTS batch's time goes on the transformers backend: the model's arithmetic or the rest.

Runs the product's default search (ministep:32, budget 1024, rollouts up to 384, k = 3) on P MGSM-en
problems with timers on the model's modules (forward hooks: each linear layer, the LM head, each
attention block) and on the backend's generate calls, and prints the share of wall time in:

- the LM head (576 x 49152) and the other linear layers (q, k, v, o, gate, up, down),
- attention itself (the attention block minus its four projections: RoPE, the KV cache write, SDPA),
- the rest of the model's forward (embeddings, RMSNorm, SiLU, residual adds, mask building),
- the decode loop outside the forward (log-softmax, top-5, sampling, the row loop, stop checks, prefill
  layout and the KV copies into slots), and
- the search outside generation (tree, prompts, tokenizer, values).

No ``torch.profiler``: recording every operator of a whole search takes gigabytes and slows it several
times over. The hooks cost microseconds per module call.

Module hooks send the decode steps through the model's forward (``marco.llm.decode_step`` runs no module,
and steps aside for a hooked model), so this split is the forward path's. ``--fast`` profiles the product's
path instead: the fast decode steps timed whole, the prefills, the decode loop around them and the search.

Usage: python bench/profile_mcts.py [--problems 4] [--threads 2] [--budget 1024] [--fast]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from marco.llm import load_backend  # noqa: E402
from marco.llm.base import GenerationRequest  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402
from bench.mcts_batch import mcts_batch  # noqa: E402


class Timers:
    """Seconds per label, from forward pre/post hooks (modules do not nest within one label)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._start: dict[int, float] = {}
        self.phase = "decode"  # "prefill" while the model runs more than one position per row


    def attach(self, module: torch.nn.Module, label: str) -> None:
        def pre(mod: Any, _args: Any) -> None:
            self._start[id(mod)] = time.perf_counter()

        def post(mod: Any, _args: Any, _out: Any) -> None:
            took = time.perf_counter() - self._start.pop(id(mod))
            self.seconds[label] += took
            self.seconds[f"{label} {self.phase}"] += took
            self.calls[label] += 1
            self.calls[f"{label} {self.phase}"] += 1

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def instrument(hf: Any) -> Timers:
    timers = Timers()
    model = hf.model

    def phase(_mod: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids")
        timers.phase = "prefill" if ids is not None and ids.shape[1] > 1 else "decode"

    model.register_forward_pre_hook(phase, with_kwargs=True)
    timers.attach(model, "forward")
    timers.attach(model.lm_head, "lm_head")
    for layer in model.model.layers:
        timers.attach(layer.self_attn, "attention block")
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                timers.attach(mod, "attn linear" if name.startswith("self_attn") else "mlp linear")
    return timers


def run_search(hf: Any, task: Any, problems: list[Any], config: Any) -> tuple[int, float]:
    """Tokens generated and wall seconds of one lockstep MCTS run."""
    driver = LockstepDriver(hf, task, config)
    t = time.perf_counter()
    driver.run(problems)
    return driver.stats.generated_tokens, time.perf_counter() - t


def profile_fast(hf: Any, task: Any, problems: list[Any], config: Any, gen_time: list[float], threads: int) -> None:
    """The product's path: fast decode steps, prefills, the loop around them, the search."""
    from marco.llm.decode_step import LlamaDecode

    if hf.fast_decoder() is None:
        raise SystemExit("the fast decode step does not apply to this model here")
    spent: dict[str, float] = defaultdict(float)
    fast, prefill = hf.fast_decoder(), hf._prefill

    def timed(label: str, fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - t0
        return run

    # inside the fast step: the callables it reads from its attributes at each call
    plain_linear = fast.linear

    def linear(x: Any, w: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return plain_linear(x, w)
        finally:
            spent["LM head" if w is fast.lm_head else "projections"] += time.perf_counter() - t0

    fast.linear = linear
    if fast._add is not None:  # the o and down products with their residual adds (float32 panels)
        fast._add = timed("projections", fast._add)
    fast._attend = timed("attention kernel", fast._attend)
    if fast._attend_shared is not None:
        fast._attend_shared = timed("attention kernel", fast._attend_shared)
    fast._norm = timed("norms", fast._norm)
    for name in ("_write", "_rope", "_rope_write"):  # apart, or fused into one op
        if getattr(fast, name) is not None:
            setattr(fast, name, timed("rotary and column writes", getattr(fast, name)))
    hf._fast = timed("fast", fast)  # the backend calls whatever fast_decoder() returns
    hf.fast_decoder = lambda: hf._fast
    hf._prefill = timed("prefill", prefill)
    hf.decoded_rows = hf.attended_tokens = hf.decode_steps = 0
    tokens, wall = run_search(hf, task, problems, config)
    steps = max(1, hf.decode_steps)
    print(f"{len(problems)} problems · {tokens} tokens in {wall:.1f}s = {tokens / wall:.1f} tokens/s · "
          f"{hf.decoded_rows / steps:.1f} rows per step · mean context {hf.attended_tokens / max(1, hf.decoded_rows):.0f}"
          f" · {threads} threads · load {os.getloadavg()[0]:.1f} · weights {fast.weights}")
    inside = ("projections", "LM head", "attention kernel", "norms", "rotary and column writes")
    rest = spent["fast"] - sum(spent[k] for k in inside)
    for label, sec in (("fast decode steps", spent["fast"]),
                       *((f"  {k}", spent[k]) for k in inside),
                       ("  the rest (residuals, SiLU, embedding)", rest),
                       ("prefill forwards", spent["prefill"]),
                       ("decode loop outside the forwards", gen_time[0] - spent["fast"] - spent["prefill"]),
                       ("search outside generation", wall - gen_time[0])):
        print(f"  {label:<46}{sec:8.1f}s {sec / wall:7.1%}  {1000 * sec / steps:6.1f} ms/step")
    print(f"model_forward_share: {(spent['fast'] + spent['prefill']) / wall:.3f}")
    assert isinstance(fast, LlamaDecode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--rollout", type=int, default=384)
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--fast", action="store_true", help="time the fast decode step whole (no module hooks)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    task, problems, config = mcts_batch(args.problems, args.budget, args.rollout, args.children)
    hf = load_backend("smollm2")
    hf.generate([GenerationRequest(hf.encode("Hello"), 4)])
    gen_time = [0.0]
    for name in ("generate", "generate_continuous"):
        inner = getattr(hf, name)

        def timed(*a: Any, _inner: Any = inner, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                gen_time[0] += time.perf_counter() - t0

        setattr(hf, name, timed)
    if args.fast:
        profile_fast(hf, task, problems, config, gen_time, args.threads)
        return
    timers = instrument(hf)
    hf.decoded_rows = hf.attended_tokens = hf.attention_columns = 0
    tokens, wall = run_search(hf, task, problems, config)
    s = timers.seconds
    linear = s["attn linear"] + s["mlp linear"]
    attention = s["attention block"] - s["attn linear"]
    rest_model = s["forward"] - linear - attention - s["lm_head"]
    loop = gen_time[0] - s["forward"]
    search = wall - gen_time[0]
    print(f"{len(problems)} problems · {tokens} tokens in {wall:.1f}s = {tokens / wall:.1f} tokens/s · "
          f"{hf.peak_rows} rows at most, {hf.decoded_rows / max(1, timers.calls['forward']):.1f} per forward · "
          f"mean context {hf.attended_tokens / max(1, hf.decoded_rows):.0f} "
          f"(attention read {hf.attention_columns / max(1, hf.decoded_rows):.0f} columns) · {args.threads} threads · "
          f"load {os.getloadavg()[0]:.1f}")
    for label, sec in (("LM head", s["lm_head"]), ("linear layers", linear), ("attention", attention),
                       ("rest of the forward", rest_model), ("decode loop outside the forward", loop),
                       ("search outside generation", search)):
        print(f"  {label:<34}{sec:8.1f}s {sec / wall:7.1%}")
    for ph in ("prefill", "decode"):
        lin = s[f"attn linear {ph}"] + s[f"mlp linear {ph}"]
        print(f"  {ph}: {timers.calls[f'forward {ph}']} forwards, {s[f'forward {ph}']:.1f}s: linear layers "
              f"{lin:.1f}s, LM head {s[f'lm_head {ph}']:.1f}s, attention {s[f'attention block {ph}'] - s[f'attn linear {ph}']:.1f}s")
    print(f"model_forward_share: {s['forward'] / wall:.3f}")


if __name__ == "__main__":
    main()
