"""A pipeline file (YAML): expert iteration over a training split, then an evaluation matrix.

Each of ``rounds`` rounds searches problems of the training split (``task``) with the newest model,
synthesises CoT data from the trees and fine-tunes (from the base model or from the last round's checkpoint:
``train_from``). ``evaluation`` is the matrix: every model of a block (``base``, ``round2``, ``rounds``: every
round, ``last``, or any model spec such as ``checkpoint:ID``) × its strategies × its budgets × every dataset.
``rounds: 0`` evaluates only (no training). A pipeline never trains on an evaluation split
(:mod:`marco.tasks.splits`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from marco.search.base import SearchConfig
from marco.synthesis.config import SynthesisConfig
from marco.tasks.splits import check_trainable

TRAIN_FROM = ("previous", "base")
NO_ACCURACY = ("translation", "flores200", "wmt22")


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

    def for_round(self, r: int) -> "Split":
        """The problems round ``r`` (1-based) searches: a fresh slice of ``limit`` problems each round."""
        if self.limit is None:
            return self
        return Split(list(self.langs), self.limit, self.start + (r - 1) * self.limit)


@dataclass
class EvalDataset:
    """One evaluation dataset; its languages become separate columns of the table."""

    dataset: str
    langs: list[str] = field(default_factory=lambda: ["en"])
    limit: int | None = None
    start: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.langs, str):
            self.langs = [x.strip() for x in self.langs.split(",") if x.strip()]
        if self.dataset in NO_ACCURACY:
            raise ValueError(f"evaluation needs answers that are right or wrong (mgsm, arith-*), not {self.dataset!r}")
        if self.start < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError(f"evaluation dataset {self.dataset}: needs start >= 0 and limit >= 1")

    @property
    def split(self) -> Split:
        return Split(list(self.langs), self.limit, self.start)


@dataclass
class MatrixBlock:
    """``models`` × ``strategies`` (``marco compare`` specs, e.g. ``mcts:ministep:32``) × ``budgets``.

    With ``match`` (a strategy of another block, e.g. ``mcts:ministep:32``) the strategies run after that
    strategy's cell of the same model and dataset, at its *spent* tokens per problem (rounded up) instead of
    a budget: ``budgets`` then names the matched strategy's budgets, and the table shows them at the same
    nominal budget with ``matched_to`` and the ``search_budget`` they ran at."""

    models: list[str]
    strategies: list[str]
    budgets: list[int] = field(default_factory=lambda: [1024])
    match: str | None = None

    def __post_init__(self) -> None:
        for name in ("models", "strategies", "budgets"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = [x.strip() for x in str(value).split(",") if x.strip()]
            if not value:
                raise ValueError(f"a matrix block needs at least one of {name}")
            setattr(self, name, [int(v) for v in value] if name == "budgets" else [str(v) for v in value])
        if any(b <= 0 for b in self.budgets):
            raise ValueError(f"budgets must be positive, got {self.budgets}")


@dataclass
class Evaluation:
    """The evaluation matrix. ``search`` holds shared :class:`SearchConfig` overrides (``max_answer_tokens``,
    ``children``, ...); ``seeds`` runs every sampled strategy that many times (per problem the mean counts).
    ``trained``: in an evaluation-only pipeline (``rounds: 0``), the model spec (e.g. ``checkpoint:ID``,
    trained by ``marco sft``) whose greedy row is the trained reference of the paired tests; with rounds it
    is the last round's model."""

    datasets: list[EvalDataset]
    matrix: list[MatrixBlock]
    search: dict[str, Any] = field(default_factory=dict)
    seeds: int = 1
    trained: str | None = None

    def __post_init__(self) -> None:
        self.datasets = [d if isinstance(d, EvalDataset) else _typed(EvalDataset, d, "evaluation.datasets")
                         for d in self.datasets or []]  # fmt: skip
        self.matrix = [b if isinstance(b, MatrixBlock) else _typed(MatrixBlock, b, "evaluation.matrix")
                       for b in self.matrix or []]  # fmt: skip
        if not self.datasets or not self.matrix:
            raise ValueError("evaluation needs datasets and a matrix (a list of {models, strategies, budgets})")
        keys = [d.dataset for d in self.datasets]
        if len(set(keys)) != len(keys):
            raise ValueError(f"evaluation lists a dataset twice: {keys}")
        if self.seeds < 1:
            raise ValueError("evaluation.seeds must be at least 1")
        reserved = {"strategy", "action", "reflect", "budget", "seed"} & set(self.search)
        if reserved:
            raise ValueError(f"evaluation.search: {', '.join(sorted(reserved))} come from the matrix's strategies and budgets")


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline: a batch of ``kind`` planned once stage ``after`` is done (None: at start)."""

    name: str
    kind: str  # reason | synthesize | train
    after: str | None
    round: int = 0  # 1-based round of a training stage; 0 for evaluation
    model_key: str = ""  # evaluation: base | roundN | a model spec
    dataset: str = ""  # evaluation: the dataset


@dataclass
class PipelineSpec:
    """Everything a pipeline run needs; ``search``/``sft``/``synthesize`` take the fields of
    :class:`SearchConfig`, :class:`marco.sft.SFTConfig` and :class:`SynthesisConfig`."""

    name: str
    evaluation: Evaluation
    model: str = "smollm2"
    task: str = "arith-train"  # the training split searched for synthesis
    data_dir: str | None = None  # None: $MARCO_DATA_DIR, else the data shipped with marco
    train: Split = field(default_factory=Split)
    rounds: int = 1
    train_from: str = "previous"  # previous: round r continues from round r-1's checkpoint; base: from the base
    search: dict[str, Any] = field(default_factory=dict)
    synthesize: dict[str, Any] = field(default_factory=dict)
    sft: dict[str, Any] = field(default_factory=dict)
    chunk: int = 8
    out: str = "runs/pipelines"
    priority: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = _typed(Split, self.train, "train")
        if isinstance(self.evaluation, dict):
            self.evaluation = _typed(Evaluation, self.evaluation, "evaluation")
        if self.chunk < 1:
            raise ValueError("chunk must be at least 1 problem per job")
        if self.rounds < 0:
            raise ValueError("rounds must be 0 (evaluate only) or more")
        if self.train_from not in TRAIN_FROM:
            raise ValueError(f"train_from must be one of {', '.join(TRAIN_FROM)}, not {self.train_from!r}")
        if self.rounds:
            check_trainable(self.task)
            self.search_config()
            self.synthesis_config([])
            if {"data", "base", "output_dir"} & set(self.sft):
                raise ValueError("sft: data, base and output_dir are set by the pipeline; remove them")
            self.sft_config("x", "smollm2", "out")
        for d in self.evaluation.datasets:
            if self.rounds and d.dataset == self.task:
                raise ValueError(f"evaluation dataset {d.dataset!r} is the training split; evaluate on held-out data")
        self.eval_runs()  # every strategy, budget and model name parses now, not after the model has loaded

    # ------------------------------------------------------------------ typed views
    def search_config(self) -> SearchConfig:
        return _build(SearchConfig, self.search, "search")

    def synthesis_config(self, batches: list[str]) -> SynthesisConfig:
        if "batches" in self.synthesize:
            raise ValueError("synthesize: batches is set by the pipeline; remove it")
        return _build(SynthesisConfig, {**self.synthesize, "batches": batches}, "synthesize")

    def sft_config(self, data: str, base: str, output_dir: str, with_synthesis: bool = True) -> Any:
        """The round's :class:`SFTConfig`: ``data`` is the round's synthesis; with ``sources`` (extra files
        mixed in, e.g. a gold-CoT JSONL) the synthesis is one more source, of weight 1, left out
        (``with_synthesis=False``) when the round's synthesis kept no example."""
        from marco.sft import SFTConfig

        if self.sft.get("sources"):
            # the round's synthesis is one source (weight 1) beside the extra files
            sources = [*([{"path": data, "weight": 1.0}] if with_synthesis else []), *self.sft["sources"]]
            return _build(SFTConfig, {**self.sft, "data": "", "sources": sources, "base": base,
                                      "output_dir": output_dir}, "sft")  # fmt: skip
        return _build(SFTConfig, {**self.sft, "data": data, "base": base, "output_dir": output_dir}, "sft")

    def model_keys(self, block: MatrixBlock) -> list[str]:
        """A block's models as stage keys: ``base``, ``round1`` ..., or a model spec."""
        keys: list[str] = []
        for name in block.models:
            if name in ("base", self.model):
                keys.append("base")
            elif name == "rounds":
                keys += [f"round{r}" for r in range(1, self.rounds + 1)]
            elif name == "last":
                if not self.rounds:
                    raise ValueError("evaluation: model 'last' needs rounds >= 1")
                keys.append(f"round{self.rounds}")
            elif name.startswith("round"):
                r = name.removeprefix("round")
                if not r.isdigit() or not 1 <= int(r) <= self.rounds:
                    raise ValueError(f"evaluation: model {name!r}: this pipeline has rounds 1..{self.rounds}")
                keys.append(f"round{int(r)}")
            else:
                keys.append(name)
        return list(dict.fromkeys(keys))

    def eval_runs(self, matched: bool = False) -> dict[str, list[Any]]:
        """model key -> its :class:`marco.compare.spec.CompareRun` s (every strategy × budget × seed of every
        block naming that model), in matrix order. ``matched``: the runs of the blocks with ``match`` instead,
        at their nominal budget (the search budget is set once the matched cell has run)."""
        return self._plan_eval()[1 if matched else 0]

    def matches(self, key: str) -> dict[tuple[str, int], str]:
        """(strategy, nominal budget) -> the strategy it is matched to, for model ``key``."""
        return self._plan_eval()[2].get(key, {})

    def _plan_eval(self) -> tuple[dict[str, list[Any]], dict[str, list[Any]], dict[str, dict[tuple[str, int], str]]]:
        from marco.compare.spec import SpecError, parse_strategy, plan_runs

        ev = self.evaluation
        plain: dict[str, list[Any]] = {}
        matched: dict[str, list[Any]] = {}
        match_of: dict[str, dict[tuple[str, int], str]] = {}
        for block in ev.matrix:
            try:
                runs = plan_runs([parse_strategy(s) for s in block.strategies], block.budgets, ev.seeds, base=ev.search)
                target = parse_strategy(block.match).name if block.match is not None else None
            except SpecError as exc:
                raise ValueError(f"evaluation.matrix: {exc}") from None
            for key in self.model_keys(block):
                have = (plain if target is None else matched).setdefault(key, [])
                labels = {r.config.label for r in have}
                have += [r for r in runs if r.config.label not in labels]
                if target is not None:
                    for r in runs:
                        if match_of.setdefault(key, {}).setdefault((r.strategy, r.budget), target) != target:
                            raise ValueError(f"evaluation.matrix: {key} matches {r.strategy}@{r.budget} to two strategies")
        for key, pairs in match_of.items():
            ran = {(r.strategy, r.budget) for r in plain.get(key, [])}
            for (strategy, budget), target in pairs.items():
                if (target, budget) not in ran:
                    raise ValueError(f"evaluation.matrix: match {target!r} needs a block running it for {key} at "
                                     f"budget {budget}")  # fmt: skip
                if (strategy, budget) in ran:
                    raise ValueError(f"evaluation.matrix: {key} runs {strategy} at budget {budget} and matched to "
                                     f"{target} at it; keep one")  # fmt: skip
        return plain, matched, match_of

    def stages(self) -> list[Stage]:
        """Every stage in order: the rounds' search → synthesize → train, then the evaluation batches."""
        out: list[Stage] = []
        for r in range(1, self.rounds + 1):
            prev = f"round{r - 1}/train" if r > 1 else None
            out += [
                Stage(f"round{r}/search", "reason", prev, round=r),
                Stage(f"round{r}/synthesize", "synthesize", f"round{r}/search", round=r),
                Stage(f"round{r}/train", "train", f"round{r}/synthesize", round=r),
            ]
        matched = self.eval_runs(matched=True)
        for key in self.eval_runs():
            after = f"{key}/train" if key.startswith("round") else None
            for d in self.evaluation.datasets:
                out.append(Stage(f"eval/{key}/{d.dataset}", "reason", after, model_key=key, dataset=d.dataset))
                if key in matched:
                    out.append(Stage(f"eval/{key}/{d.dataset}/matched", "reason", f"eval/{key}/{d.dataset}",
                                     model_key=key, dataset=d.dataset))  # fmt: skip
        return out

    def eval_dataset(self, name: str) -> EvalDataset:
        return next(d for d in self.evaluation.datasets if d.dataset == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PipelineSpec":
        if not isinstance(raw, dict):
            raise ValueError("a pipeline file is a YAML mapping (name, model, task, train, rounds, search, sft, "
                             "evaluation, ...)")  # fmt: skip
        old = sorted({"test", "eval_search"} & set(raw))
        if old:
            raise ValueError(f"{', '.join(old)}: replaced by evaluation (datasets + matrix); see examples/pipeline.yaml")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown pipeline key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if not raw.get("name"):
            raise ValueError("a pipeline needs a name")
        if not raw.get("evaluation"):
            raise ValueError("a pipeline needs evaluation: {datasets: [...], matrix: [{models, strategies, budgets}]}")
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


def _typed(cls: Any, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"{section}: expected a mapping, got {values!r}")
    return _build(cls, values, section)


def _build(cls: Any, values: dict[str, Any], section: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {', '.join(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{section}: {exc}") from None
