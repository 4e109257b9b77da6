"""The product's MCTS batch with the decode step's small ops fused against apart, side by side in one process.

On packed weights the decode step rotates the queries and keys and writes the keys and values into their slots
in one op (``rotary_write``, four ops a layer otherwise); it also adds the residual inside the o and down
products (``linear_panels_add``: each tile's block added while it is in cache) and computes the MLP's
``silu(gate) * up`` in one pass (``silu_mul``), four more ops a layer that each wrote a temporary. At SmolLM2's
30 layers that is about 180 fewer ops a step. Each is equal to the bit to the ops it replaces (float32 and
bfloat16), so the two runs generate the same tokens. The model runs in the dtype the product picks for this CPU
(``auto``: bfloat16 where it has AVX512-BF16 or AMX). This runs the same search each way in alternation (the machine's speed drifts between
runs), from an empty prefix cache each time, and prints tokens/s and the time a fast step took. First it times
the decode step alone both ways, alternating, at the search's mean width (58 rows, 323 columns of context, random
keys and values): a steadier measure than whole searches on a machine whose speed drifts.

Last lines: ``step_apart_vs_fused: X`` (the step alone, median time apart / fused) and ``fused_vs_apart: X``
(the search's tokens/s fused / apart, mean over rounds).

Usage: python bench/fused_ops.py [--problems 64] [--rounds 1] [--budget 1024] [--threads 2]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mcts_batch import alternate_searches, pair_ratios, side_by_side_setup, timed_into  # noqa: E402
from marco.llm.decode_step import LlamaDecode  # noqa: E402


def main() -> None:
    args, task, problems, config, hf = side_by_side_setup(__doc__, 1, "apart/fused pairs")
    if hf.fast_decoder() is None:
        raise SystemExit("the fast decode step does not apply here (no native kernels)")
    decoders = {"apart": LlamaDecode(hf.model, fuse=False), "fused": LlamaDecode(hf.model)}
    if decoders["fused"]._silu_mul is None:
        raise SystemExit("nothing to fuse here: the weights are not packed (see marco.llm.decode_step.weight_format)")
    step_ratio = time_steps(hf.model, decoders)
    spent = {"step": 0.0}
    steps = {label: timed_into(spent, "step", d) for label, d in decoders.items()}
    results = alternate_searches(hf, task, problems, config, steps, args.rounds, spent, "step", "decode")
    ratios, step_ratios, tokens = pair_ratios(results, "apart", "fused")
    print(f"{args.problems} problems · {args.threads} threads · {str(hf.model.dtype).removeprefix('torch.')} · weights {decoders['fused'].weights} · "
          f"tokens: {tokens}")
    print(f"fast step apart/fused per round: {', '.join(f'{a:.3f}' for a in step_ratios)}")
    print(f"step_apart_vs_fused: {step_ratio:.3f}")
    print(f"fused_vs_apart: {sum(ratios) / len(ratios):.3f} ({', '.join(f'{r:.3f}' for r in ratios)})")


def time_steps(model: torch.nn.Module, decoders: dict[str, LlamaDecode], rows: int = 58, context: int = 323,
               rounds: int = 12, steps: int = 4) -> float:
    """The decode step alone at ``rows`` rows of ``context`` columns, each way in alternation: prints the median
    ms a step of each and returns apart / fused."""
    config = model.config
    g = torch.Generator().manual_seed(0)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    shape = (rows, kv_heads, context + 8, dim)
    slots = SimpleNamespace(keys=[torch.randn(shape, generator=g).to(model.dtype) for _ in range(config.num_hidden_layers)],
                            values=[torch.randn(shape, generator=g).to(model.dtype) for _ in range(config.num_hidden_layers)])
    tokens = torch.randint(0, config.vocab_size, (rows,), generator=g)
    positions = torch.full((rows,), context, dtype=torch.long)
    times: dict[str, list[float]] = {label: [] for label in decoders}
    outputs = {label: d(tokens, positions, slots) for label, d in decoders.items()}  # warm-up
    same = torch.equal(outputs["apart"], outputs["fused"])
    for _ in range(rounds):
        for label, d in decoders.items():
            t = time.perf_counter()
            for _ in range(steps):
                d(tokens, positions, slots)
            times[label].append((time.perf_counter() - t) / steps)
    ms = {label: 1000 * statistics.median(v) for label, v in times.items()}
    print(f"the step alone at {rows} rows, {context} columns: apart {ms['apart']:.1f} ms, fused {ms['fused']:.1f} ms "
          f"(median of {rounds}) · the same logits: {same} · load {os.getloadavg()[0]:.1f}", flush=True)
    return ms["apart"] / ms["fused"]


if __name__ == "__main__":
    main()
