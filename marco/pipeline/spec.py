"""A pipeline file (YAML): reason over a train split → synthesise → SFT → reason over a test split → report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from marco.search.base import SearchConfig
from marco.synthesis.config import SynthesisConfig

STAGES = ("train_reason", "test_before", "synthesize", "train", "test_after")


@dataclass
class Split:
    """Problems ``start .. start+limit`` of each language (``limit`` None: to the end)."""

    langs: list[str] = field(default_factory=lambda: ["en"])
    limit: int | None = None
    start: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.langs, str):
            self.langs = [x.strip() for x in self.langs.split(",") if x.strip()]
        if self.start < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError("a split needs start >= 0 and limit >= 1")


@dataclass
class PipelineSpec:
    """Everything a pipeline run needs; ``search``/``sft``/``synthesize`` take the fields of
    :class:`SearchConfig`, :class:`marco.sft.SFTConfig` and :class:`SynthesisConfig`."""

    name: str
    model: str = "smollm2"
    task: str = "mgsm"
    data_dir: str | None = None  # None: $MARCO_DATA_DIR, else the data shipped with marco
    train: Split = field(default_factory=Split)
    test: Split = field(default_factory=Split)
    search: dict[str, Any] = field(default_factory=dict)
    eval_search: dict[str, Any] | None = None
    synthesize: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    chunk: int = 8
    out: str = "runs/pipelines"
    priority: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = Split(**self.train)
        if isinstance(self.test, dict):
            self.test = Split(**self.test)
        if self.chunk < 1:
            raise ValueError("chunk must be at least 1 problem per job")
        self.search_config()
        self.eval_config()
        self.synthesis_config([])
        if {"data", "base", "output_dir"} & set(self.sft):
            raise ValueError("sft: data, base and output_dir are set by the pipeline; remove them")
        self.sft_config("x", "smollm2", "out")

    # ------------------------------------------------------------------ typed views
    def search_config(self) -> SearchConfig:
        return _build(SearchConfig, self.search, "search")

    def eval_config(self) -> SearchConfig:
        return _build(SearchConfig, self.eval_search if self.eval_search is not None else self.search, "eval_search")

    def synthesis_config(self, batches: list[str]) -> SynthesisConfig:
        if "batches" in self.synthesize:
            raise ValueError("synthesize: batches is set by the pipeline; remove it")
        return _build(SynthesisConfig, {**self.synthesize, "batches": batches}, "synthesize")

    def sft_config(self, data: str, base: str, output_dir: str) -> Any:
        from marco.sft import SFTConfig

        return _build(SFTConfig, {**self.sft, "data": data, "base": base, "output_dir": output_dir}, "sft")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PipelineSpec":
        if not isinstance(raw, dict):
            raise ValueError("a pipeline file is a YAML mapping (name, model, task, train, test, search, sft, ...)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown pipeline key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if not raw.get("name"):
            raise ValueError("a pipeline needs a name")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ValueError(f"bad pipeline file: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "PipelineSpec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no pipeline file at {path}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        return cls.from_dict(raw)


def _build(cls: Any, values: dict[str, Any], section: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {', '.join(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{section}: {exc}") from None
