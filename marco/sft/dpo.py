"""An optional DPO stage (TRL's ``DPOTrainer``) on the preference pairs synthesis exports.

``run_dpo(DPOConfig(pairs=..., base=...))`` trains a policy against a frozen copy of its base on the pairs of
a ``datasets`` directory or JSONL written by ``marco synthesize --pairs/--step-pairs --pairs-out``, saves a
checkpoint ``from_pretrained`` loads and returns a :class:`DPOResult` (losses, metrics, tokens/s).

Pairs are tokenized here, not by TRL: a whole-path pair's answers end with the end-of-turn token, while a
sibling-step pair (``meta["kind"] == "step"``) continues the shared reasoning prefix mid-thought, so its
steps must not be followed by an end-of-sequence token (TRL appends one to every text completion).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from marco.sft.config import DEFAULT_EPOCHS


@dataclass
class DPOConfig:
    """One DPO run. ``pairs``: a ``datasets`` directory or JSONL of preference pairs (``prompt`` messages,
    ``chosen``/``rejected``). ``base``: the policy's start (usually the SFT checkpoint, ``checkpoint:ID``);
    the reference model is a frozen copy of it. ``epochs`` or ``max_steps``, never both."""

    pairs: str
    base: str = "smollm2"
    output_dir: str = "runs/dpo"
    beta: float = 0.1
    learning_rate: float = 5e-6
    warmup_ratio: float = 0.1
    warmup_steps: int = 0
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    seed: int = 0
    device: str = "auto"
    run_id: str = ""

    def __post_init__(self) -> None:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give epochs or max_steps, not both")
        if self.beta <= 0 or self.learning_rate <= 0:
            raise ValueError("beta and learning_rate must be positive")
        if self.batch_size < 1 or self.max_length < 8:
            raise ValueError("batch_size must be at least 1 and max_length at least 8")

    @property
    def train_epochs(self) -> float | None:
        return None if self.max_steps is not None else (self.epochs or DEFAULT_EPOCHS)

    def lineage_hyper(self) -> dict[str, Any]:
        """The hyperparameters a checkpoint's lineage records (not the paths)."""
        return {k: v for k, v in asdict(self).items() if k not in ("pairs", "base", "output_dir", "run_id")}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DPOConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class DPOResult:
    """Like :class:`marco.sft.SFTResult`: checkpoint, loss per step, metrics (rewards/accuracies), tokens/s."""

    checkpoint: str
    losses: list[float]
    metrics: dict[str, Any]
    tokens_per_s: float
    config: DPOConfig
    step_times: list[float] = field(default_factory=list)

    def lineage(self) -> dict[str, Any]:
        hyper = self.config.lineage_hyper()
        return {"base": self.config.base, "data": self.config.pairs, "stage": "dpo", "hyperparameters": hyper,
                "metrics": self.metrics, "checkpoint": self.checkpoint, "run_id": self.config.run_id}  # fmt: skip


def load_pairs(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows ``{prompt, chosen, rejected, meta}`` of an exported pairs directory or JSONL."""
    source = Path(path)
    if source.is_dir():
        from datasets import load_from_disk

        rows = [dict(r) for r in load_from_disk(str(source))]
    elif source.is_file():
        with source.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        raise FileNotFoundError(f"no preference pairs at {path} (expected a datasets directory or .jsonl)")
    out = []
    for i, r in enumerate(rows):
        try:
            meta = r.get("meta") or {}
            meta = json.loads(meta) if isinstance(meta, str) else dict(meta)
            answer = lambda v: v[-1]["content"] if isinstance(v, list) else str(v)  # noqa: E731
            out.append({"prompt": [dict(m) for m in r["prompt"]], "chosen": answer(r["chosen"]),
                        "rejected": answer(r["rejected"]), "meta": meta})  # fmt: skip
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ValueError(f"{path}: row {i} is not a preference pair ({e})") from e
    if not out:
        raise ValueError(f"{path}: no preference pairs")
    return out


def tokenize_pair(tokenizer: Any, pair: dict[str, Any]) -> dict[str, list[int]]:
    """``prompt_ids``/``chosen_ids``/``rejected_ids`` of a pair: the prompt rendered with the generation
    prompt (plus a step pair's shared prefix); a whole answer ends with the end-of-turn token, a step not."""
    prompt = tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=False)
    step = pair["meta"].get("kind") == "step"
    if step:
        prompt += pair["meta"]["prefix"]
    end = "" if step else (tokenizer.eos_token or "")

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return {"prompt_ids": ids(prompt), "chosen_ids": ids(pair["chosen"] + end),
            "rejected_ids": ids(pair["rejected"] + end)}  # fmt: skip


def run_dpo(config: DPOConfig) -> DPOResult:
    """Train ``config.base`` with DPO on ``config.pairs`` in this process; save and return the result."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    from marco.sft.base_model import resolve_base
    from marco.sft.train import _StepClock, _use_cuda, _warmup

    pairs = load_pairs(config.pairs)  # bad data fails before any model is loaded
    out = Path(config.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_base(config.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = [tokenize_pair(tokenizer, p) for p in pairs]
    dataset = Dataset.from_list(rows)
    cuda = _use_cuda(config)  # type: ignore[arg-type]
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)

    class _Pretokenized(DPOTrainer):  # the rows are tokenized above (see the module docstring)
        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    args = TRLDPOConfig(
        output_dir=str(out / "trainer"), beta=config.beta, learning_rate=config.learning_rate,
        **_warmup(config),  # type: ignore[arg-type]
        max_steps=config.max_steps if config.max_steps is not None else -1,
        num_train_epochs=config.train_epochs or 1.0, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, max_length=config.max_length, seed=config.seed,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not cuda,
        bf16=dtype == torch.bfloat16, dataloader_num_workers=0,
    )  # fmt: skip
    clock = _StepClock()
    trainer = _Pretokenized(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=[clock])  # fmt: skip
    begin = time.perf_counter()
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    losses = [float(h["loss"]) for h in history]
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    seen = min(1.0, trainer.state.global_step * config.batch_size * config.grad_accum / max(1, len(rows)))
    elapsed = max(clock.end - clock.begin, 1e-9)
    last = history[-1] if history else {}
    metrics = {
        "steps": int(trainer.state.global_step), "pairs": len(rows), "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "train_seconds": elapsed,
        "wall_seconds": time.perf_counter() - begin, "tokens_per_s": tokens * seen / elapsed,
        "step_pairs": sum(1 for p in pairs if p["meta"].get("kind") == "step"),
        **{k: float(v) for k, v in last.items() if k.startswith(("rewards/", "logps/"))},
    }  # fmt: skip
    trainer.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    result = DPOResult(str(out), losses, metrics, metrics["tokens_per_s"], config,
                       step_times=[t - clock.begin for t in clock.step_ends])  # fmt: skip
    (out / "dpo_result.json").write_text(json.dumps(asdict(result), indent=2, default=str))
    return result
