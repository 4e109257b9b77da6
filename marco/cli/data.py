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
    data: str = typer.Option(..., "--data", help="Training chats: a `datasets` directory, a .jsonl or .parquet file, or synthesis:RUN (a stored synthesis run, its name, or the batch it came from)."),
    base: str = typer.Option("smollm2", "--base", help="Base model: smollm2, a .gguf file, a model directory, hub id or checkpoint:ID."),
    out: Path = typer.Option(Path("runs/sft"), "--out", help="Output directory (the checkpoint and its logs)."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (merged into the saved checkpoint)."),
    lora_r: int = typer.Option(16, "--lora-r", help="LoRA rank."),
    lora_alpha: int = typer.Option(32, "--lora-alpha", help="LoRA alpha."),
    nproc: int = typer.Option(1, "--nproc", help="Processes under torchrun (data sharded across them)."),
    max_steps: int = typer.Option(100, "--max-steps", help="Optimizer steps (0: --epochs passes over the data)."),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the data when --max-steps is 0."),
    lr: float = typer.Option(1e-5, "--lr", help="Peak learning rate."),
    batch_size: int = typer.Option(4, "--batch-size", help="Examples per process per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    max_length: int = typer.Option(1024, "--max-length", help="Tokens per example (longer ones are truncated)."),
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

    Example: marco sft --data synthesis:mgsm-en --base smollm2 --lora --nproc 2 --max-steps 200 --out runs/sft1
    """
    # issue 5: every run is a stored `train` job (a training_runs row, the checkpoint in `models`)
    from marco.cli.db import open_store
    from marco.cli.synthesize import queue_mode, run_inline, wait_batch
    from marco.pipeline.training import plan_training, training_run_id
    from marco.sft import SFTConfig
    from marco.store import StoreError

    if out.exists() and (out / "config.json").exists():
        fail(f"{out} already holds a checkpoint; choose a new --out directory")
    try:
        config = SFTConfig(
            data=data, base=base, output_dir=str(out), lora=lora, lora_r=lora_r, lora_alpha=lora_alpha,
            max_steps=max_steps, epochs=epochs, learning_rate=lr, batch_size=batch_size, grad_accum=grad_accum,
            max_length=max_length, seed=seed, nproc=nproc, device=device,
        )  # fmt: skip
    except ValueError as exc:
        fail(str(exc).splitlines()[0])
    store = open_store(db)
    dispatcher = queue_mode(queue)
    try:
        if base.startswith("checkpoint:"):
            store.checkpoint_path(base)
        batch_id, job_id = plan_training(store, config, data, name=name)
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
