"""``marco data list`` (the evaluation data and where it is read from), ``marco import-cot`` (external CoT data
through the quality filters) and ``marco sft`` (fine-tuning)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from marco.cli import app
from marco.cli.db import fail
from marco.cli.tables import datasets_table, filter_report_table
from marco.sft.config import DEFAULT_EPOCHS, SFTConfig


data_app = typer.Typer(
    help="The evaluation datasets: `marco data list` shows what ships with marco and what is available here.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


@data_app.command("list")
def data_list(
    data_dir: Optional[str] = typer.Option(
        None, "--data-dir", envvar="MARCO_DATA_DIR", show_envvar=True, help="Also look in this folder (an override)."
    ),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the shipped files against SHA256SUMS."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per dataset instead of a table."),
) -> None:
    """Every dataset marco knows (MGSM per language, FLORES-200 and WMT22 zh-en, the demo set, any other
    registered task): where it is read from (packaged / data dir / sacrebleu cache / not available), its rows
    and licence. Never downloads anything.

    Example: marco data list --data-dir /srv/marco-data
    """
    from dataclasses import asdict

    from marco.tasks import catalog
    from marco.tasks.packaged import MANIFEST, packaged_dir, verify_all

    infos = catalog(data_dir)
    damaged = [rel for rel, ok in verify_all().items() if not ok] if verify else []
    if as_json:
        for info in infos:
            typer.echo(json.dumps(asdict(info), ensure_ascii=False))
    else:
        where = f"override {data_dir}" if data_dir else f"shipped in {packaged_dir()}"
        Console().print(datasets_table(infos, f"datasets ({where})"))
        for info in infos:
            if info.note:
                typer.echo(f"{info.name} {info.subset}: {info.note}")
        if verify and not damaged:
            typer.echo(f"shipped files match {packaged_dir() / MANIFEST}", err=True)
    if damaged:
        fail(f"{len(damaged)} shipped file(s) fail their SHA-256 check ({', '.join(damaged[:3])}); reinstall marco")


@data_app.command("gold-cot")
def data_gold_cot(
    out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write (one Open-O1-style row a line)."),
    dataset: str = typer.Option("arith-train", "--dataset", "-d", help="A training split (arith-train)."),
    start: int = typer.Option(0, "--start", min=0, help="First problem index."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="How many problems (default: all)."),
) -> None:
    """Worked solutions of a generated training split as CoT data: `{"instruction", "output"}` rows whose
    output is a step-by-step <Thought> and the number in <Output>, the shape `marco import-cot` and SFT
    sources read. Evaluation splits (arith, arith-heldout, arith-hard) are refused: their solutions are never
    training data, and arith-train shares no (template, numbers) tuple with them.

    Example: marco data gold-cot --dataset arith-train --limit 20000 --out runs/data/gold.jsonl
    """
    from marco.tasks.arith import gold_cot_rows

    try:
        rows = gold_cot_rows(dataset, start, limit)
        out.parent.mkdir(parents=True, exist_ok=True)
        count = 0
        with out.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
    except ValueError as e:
        fail(str(e))
    typer.echo(f"wrote {count} worked solutions of {dataset} to {out}")


@app.command("import-cot")
def import_cot_cmd(
    file: Path = typer.Argument(..., help="JSONL or Parquet file: instruction/response rows or a messages column."),
    min_chars: int = typer.Option(20, "--min-chars", help="Shortest assistant answer kept (characters)."),
    max_chars: int = typer.Option(16_000, "--max-chars", help="Longest assistant answer kept (characters)."),
    lang: Optional[str] = typer.Option(None, "--lang", help="Keep only these languages, e.g. en,zh (default: all)."),
    consistent_lang: bool = typer.Option(
        False, "--consistent-lang", help="Drop answers in another language than their question."
    ),
    near_dup_threshold: float = typer.Option(
        0.8, "--near-dup-threshold", help="Jaccard similarity (0-1] above which a row is a near duplicate; 0 turns it off."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="Read at most this many rows."),
    jsonl: Optional[Path] = typer.Option(None, "--jsonl", help="Write the kept examples to this JSONL file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the kept examples as a `datasets` directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
) -> None:
    """Import external CoT data with the Marco-o1 quality filters and report what each filter removed.

    Example: marco import-cot OpenO1-SFT.jsonl --lang en,zh --max-chars 8000 --out data/openo1
    """
    from marco.data import import_cot, save_dataset, write_jsonl
    from marco.data.filters import default_filters

    if not 0.0 <= near_dup_threshold <= 1.0:
        fail(f"--near-dup-threshold must be between 0 and 1, got {near_dup_threshold}")
    if min_chars > max_chars:
        fail(f"--min-chars ({min_chars}) is above --max-chars ({max_chars})")
    if out is not None and out.exists() and any(out.iterdir()):
        fail(f"{out} exists and is not empty; choose a new --out directory")
    langs = [x.strip() for x in lang.split(",") if x.strip()] if lang else None
    steps = default_filters(min_chars, max_chars, langs, near_dup_threshold or None, consistent_lang)
    try:
        result = import_cot(file, steps, limit=limit)
    except (FileNotFoundError, ValueError, OSError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else repr(exc))
    if as_json:
        typer.echo(json.dumps(result.report.to_dict(), ensure_ascii=False))
    else:
        Console().print(filter_report_table(result.report, f"{file.name}: kept {result.report.kept} of {result.report.total}"))
    if jsonl is not None:
        n = write_jsonl(result.examples, jsonl)
        typer.echo(f"wrote {n} examples to {jsonl}", err=as_json)
    if out is not None:
        if not result.examples:
            fail("no example passed the filters; nothing written to --out")
        save_dataset(result.examples, out)
        typer.echo(f"wrote a datasets directory with {len(result.examples)} examples to {out}", err=as_json)
    if jsonl is None and out is None:
        typer.echo("(dry run: pass --jsonl FILE or --out DIR to keep the examples)", err=True)


@app.command("sft")
def sft_cmd(
    data: Optional[str] = typer.Option(None, "--data", help="Training chats (one source): a `datasets` directory, a .jsonl or .parquet file, synthesis:RUN (a stored synthesis run, its name, or the batch it came from), or gold-cot:SPLIT?start=N&limit=M (worked solutions of a training split, e.g. gold-cot:arith-train?limit=640)."),
    source: list[str] = typer.Option([], "--source", help="A source to mix in, PATH[:WEIGHT] (repeat it; PATH as for --data). WEIGHT multiplies how often its examples are seen: 2 twice per epoch, 0.5 a random half (default 1)."),
    base: str = typer.Option("smollm2", "--base", help="Base model: smollm2, a .gguf file, a model directory, hub id or checkpoint:ID."),
    out: Path = typer.Option(Path("runs/sft"), "--out", help="Output directory: each run of the train job writes its checkpoint and logs in OUT/claim-N (N: its claim)."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (merged into the saved checkpoint)."),
    lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank."),
    lora_alpha: int = typer.Option(32, "--lora-alpha", help="LoRA alpha."),
    nproc: int = typer.Option(1, "--nproc", help="Processes under torchrun (data sharded across them)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help=f"Passes over the data (default {DEFAULT_EPOCHS:g} when --max-steps is not given). Not with --max-steps."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps instead of epochs. Not with --epochs."),
    lr: float = typer.Option(SFTConfig.learning_rate, "--lr", help="Peak learning rate (defaults by model size: docs/architecture.md)."),
    warmup_ratio: float = typer.Option(SFTConfig.warmup_ratio, "--warmup-ratio", help="Share of the steps that warm the learning rate up."),
    batch_size: int = typer.Option(SFTConfig.batch_size, "--batch-size", help="Examples per process per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    max_length: int = typer.Option(1024, "--max-length", help="Tokens per example (longer ones are truncated)."),
    eval_fraction: float = typer.Option(SFTConfig.eval_fraction, "--eval-fraction", help="Share of each source held out for the validation loss (0: none)."),
    eval_every: int = typer.Option(0, "--eval-every", help="Also log the validation loss every N optimizer steps (0: before and after training only)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the training batch."),
    queue: Optional[bool] = typer.Option(None, "--queue/--in-process", help="Run on the `train` queue (default when $MARCO_BROKER_URL is set)."),
    wait: bool = typer.Option(False, "--wait", help="With --queue: wait for the job and print its result."),
    db: Optional[str] = typer.Option(None, "--db", envvar="MARCO_DATABASE_URL", help="Store URL (default sqlite:///marco.db): the run and its checkpoint are recorded there."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fine-tune a model on CoT chats (loss on assistant tokens only), save a loadable checkpoint and register
    it in the store with its lineage (use it anywhere as --model checkpoint:ID).

    Several sources mix in one run (--source PATH[:WEIGHT], repeated): synthesis runs, `marco import-cot`
    outputs, instruction data. A validation split of each source gives the eval loss before and after.

    Example: marco sft --source synthesis:arith-r1 --source data/openo1:0.5 --epochs 2 --out runs/sft1
    """
    # issue 5: every run is a stored `train` job (a training_runs row, the checkpoint in `models`)
    from marco.cli.db import open_store
    from marco.cli.synthesize import queue_mode, run_inline, wait_batch
    from marco.pipeline.training import plan_training, training_run_id
    from marco.sft import SFTConfig
    from marco.store import StoreError

    held = [p for p in (out / "config.json", *out.glob("claim-*/config.json")) if p.exists()]
    if held:
        fail(f"{out} already holds a checkpoint ({held[0].parent}); choose a new --out directory")
    if not data and not source:
        fail("no training data: give --data PATH or one or more --source PATH[:WEIGHT]")
    if data and source:
        fail("give --data (one source) or --source (several), not both")
    try:
        config = SFTConfig(
            data=data or "", sources=list(source), base=base, output_dir=str(out), lora=lora, lora_r=lora_r,
            lora_alpha=lora_alpha, max_steps=max_steps, epochs=epochs, learning_rate=lr, warmup_ratio=warmup_ratio,
            batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, eval_fraction=eval_fraction,
            eval_every=eval_every, seed=seed, nproc=nproc, device=device,
        )  # fmt: skip
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    data = data or ", ".join(s["path"] for s in config.sources)
    store = open_store(db)
    dispatcher = queue_mode(queue)
    try:
        if base.startswith("checkpoint:"):
            store.checkpoint_path(base)
        batch_id, job_id = plan_training(store, config, config.data, name=name)
    except (FileNotFoundError, ValueError, StoreError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else repr(exc))
    run_id = training_run_id(job_id)
    console = Console(stderr=True)
    if dispatcher.distributed:
        dispatcher.enqueue([(job_id, "train")])
        console.print(f"training run {run_id} enqueued on `train` (batch {batch_id})", highlight=False)
        if not wait:
            typer.echo(run_id)
            return
        wait_batch(store, batch_id)
    else:
        with console.status(f"fine-tuning {base} on {data} ({nproc} process{'es' if nproc > 1 else ''})…"):
            outcome = run_inline(store, job_id)
        if outcome.status != "done":
            fail(str(outcome.error or outcome.status).split(": ", 1)[-1])
    run = store.get_training_run(run_id)
    if run.status != "done":
        fail(f"training run {run_id} {run.status}: {run.error}")
    model = f"checkpoint:{run.output_model_id}"
    if as_json:
        typer.echo(json.dumps({"checkpoint": run.checkpoint, "losses": run.losses, "metrics": run.metrics,
                               "model": model, "training_run": run_id}))  # fmt: skip
        return
    m = run.metrics
    typer.echo(f"checkpoint: {run.checkpoint}")
    typer.echo(f"model: {model}   (training run {run_id})")
    typer.echo(
        f"steps {m['steps']}  loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}  "
        f"tokens {m['tokens']}  {m['tokens_per_s']:.1f} tokens/s  on {m['world_size']} process(es)"
    )
    if m.get("eval_loss") is not None:
        typer.echo(f"eval loss {m['eval_loss_start']:.4f} -> {m['eval_loss']:.4f} on {m['eval_examples']} held-out examples")


