"""The pipeline's stage handlers, registered in the scheduler's stage registry on import.

Every stage is a batch whose ``config`` carries ``pipeline_id``, ``pipeline_stage`` and the pipeline spec.
When a stage batch ends *done*, the scheduler calls the handler of its kind, which plans every stage that
waits on it (:meth:`PipelineSpec.stages`; deterministic batch ids, so a handler that runs twice writes nothing
twice) and returns their jobs. Per round ``r``:

    round{r}/search (reason, the newest model over a fresh slice of the training split)
        → round{r}/synthesize → round{r}/train → round{r+1}/search ...
                                              ↘ eval/round{r}/<dataset> (every dataset of the matrix)

``eval/base/<dataset>`` (and models named by spec) start with the pipeline. Once every stage is done the
table is written (``table.json``, ``table.md``, ``table.png``, ``report.json`` in the pipeline's folder). A
stage that ends failed or cancelled starts nothing: the pipeline stops there with the failed job's reason
in the store, and ``marco pipeline resume`` continues it.

Handlers run while the scheduler holds a row lock on the ended batch, so they never write that row.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from marco.pipeline.spec import PipelineSpec, Stage
from marco.search.tree import make_id
from scheduler.stages import stage

log = logging.getLogger("marco.pipeline")


def stage_batch_id(pipeline_id: str, stage_name: str) -> str:
    return make_id("pipeline", pipeline_id, stage_name)


def pipeline_dir(spec: PipelineSpec, pipeline_id: str) -> Path:
    return Path(spec.out).resolve() / f"{spec.name}-{pipeline_id[:8]}"


def stage_extra(pipeline_id: str, stage_name: str, spec: PipelineSpec, **more: Any) -> dict[str, Any]:
    return {"pipeline_id": pipeline_id, "pipeline_stage": stage_name, "pipeline": spec.to_dict(), **more}


def split_problems(task: str, data_dir: str | None, split: Any) -> list[Any]:
    """Problems ``start .. start+limit`` of each language of ``split`` of ``task``."""
    from marco.tasks import get_task

    limit = None if split.limit is None else split.start + split.limit
    problems = get_task(task).load(data_dir, split.langs, limit)
    by_lang: dict[str, list[Any]] = {}
    for p in problems:
        by_lang.setdefault(p.lang, []).append(p)
    chosen = [p for lang in by_lang for p in by_lang[lang][split.start:]]
    if not chosen:
        raise ValueError(f"the split {split} of {task} holds no problems")
    return chosen


def round_model(store: Any, pipeline_id: str, r: int, spec: PipelineSpec) -> str:
    """The model round ``r`` produced (``checkpoint:ID``); round 0 is the base model."""
    if r == 0:
        return spec.model
    from marco.pipeline.training import training_run_id

    job_id = make_id("job", stage_batch_id(pipeline_id, f"round{r}/train"), 0)
    run = store.get_training_run(training_run_id(job_id))
    if run.output_model_id is None:
        raise RuntimeError(f"training run {run.id} (round {r}) registered no checkpoint")
    return f"checkpoint:{run.output_model_id}"


def model_spec(store: Any, pipeline_id: str, spec: PipelineSpec, key: str) -> str:
    """The model spec of an evaluation model key (``base``, ``roundN``, or a spec as written)."""
    if key == "base":
        return spec.model
    if key.startswith("round") and key.removeprefix("round").isdigit():
        return round_model(store, pipeline_id, int(key.removeprefix("round")), spec)
    return key


def plan_stage(store: Any, pipeline_id: str, spec: PipelineSpec, st: Stage) -> list[tuple[str, str]]:
    """Write stage ``st``'s batch (nothing when it exists) and return its jobs."""
    out = pipeline_dir(spec, pipeline_id)
    batch_id = stage_batch_id(pipeline_id, st.name)
    extra = stage_extra(pipeline_id, st.name, spec)
    name = f"{spec.name}/{st.name}"
    if st.kind == "reason" and st.round:
        problems = split_problems(spec.task, spec.data_dir, spec.train.for_round(st.round))
        plan = store.create_batch(
            problems, [spec.search_config()], kind="reason", name=name, model=round_model(store, pipeline_id, st.round - 1, spec),
            task=spec.task, chunk_size=spec.chunk, priority=spec.priority, extra=extra, batch_id=batch_id,
        )  # fmt: skip
        return [(j, "reason") for j in plan.job_ids]
    if st.kind == "synthesize":
        from marco.synthesis.job import plan_synthesis

        source = stage_batch_id(pipeline_id, f"round{st.round}/search")
        _, job_id = plan_synthesis(
            store, spec.synthesis_config([source]), name=name,
            exports={"jsonl": str(out / f"round{st.round}" / "synthesis.jsonl")}, extra=extra,
            priority=spec.priority, batch_id=batch_id, allow_empty=bool(spec.sft.get("sources")),
        )  # fmt: skip
        return [(job_id, "synthesize")]
    if st.kind == "train":
        from marco.pipeline.training import plan_training

        synthesis_id = stage_batch_id(pipeline_id, f"round{st.round}/synthesize")
        data = f"synthesis:{synthesis_id}"
        base = round_model(store, pipeline_id, st.round - 1 if spec.train_from == "previous" else 0, spec)
        # a synthesis that kept nothing gets this far only beside other sources (e.g. gold CoT): a base model
        # that cannot write the answer format yet learns it from them this round
        kept = bool(store.cot_examples(synthesis_id, "sft"))
        config = spec.sft_config(data, base, str(out / f"round{st.round}" / "sft"), with_synthesis=kept)
        _, job_id = plan_training(store, config, data, name=name, priority=spec.priority, extra=extra, batch_id=batch_id)
        return [(job_id, "train")]
    # an evaluation batch: every strategy × budget × seed of this model over one dataset
    from marco.compare.spec import runs_metadata

    d = spec.eval_dataset(st.dataset)
    problems = split_problems(d.dataset, spec.data_dir, d.split)
    if st.name.endswith("/matched"):
        runs, matched = matched_runs(store, pipeline_id, spec, st)
    else:
        runs, matched = spec.eval_runs()[st.model_key], {}
    strategies = list(dict.fromkeys(r.strategy for r in runs))
    budgets = sorted({r.budget for r in runs})
    meta = runs_metadata(runs, [_Named(s) for s in strategies], budgets, spec.evaluation.seeds, "greedy")
    for label, info in matched.items():
        meta["runs"][label].update(info)
    model = model_spec(store, pipeline_id, spec, st.model_key)
    plan = store.create_batch(
        problems, [r.config for r in runs], kind="reason", name=name, model=model, task=d.dataset,
        chunk_size=spec.chunk, priority=spec.priority, batch_id=batch_id,
        extra={**extra, "compare": meta, "eval_model": st.model_key, "langs": d.langs},
    )  # fmt: skip
    return [(j, "reason") for j in plan.job_ids]


