"""SFT run configuration and result."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class SFTConfig:
    """One supervised fine-tuning run.

    ``data`` is a ``datasets`` directory, a JSONL or a Parquet file of chats (a ``messages`` column, or
    ``instruction``/``response`` rows). ``base`` is a model spec (``smollm2``, a ``.gguf`` file, a model
    directory, a hub id, ``checkpoint:ID``). ``batch_size`` is per process; the effective batch is
    ``batch_size * grad_accum * nproc``. ``max_steps`` counts optimizer steps (≤ 0: ``epochs`` passes).
    """

    data: str
    base: str = "smollm2"
    output_dir: str = "runs/sft"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    max_steps: int = 100
    epochs: float = 1.0
    learning_rate: float = 1e-5
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1024
    seed: int = 0
    nproc: int = 1
    device: str = "auto"  # auto: cuda when available, else cpu
    gradient_checkpointing: bool = False
    run_id: str = ""
    # Filled by run_sft: the directory the base spec resolved to (a GGUF is dequantized once, up front).
    base_path: str = ""

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "nproc"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.lora and (self.lora_r < 1 or self.lora_alpha <= 0):
            raise ValueError("LoRA needs lora_r >= 1 and lora_alpha > 0")

    def hyperparameters(self) -> dict[str, Any]:
        """What a lineage record keeps of this run (everything but paths)."""
        skip = {"data", "base", "output_dir", "base_path", "run_id"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    def to_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "SFTConfig":
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class SFTResult:
    """What a run produced: the checkpoint directory (``from_pretrained`` loads it), the loss of every
    optimizer step, final metrics, and training throughput (non-padding tokens per second, all ranks)."""

    checkpoint: str
    losses: list[float]
    metrics: dict[str, Any]
    tokens_per_s: float
    config: SFTConfig
    step_times: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)

    def lineage(self) -> dict[str, Any]:
        """The record the store keeps with the checkpoint in ``models``/``training_runs``."""
        return {
            "base": self.config.base,
            "data": self.config.data,
            "hyperparameters": self.config.hyperparameters(),
            "metrics": self.metrics,
            "checkpoint": self.checkpoint,
            "run_id": self.config.run_id,
        }

    def to_json(self, path: str | os.PathLike[str]) -> None:
        payload = asdict(self)
        Path(path).write_text(json.dumps(payload, indent=2))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "SFTResult":
        raw = json.loads(Path(path).read_text())
        config = raw.pop("config")
        known = {f.name for f in fields(SFTConfig)}
        return cls(config=SFTConfig(**{k: v for k, v in config.items() if k in known}), **raw)
