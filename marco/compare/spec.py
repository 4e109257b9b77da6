"""Strategy specs of ``marco compare``: ``greedy,sc,bon,mcts:ministep:32,mcts:step`` into search configs.

A spec is ``NAME[:ACTION][+reflect][/KEY=VALUE...]``:

- ``greedy``, ``sc``, ``bon`` (``sc:8`` / ``bon:8``: at most 8 chains; otherwise the search's default, as many
  as the budget pays),
- ``mcts:ministep:32``, ``mcts:step`` (``mcts`` alone: ministep:32),
- ``+reflect`` adds the reflection action (MCTS),
- ``/KEY=VALUE`` sets any other :class:`~marco.search.base.SearchConfig` field, e.g.
  ``mcts:ministep:32/k=4/c=0.5`` (aliases: ``k`` = children, ``c`` = exploration, ``t`` = temperature).

Every spec runs at every budget and, unless it is deterministic (greedy), once per seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from marco.search.base import STRATEGIES, SearchConfig

ALIASES = {"k": "children", "c": "exploration", "t": "temperature"}
# set by the spec itself, by --budgets or by --seeds: not allowed as /KEY=VALUE
RESERVED = ("strategy", "action", "reflect", "budget", "seed")
DETERMINISTIC = ("greedy",)


class SpecError(ValueError):
    """A strategy, budget or seed list that cannot be parsed; the message says what to write instead."""


@dataclass(frozen=True)
class StrategySpec:
    """One parsed strategy: its name as written (normalised) and the config fields it sets."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def deterministic(self) -> bool:
        return self.fields["strategy"] in DETERMINISTIC

    def config(self, budget: int, seed: int, base: dict[str, Any] | None = None) -> SearchConfig:
        """The search config of this strategy at ``budget`` and ``seed`` (``base``: shared overrides)."""
        values = {**(base or {}), **self.fields, "budget": budget, "seed": seed}
        try:
            return SearchConfig(**values)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"strategy {self.name!r}: {exc}") from None


@dataclass(frozen=True)
class CompareRun:
    """One config of a comparison: a strategy at a budget and a seed."""

    strategy: str  # the spec's name
    budget: int
    seed: int
    config: SearchConfig


def _convert(key: str, raw: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(SearchConfig)}
    if key not in fields:
        known = ", ".join(sorted(set(fields) - set(RESERVED)))
        raise SpecError(f"unknown setting {key!r}; use one of {known} (or k, c, t)")
    if key in RESERVED:
        raise SpecError(f"{key!r} is set by the spec, --budgets or --seeds, not by /{key}=...")
    default = fields[key].default
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise SpecError(f"{key}={raw!r} is not a {type(default).__name__}") from None
    return raw


def parse_strategy(text: str) -> StrategySpec:
    """Parse one spec (see the module docstring)."""
    head, *settings = text.strip().split("/")
    reflect = head.endswith("+reflect")
    head = head.removesuffix("+reflect")
    strategy, _, rest = head.partition(":")
    strategy = strategy.strip().lower()
    if strategy not in STRATEGIES:
        raise SpecError(f"unknown strategy {strategy!r} in {text!r}; choose one of {', '.join(STRATEGIES)}")
    values: dict[str, Any] = {"strategy": strategy, "reflect": reflect}
    if strategy == "mcts":
        values["action"] = rest or "ministep:32"
    elif strategy in ("sc", "bon") and rest:
        if not rest.isdigit() or int(rest) <= 0:
            raise SpecError(f"{text!r}: write {strategy}:N with N a positive cap on the chains")
        values["n"] = int(rest)
    elif rest:
        raise SpecError(f"{text!r}: greedy takes no argument")
    if reflect and strategy != "mcts":
        raise SpecError(f"{text!r}: +reflect is an MCTS action")
    for item in settings:
        key, eq, raw = item.partition("=")
        if not eq:
            raise SpecError(f"{text!r}: write settings as /KEY=VALUE, e.g. /k=4")
        key = ALIASES.get(key.strip(), key.strip())
        values[key] = _convert(key, raw.strip())
    name = head.strip().lower() + ("+reflect" if reflect else "") + "".join(f"/{s.strip()}" for s in settings)
    spec = StrategySpec(name, values)
    spec.config(1024, 0)  # validates the action and every value now, not after the model has loaded
    return spec


def parse_strategies(text: str) -> list[StrategySpec]:
    """A comma-separated list of specs, each once."""
    specs = [parse_strategy(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise SpecError("--strategies is empty; e.g. greedy,sc,bon,mcts:ministep:32")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SpecError(f"a strategy appears twice in {text!r}")
    return specs


def parse_ints(text: str, what: str) -> list[int]:
    """``256,512`` into ``[256, 512]`` (sorted, positive, each once)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecError(f"{what} must be comma-separated whole numbers, e.g. 256,512,1024 (got {text!r})") from None
    if not values or any(v <= 0 for v in values):
        raise SpecError(f"{what} must be positive numbers (got {text!r})")
    return sorted(set(values))


def plan_runs(specs: Sequence[StrategySpec], budgets: Sequence[int], seeds: int, base: dict[str, Any] | None = None,
              first_seed: int = 0) -> list[CompareRun]:
    """Every (strategy, budget, seed) config; deterministic strategies run with the first seed only.

    Raises :class:`SpecError` when two runs would get the same store label (the store tells the searches of
    a batch apart by label), naming both.
    """
    if seeds <= 0:
        raise SpecError("--seeds must be a positive number")
    runs = [
        CompareRun(spec.name, budget, seed, spec.config(budget, seed, base))
        for spec in specs
        for budget in budgets
        for seed in range(first_seed, first_seed + (1 if spec.deterministic else seeds))
    ]
    seen: dict[str, CompareRun] = {}
    for run in runs:
        other = seen.setdefault(run.config.label, run)
        if other is not run:
            raise SpecError(
                f"{other.strategy}@{other.budget} seed {other.seed} and {run.strategy}@{run.budget} seed {run.seed} "
                f"get the same search label {run.config.label!r}, so one batch cannot hold both; "
                "this build's SearchConfig.label does not tell these settings apart"
            )
    return runs


def runs_metadata(runs: Sequence[CompareRun], specs: Sequence[StrategySpec], budgets: Sequence[int], seeds: int,
                  baseline: str) -> dict[str, Any]:
    """What a stored batch keeps under ``config["compare"]``: label -> (strategy, budget, seed)."""
    return {
        "strategies": [s.name for s in specs],
        "budgets": list(budgets),
        "seeds": seeds,
        "baseline": baseline,
        "runs": {r.config.label: {"strategy": r.strategy, "budget": r.budget, "seed": r.seed} for r in runs},
    }
