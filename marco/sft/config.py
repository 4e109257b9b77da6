"""SFT run configuration and result.

A run trains on one or more *sources* mixed by weight (:class:`SFTConfig`), holds out ``eval_fraction`` of
each source for a validation loss, and lasts either ``epochs`` passes or ``max_steps`` optimizer steps —
never both. Defaults by model size live in :data:`SIZE_DEFAULTS` (see ``docs/architecture.md``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_EPOCHS = 2.0

# Defaults by model size (parameters). The 135M row was measured (docs/architecture.md, "SFT defaults");
# the larger rows follow the usual full-fine-tuning practice (smaller models take larger steps; Marco-o1's
# 7B CoT SFT used 1e-5). LoRA takes about 10x the full-fine-tuning learning rate.
SIZE_DEFAULTS: list[tuple[float, dict[str, Any]]] = [
    (0.5e9, {"learning_rate": 1e-4, "warmup_ratio": 0.05, "batch_size": 8, "epochs": 2.0}),
    (3e9, {"learning_rate": 3e-5, "warmup_ratio": 0.03, "batch_size": 16, "epochs": 2.0}),
    (float("inf"), {"learning_rate": 1e-5, "warmup_ratio": 0.03, "batch_size": 32, "epochs": 2.0}),
]


def defaults_for_size(n_params: float) -> dict[str, Any]:
    """The documented defaults for a model of ``n_params`` parameters (full fine-tuning)."""
    return dict(next(d for limit, d in SIZE_DEFAULTS if n_params <= limit))


def parse_source(spec: str) -> dict[str, Any]:
    """``PATH[:WEIGHT]`` → ``{"path": PATH, "weight": WEIGHT}`` (weight 1.0 when absent). A ``synthesis:RUN``
    path keeps its prefix; only a trailing ``:number`` is a weight."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return {"path": head, "weight": float(tail)}
        except ValueError:
            pass
    return {"path": spec, "weight": 1.0}


@dataclass
class SFTConfig:
    """One supervised fine-tuning run.

    Data: ``sources`` is a list of ``{"path": ..., "weight": float}``; each path is a ``datasets``
    directory, a JSONL or a Parquet file of chats (a ``messages`` column, or ``instruction``/``response``
    rows) — a synthesis export, an ``import-cot`` output, instruction data. A source's weight multiplies
    how often its examples are seen: 1.0 each once per epoch, 2.0 twice, 0.25 a (seeded) random quarter,
    so source *i* makes up ``w_i n_i / Σ w_j n_j`` of the mix. ``data`` (one path) is the one-source
    shorthand, kept for existing callers. ``eval_fraction`` of every source (before weighting) is held out
    and the eval loss is logged ``eval_every`` optimizer steps and at the end (0 disables it).

    Duration: ``epochs`` passes *or* ``max_steps`` optimizer steps; giving both is an error (neither:
    :data:`DEFAULT_EPOCHS`). ``warmup_ratio`` of the steps warm the learning rate up linearly
    (``warmup_steps`` > 0 overrides it). ``batch_size`` is per process; the effective batch is
    ``batch_size * grad_accum * nproc``. ``base`` is a model spec (``smollm2``, a ``.gguf`` file, a model
    directory, a hub id, ``checkpoint:ID``).
    """

    data: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)
    base: str = "smollm2"
    output_dir: str = "runs/sft"
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    epochs: float | None = None
    max_steps: int | None = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 1024
    eval_fraction: float = 0.05
    eval_every: int = 0  # optimizer steps between eval losses (0: at the end only)
    seed: int = 0
    nproc: int = 1
    device: str = "auto"  # auto: cuda when available, else cpu
    gradient_checkpointing: bool = False
    # CPU: score only labelled positions (marco.sft.lm_head), not TRL's every-position fused head
    compact_lm_head: bool = True
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
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError(
                f"give epochs ({self.epochs}) or max_steps ({self.max_steps}), not both: "
                "a run lasts a number of passes or a number of optimizer steps"
            )
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if not 0.0 <= self.eval_fraction < 0.5:
            raise ValueError(f"eval_fraction must be in [0, 0.5), got {self.eval_fraction}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        self.sources = [self._source(s) for s in self.sources]
        if self.data and self.sources:
            raise ValueError("give data (one path) or sources (several, with weights), not both")

    @staticmethod
    def _source(s: Any) -> dict[str, Any]:
        if isinstance(s, str):
            s = parse_source(s)
        if not isinstance(s, dict) or not s.get("path"):
            raise ValueError(f"a source is {{'path': ..., 'weight': float}}, got {s!r}")
        unknown = set(s) - {"path", "weight"}
        if unknown:
            raise ValueError(f"unknown source key(s) {sorted(unknown)} in {s!r}")
        weight = float(s.get("weight", 1.0))
        if weight <= 0:
            raise ValueError(f"source {s['path']}: weight must be positive, got {weight}")
        return {"path": str(s["path"]), "weight": weight}

    @property
    def mix(self) -> list[dict[str, Any]]:
        """The sources this run reads (``data`` as one source of weight 1)."""
        return list(self.sources) if self.sources else ([{"path": self.data, "weight": 1.0}] if self.data else [])

    @property
    def train_epochs(self) -> float | None:
        """Passes over the data, or None when the run is counted in ``max_steps``."""
        if self.max_steps is not None:
            return None
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS

    def hyperparameters(self) -> dict[str, Any]:
        """What a lineage record keeps of this run (everything but paths; source weights kept)."""
        skip = {"data", "sources", "base", "output_dir", "base_path", "run_id"}
        out = {k: v for k, v in asdict(self).items() if k not in skip}
        out["epochs"] = self.train_epochs
        if self.sources:
            out["source_weights"] = [s["weight"] for s in self.sources]
        return out

    def to_json(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "SFTConfig":
        """A config from a dict (unknown keys ignored). A record written before epochs/max_steps became
        exclusive (``max_steps`` > 0 *and* ``epochs``) keeps its old meaning: ``max_steps`` won."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in raw.items() if k in known}
        if data.get("epochs") is not None and data.get("max_steps") is not None:
            if int(data["max_steps"]) > 0 and float(data["epochs"]) == 1.0:
                data["epochs"] = None
            elif int(data["max_steps"]) <= 0:
                data["max_steps"] = None
        if data.get("max_steps") is not None and int(data["max_steps"]) <= 0:
            data["max_steps"] = None
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "SFTConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class SFTResult:
    """What a run produced: the checkpoint directory (``from_pretrained`` loads it), the loss of every
    optimizer step, final metrics (``eval_loss`` and ``eval_losses`` when a validation split was held out;
    ``mix``: examples drawn from each source), and training throughput (non-padding tokens per second, all
    ranks)."""

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
            "data": self.config.data or [s["path"] for s in self.config.sources],
            "sources": self.config.mix,
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
        return cls(config=SFTConfig.from_dict(config), **raw)
