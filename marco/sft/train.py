"""The SFT entry point one process runs: ``python -m marco.sft.train --config CONFIG.json``.

Under ``torchrun`` every rank runs this; the Trainer's distributed sampler gives each rank its own shard of
the data (gloo on CPU, NCCL on GPUs) and rank 0 writes the outputs into ``output_dir``:

- the checkpoint itself (model + tokenizer, safetensors; LoRA adapters merged in, the adapter also kept
  under ``adapter/``), so ``AutoModelForCausalLM.from_pretrained(output_dir)`` loads it;
- ``losses.json`` (loss per optimizer step), ``metrics.json`` and ``result.json`` (an :class:`SFTResult`).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from marco.sft.config import SFTConfig, SFTResult


def _use_cuda(config: SFTConfig) -> bool:
    return config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())


class _StepClock(TrainerCallback):
    """Records when training began and when each optimizer step ended (throughput without warm-up)."""

    def __init__(self) -> None:
        self.begin = 0.0
        self.end = 0.0
        self.step_ends: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.begin = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.step_ends.append(time.perf_counter())

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.end = time.perf_counter()


def build_trainer(config: SFTConfig, callbacks: list[Any] | None = None) -> tuple[Any, Any]:
    """A ready ``trl.SFTTrainer`` and its tokenizer (model loaded, data tokenized with assistant masks)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from marco.sft.base_model import resolve_base
    from marco.sft.data import split_and_mix
    from marco.sft.masking import tokenize_chats

    cuda = _use_cuda(config)
    base = config.base_path or resolve_base(config.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    names = ", ".join(s["path"] for s in config.mix)
    train_chats, eval_chats, mix = split_and_mix(config.mix, config.eval_fraction, config.seed)
    columns = tokenize_chats(tokenizer, train_chats, config.max_length)
    if not columns["input_ids"]:
        raise ValueError(f"{names}: no example keeps an assistant token within max_length={config.max_length}")
    dataset = Dataset.from_dict(columns)
    eval_dataset = None
    if eval_chats:
        eval_columns = tokenize_chats(tokenizer, eval_chats, config.max_length)
        eval_dataset = Dataset.from_dict(eval_columns) if eval_columns["input_ids"] else None

    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)

    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )

    args = TRLConfig(
        output_dir=str(Path(config.output_dir) / "trainer"),
        max_steps=config.max_steps if config.max_steps is not None else -1,
        num_train_epochs=config.train_epochs or 1.0,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        **_warmup(config),
        weight_decay=config.weight_decay,
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.max_length,
        # Loss on assistant tokens comes from our `assistant_masks`, not TRL's template-based masking.
        assistant_only_loss=False,
        packing=False,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        use_cpu=not cuda,
        # Only under torchrun: a backend in a lone process makes accelerate expect a process group.
        ddp_backend=("nccl" if cuda else "gloo") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        logging_steps=1,
        eval_strategy="steps" if eval_dataset is not None and config.eval_every > 0 else "no",
        eval_steps=config.eval_every or None,
        per_device_eval_batch_size=config.batch_size,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.marco_mix = mix  # per-source counts, reported in the result's metrics
    if not cuda and config.compact_lm_head:
        from marco.sft.lm_head import add_compact_lm_head

        add_compact_lm_head(trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model)
    return trainer, tokenizer


def _warmup(config: SFTConfig) -> dict[str, Any]:
    """Warm-up as this transformers takes it: ``warmup_steps`` (a float < 1 is a ratio since v5), or the
    older ``warmup_ratio`` argument."""
    from transformers import TrainingArguments

    if config.warmup_steps > 0:
        return {"warmup_steps": config.warmup_steps}
    if "warmup_ratio" in TrainingArguments.__dataclass_fields__:
        return {"warmup_ratio": config.warmup_ratio}
    return {"warmup_steps": config.warmup_ratio}


def _save(trainer: Any, tokenizer: Any, config: SFTConfig) -> None:
    out = Path(config.output_dir)
    model = trainer.model
    if config.lora:
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


class _Check(TrainerCallback):
    """Calls ``check()`` after every optimizer step; it raises to stop the run (a job that lost its lease)."""

    def __init__(self, check: Callable[[], None]) -> None:
        self.check = check

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.check()


def train(config: SFTConfig, check: Callable[[], None] | None = None) -> SFTResult:
    """Train in this process (one rank of a torchrun launch, or the only process); every rank returns the
    same result, rank 0 writes it. ``check`` runs after every step and may raise to stop."""
    clock = _StepClock()
    trainer, tokenizer = build_trainer(config, callbacks=[clock] + ([_Check(check)] if check else []))
    # Validation loss before and after training (outside the step clock, so tokens/s stays training's).
    start_eval = trainer.evaluate() if trainer.eval_dataset is not None else {}
    output = trainer.train()
    final_eval = trainer.evaluate() if trainer.eval_dataset is not None else {}

    history = trainer.state.log_history
    evals = [(int(h["step"]), float(h["eval_loss"])) for h in history if "eval_loss" in h]
    steps = [h for h in history if "loss" in h and "step" in h and "eval_loss" not in h]
    losses = [float(h["loss"]) for h in steps]
    # TRL logs `num_tokens` cumulatively: non-padding input tokens over every rank.
    cumulative = [int(h.get("num_tokens", 0)) for h in steps]
    step_tokens = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative)]
    elapsed = max(clock.end - clock.begin, 1e-9)
    total_tokens = cumulative[-1] if cumulative else 0
    metrics = {
        "train_loss": float(output.training_loss),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "steps": int(trainer.state.global_step),
        "train_seconds": elapsed,
        "tokens": total_tokens,
        "tokens_per_s": total_tokens / elapsed,
        "world_size": int(trainer.args.world_size),
        "examples": len(trainer.train_dataset),
        "eval_examples": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        "eval_loss_start": float(start_eval["eval_loss"]) if "eval_loss" in start_eval else None,
        "eval_loss": float(final_eval["eval_loss"]) if "eval_loss" in final_eval else None,
        "eval_losses": evals,
        "epochs": config.train_epochs,
        "mix": getattr(trainer, "marco_mix", []),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    result = SFTResult(
        checkpoint=str(Path(config.output_dir).resolve()),
        losses=losses,
        metrics=metrics,
        tokens_per_s=metrics["tokens_per_s"],
        config=config,
        step_times=[t - clock.begin for t in clock.step_ends],
        step_tokens=step_tokens,
    )
    if trainer.is_world_process_zero():
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        _save(trainer, tokenizer, config)
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        result.to_json(out / "result.json")
    trainer.accelerator.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One SFT process (launch through marco.sft.run_sft or torchrun).")
    parser.add_argument("--config", required=True, help="SFTConfig as JSON")
    config = SFTConfig.from_json(parser.parse_args(argv).config)
    train(config)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