@app.command("dpo")
def dpo_cmd(
    pairs: str = typer.Option(..., "--pairs", help="Preference pairs: the `datasets` directory or .jsonl that `marco synthesize --pairs/--step-pairs --pairs-out DIR` wrote."),
    base: str = typer.Option(..., "--base", help="The policy to start from, usually the SFT checkpoint (checkpoint:ID); its frozen copy is the reference model."),
    out: Path = typer.Option(Path("runs/dpo"), "--out", help="Output directory: the checkpoint (safetensors) and dpo_result.json."),
    beta: float = typer.Option(0.1, "--beta", help="DPO's beta: how far the policy may move from the reference."),
    lr: float = typer.Option(5e-6, "--lr", help="Peak learning rate."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help=f"Passes over the pairs (default {DEFAULT_EPOCHS:g} when --max-steps is not given). Not with --max-steps."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps instead of epochs. Not with --epochs."),
    batch_size: int = typer.Option(4, "--batch-size", help="Pairs per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    max_length: int = typer.Option(1024, "--max-length", help="Tokens per prompt + answer (longer ones are truncated)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    db: Optional[str] = typer.Option(None, "--db", envvar="MARCO_DATABASE_URL", help="Store URL (default sqlite:///marco.db): the run and its checkpoint are recorded there."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """The optional DPO stage after SFT: train a policy on preference pairs from the search trees (whole paths,
    or sibling steps with their shared prefix), save a loadable checkpoint and register it with its lineage
    (`checkpoint:ID`, usable as --model or --base). Runs in this process.

    Example: marco synthesize --batch B --step-pairs --pairs-out pairs/ && marco dpo --pairs pairs/ --base checkpoint:ID --max-steps 200
    """
    import uuid

    from marco.cli.db import open_store
    from marco.sft import base_model
    from marco.sft.dpo import DPOConfig, load_pairs, run_dpo
    from marco.store import StoreError
    from marco.store.rows import utcnow

    if out.exists() and (out / "config.json").exists():
        fail(f"{out} already holds a checkpoint; choose a new --out directory")
    run_id = str(uuid.uuid4())
    try:
        config = DPOConfig(
            pairs=pairs, base=base, output_dir=str(out.resolve()), beta=beta, learning_rate=lr, epochs=epochs,
            max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, seed=seed,
            device=device, run_id=run_id,
        )  # fmt: skip
        n_pairs = len(load_pairs(pairs))  # bad data fails here, before a model loads or a row is written
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc).splitlines()[0])
    store = open_store(db)
    try:
        if base.startswith("checkpoint:"):
            store.checkpoint_path(base)
    except StoreError as exc:
        fail(str(exc).splitlines()[0])
    store.create_training_run(run_id, base=base, data=pairs, n_examples=n_pairs,
                              hyperparameters={"stage": "dpo", **config.lineage_hyper()})  # fmt: skip
    store.update_training_run(run_id, status="running", started_at=utcnow(), base_model_id=store.ensure_model(base))
    try:
        with base_model.checkpoint_resolver(store.checkpoint_path), \
                Console(stderr=True).status(f"DPO on {n_pairs} preference pairs from {base}…"):
            result = run_dpo(config)
    except Exception as exc:  # recorded on the run, then one line for the user
        store.update_training_run(run_id, status="failed", error=f"{type(exc).__name__}: {exc}", finished_at=utcnow())
        fail(f"DPO failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    store.update_training_run(run_id, status="done", finished_at=utcnow(), losses=list(result.losses),
                              metrics=dict(result.metrics), checkpoint=result.checkpoint)  # fmt: skip
    model_id = store.register_checkpoint(run_id, result.checkpoint, base, result.lineage(), name=f"dpo-{run_id[:8]}")
    if as_json:
        typer.echo(json.dumps({"checkpoint": result.checkpoint, "losses": result.losses, "metrics": result.metrics,
                               "model": f"checkpoint:{model_id}", "training_run": run_id}))  # fmt: skip
        return
    m = result.metrics
    typer.echo(f"checkpoint: {result.checkpoint}")
    typer.echo(f"model: checkpoint:{model_id}   (training run {run_id})")
    typer.echo(f"steps {m['steps']}  loss {m['first_loss']:.4f} -> {m['final_loss']:.4f}  on {m['pairs']} pairs "
               f"({m['step_pairs']} sibling-step)  {m['tokens_per_s']:.1f} tokens/s")  # fmt: skip