def matched_runs(store: Any, pipeline_id: str, spec: PipelineSpec, st: Stage) -> tuple[list[Any], dict[str, Any]]:
    """The runs of a ``match`` block for one model and dataset, each at the tokens per problem its matched
    strategy spent (rounded up) in the stage before; and label -> ``matched_to``/``search_budget``."""
    import dataclasses
    import math

    from marco.compare.table import run_keys

    before = stage_batch_id(pipeline_id, st.name.removesuffix("/matched"))
    rows = [s for s, _ in store.batch_rows(before)]
    keys = run_keys(store.get_batch(before).config or {}, rows)
    spent: dict[tuple[str, int], list[int]] = {}
    for s in rows:
        if s.status == "done":
            strategy, budget, _ = keys[s.label]
            spent.setdefault((strategy, budget), []).append(int(s.tokens or 0))
    runs, info, labels = [], {}, set()
    for r in spec.eval_runs(matched=True)[st.model_key]:
        target = spec.matches(st.model_key)[(r.strategy, r.budget)]
        tokens = spent.get((target, r.budget))
        if not tokens:
            raise RuntimeError(f"{st.name}: {target}@{r.budget} finished no search to match {r.strategy} to")
        budget = max(1, math.ceil(sum(tokens) / len(tokens)))
        config = dataclasses.replace(r.config, budget=budget)
        while config.label in labels:  # two matched runs landed on one budget: a label names one search each
            config = dataclasses.replace(config, budget=config.budget + 1)
        labels.add(config.label)
        runs.append(dataclasses.replace(r, config=config))
        info[config.label] = {"matched_to": target, "search_budget": config.budget}
    return runs, info


class _Named:
    """What :func:`runs_metadata` reads of a strategy spec: its name."""

    def __init__(self, name: str) -> None:
        self.name = name


def plan_after(store: Any, pipeline_id: str, spec: PipelineSpec, ended: str | None) -> list[tuple[str, str]]:
    """Plan every stage waiting on stage ``ended`` (None: the stages that start the pipeline)."""
    jobs: list[tuple[str, str]] = []
    for st in spec.stages():
        if st.after == ended:
            jobs += plan_stage(store, pipeline_id, spec, st)
    return jobs


def _context(batch: Any) -> tuple[str, str, PipelineSpec] | None:
    config = batch.config or {}
    if not config.get("pipeline_id") or batch.status != "done":
        return None
    return config["pipeline_id"], config.get("pipeline_stage", ""), PipelineSpec.from_dict(config["pipeline"])


def advance(store: Any, batch: Any) -> list[tuple[str, str]]:
    """A pipeline stage ended done: plan what waits on it; once every stage is done, write the table."""
    ctx = _context(batch)
    if ctx is None:
        return []
    pipeline_id, name, spec = ctx
    jobs = plan_after(store, pipeline_id, spec, name)
    if not jobs:
        write_outputs(store, pipeline_id, spec)
    return jobs


def write_outputs(store: Any, pipeline_id: str, spec: PipelineSpec) -> Path | None:
    """When every stage is done, write ``report.json`` and the table (JSON, markdown, PNG) to the
    pipeline's folder; returns that folder (None while stages are left)."""
    from marco.pipeline.report import pipeline_report, pipeline_status

    if pipeline_status(store, pipeline_id)["status"] != "done":
        return None
    report = pipeline_report(store, pipeline_id)
    out = pipeline_dir(spec, pipeline_id)
    out.mkdir(parents=True, exist_ok=True)
    from marco.compare.plot import plot_matrix
    from marco.compare.render import matrix_markdown

    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "table.json").write_text(json.dumps(report["table"], indent=2))
    (out / "table.md").write_text(matrix_markdown(report["table"], title=spec.name))
    plot_matrix(report["table"], out / "table.png")
    log.info("pipeline %s: table written to %s", pipeline_id, out)
    return out


@stage("reason")
def after_reasoning(store: Any, batch: Any) -> list[tuple[str, str]]:
    """roundN/search done → synthesise its trees; an evaluation done → the table, once all are."""
    return advance(store, batch)


@stage("synthesize")
def after_synthesis(store: Any, batch: Any) -> list[tuple[str, str]]:
    """roundN/synthesize done → fine-tune on its examples."""
    return advance(store, batch)


@stage("train")
def after_training(store: Any, batch: Any) -> list[tuple[str, str]]:
    """roundN/train done → evaluate its checkpoint and search the next round with it."""
    return advance(store, batch)
