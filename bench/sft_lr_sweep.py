"""Which learning rate moves SmolLM2-135M in a short SFT run: eval loss before/after at several rates.

Each rate trains from the same base on the same chats for the same steps (warm-up ratio and cosine decay
as the defaults), with the same held-out validation split; the table shows the validation loss before
and after, and the last training losses. Used to pick the 135M row of the defaults table
(docs/architecture.md, "SFT defaults").

    PYTHONPATH=. .venv/bin/python bench/sft_lr_sweep.py CHATS.jsonl [--lrs 1e-5,1e-4,3e-4] [--steps 25]

``--old`` adds the previous defaults (1e-5, linear, no warm-up) as a row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marco.sft import SFTConfig, run_sft  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="chats (.jsonl / datasets dir / .parquet)")
    parser.add_argument("--lrs", default="1e-5,1e-4,3e-4")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--eval-fraction", type=float, default=0.05)
    parser.add_argument("--old", action="store_true", help="also run the old defaults (1e-5, linear, no warm-up)")
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    runs = [(float(lr), "cosine", 0.1) for lr in args.lrs.split(",")]
    if args.old:
        runs.insert(0, (1e-5, "linear", 0.0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (lr, sched, warm) in enumerate(runs):
            config = SFTConfig(
                data=args.data, output_dir=str(Path(tmp) / f"r{i}"), max_steps=args.steps, learning_rate=lr,
                lr_scheduler=sched, warmup_ratio=warm, batch_size=args.batch_size, max_length=args.max_length,
                eval_fraction=args.eval_fraction,
            )  # fmt: skip
            m = run_sft(config).metrics
            row = {"lr": lr, "scheduler": sched, "warmup_ratio": warm, "eval_before": m["eval_loss_start"],
                   "eval_after": m["eval_loss"], "tokens_per_s": m["tokens_per_s"], "steps": m["steps"], "eval_examples": m["eval_examples"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"steps={args.steps} batch={args.batch_size} max_length={args.max_length} data={args.data}")
    print(f"{'lr':>8} {'sched':>7} {'warmup':>6} {'eval before':>11} {'eval after':>10} {'tokens/s':>8}")
    for r in rows:
        print(f"{r['lr']:>8.0e} {r['scheduler']:>7} {r['warmup_ratio']:>6} {r['eval_before']:>11.4f} "
              f"{r['eval_after']:>10.4f} {r['tokens_per_s']:>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
