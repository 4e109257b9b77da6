"""Training tokens/s of the SFT path (TRL SFTTrainer, as ``marco sft`` runs it) against a bare PyTorch loop.

Both train the same model on the same batches (the trainer's own dataloader over MGSM exemplars in
Marco-o1's format, loss on assistant tokens only), with the same optimizer (AdamW, clipping at 1.0) and
number of steps, in one process (nproc 1); the bench checks that both saw the same batch shapes. Throughput counts non-padding input tokens per second over the
steps after the warm-up ones. Runs alternate (bare, sft, sft, bare, …) so drift in machine load hits both;
each path's best run is compared.

    PYTHONPATH=. .venv/bin/python bench/sft_throughput.py [--steps 5] [--batch-size 8] [--max-length 192]

Three paths: ``bare``, ``sft`` (the product's: on a CPU, :mod:`marco.sft.lm_head`'s compact loss head) and
``sft-trl`` (TRL's own fused head, ``compact_lm_head=False``). Last lines: ``compact_vs_trl_head: X`` and
``sft_vs_bare_throughput: X`` (SFT tokens/s ÷ bare tokens/s; target ≥ 0.8).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from marco.data import CotExample, chat, format_answer, write_jsonl  # noqa: E402
from marco.sft.base_model import resolve_base  # noqa: E402
from marco.sft.config import SFTConfig  # noqa: E402


def data_dir() -> Path:
    from marco.tasks import default_data_dir

    return Path(default_data_dir())  # $MARCO_DATA_DIR, else the MGSM shipped with marco


def mgsm_examples() -> list[CotExample]:
    """Every MGSM exemplar (8 per language) as a CoT example: the worked solution is the thought."""
    import json
    import re

    answers = json.loads((data_dir() / "mgsm" / "exemplars.json").read_text())["EXEMPLAR_NUMBER_ANSWERS"]
    out = []
    for path in sorted((data_dir() / "mgsm").glob("mgsm_exemplars_*.tsv")):
        lang = path.stem.rsplit("_", 1)[-1]
        with path.open(encoding="utf-8") as f:
            for i, (question, solution) in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
                # Drop the "Question:" / "Step-by-Step Answer:" labels (full-width colon in Chinese/Japanese).
                question = re.split(r"[:：]", question, maxsplit=1)[-1].strip()
                solution = re.split(r"[:：]", solution, maxsplit=1)[-1].strip()
                answer = str(answers[i % len(answers)])
                out.append(
                    CotExample(f"{lang}-{i}", chat(question, format_answer(solution, answer)), "bench", lang)
                )
    if not out:
        raise SystemExit(f"no MGSM exemplars under {data_dir()}; set MARCO_DATA_DIR")
    return out


def throughput(step_ends: list[float], step_tokens: list[int], warmup: int) -> tuple[int, float]:
    """Tokens and seconds of the steps after ``warmup`` (the clock starts when the last warm-up step ends)."""
    tokens = sum(step_tokens[warmup:])
    return tokens, step_ends[-1] - step_ends[warmup - 1]


def _record_shapes(model: torch.nn.Module, shapes: list[tuple[int, ...]]) -> Any:
    """Record the ``input_ids`` shape of every training forward (grad enabled) of ``model``."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if torch.is_grad_enabled() and ids is not None:
            shapes.append(tuple(ids.shape))

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def run_sft_path(config: SFTConfig, warmup: int) -> tuple[int, float, list[tuple[int, ...]]]:
    from marco.sft.train import _StepClock, build_trainer

    clock = _StepClock()
    trainer, _ = build_trainer(config, callbacks=[clock])
    shapes: list[tuple[int, ...]] = []
    _record_shapes(trainer.model, shapes)
    trainer.train()
    cumulative = [int(h["num_tokens"]) for h in trainer.state.log_history if "loss" in h]
    step_tokens = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative)]
    return (*throughput(clock.step_ends, step_tokens, warmup), shapes)


def run_bare_loop(config: SFTConfig, warmup: int) -> tuple[int, float, list[tuple[int, ...]]]:
    """A hand-written loop over the very batches the SFT path trains on (the trainer's own dataloader: same
    order, padding and masked labels), the model's plain forward and loss, AdamW, gradient clipping. Feeding
    both paths the same batches matters: MGSM's exemplars range from short English to long Thai, and with
    pad-to-longest batches a different order changes the padding, and so the tokens/s, by tens of percent."""
    from transformers import set_seed

    from marco.sft.train import build_trainer

    set_seed(config.seed)
    trainer, _ = build_trainer(config)
    model = trainer.model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    batches = trainer.get_train_dataloader()
    step_ends: list[float] = []
    step_tokens: list[int] = []
    shapes: list[tuple[int, ...]] = []
    _record_shapes(model, shapes)
    step = 0
    while step < config.max_steps:
        for batch in batches:
            if step == config.max_steps:
                break
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_ends.append(time.perf_counter())
            step_tokens.append(int(batch["attention_mask"].sum()))
            step += 1
    return (*throughput(step_ends, step_tokens, warmup), shapes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=SFTConfig.batch_size)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each path (alternating order)")
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps:
        raise SystemExit("need 1 <= --warmup < --steps")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mgsm_cot.jsonl"
        write_jsonl(mgsm_examples(), data)
        # The SFT path at the defaults (learning rate, warm-up + cosine schedule, validation split held out);
        # the bare loop trains every example at the same learning rate, so its tokens/s is an upper bound.
        config = SFTConfig(
            data=str(data), base=args.base, output_dir=str(Path(tmp) / "out"), max_steps=args.steps,
            batch_size=args.batch_size, max_length=args.max_length,
        )  # fmt: skip
        config.base_path = resolve_base(config.base)
        # sft: the product's path (on a CPU, marco.sft.lm_head's compact loss head); sft-trl: TRL's own head
        paths = ("bare", "sft", "sft-trl")
        runs: dict[str, list[tuple[int, float]]] = {p: [] for p in paths}
        shapes: dict[str, list[list[tuple[int, ...]]]] = {p: [] for p in paths}
        for i in range(args.repeats):
            for path in paths if i % 2 == 0 else paths[::-1]:
                fn = run_bare_loop if path == "bare" else run_sft_path
                cfg = replace(config, compact_lm_head=path != "sft-trl")
                tokens, seconds, seen = fn(cfg, args.warmup)
                runs[path].append((tokens, seconds))
                shapes[path].append(seen)

    print(f"threads={torch.get_num_threads()} steps={args.steps} warmup={args.warmup} "
          f"batch={args.batch_size} max_length={args.max_length} base={args.base}")  # fmt: skip
    print(f"{'path':<8} {'run':>3} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    best: dict[str, float] = {}
    for path, results in runs.items():
        for i, (tokens, seconds) in enumerate(results):
            print(f"{path:<8} {i:>3} {tokens:>7} {seconds:>8.2f} {tokens / seconds:>9.1f}")
        best[path] = max(t / s for t, s in results)
    same = all(seen == shapes["sft"][0] for p in paths for seen in shapes[p])
    print(f"batch shapes: {shapes['sft'][0]}; the same batches in every run: {'yes' if same else 'NO'}")
    print(f"compact_vs_trl_head: {best['sft'] / best['sft-trl']:.3f}")
    print(f"sft_vs_bare_throughput: {best['sft'] / best['bare']:.3f}")


if __name__ == "__main__":
    main()
