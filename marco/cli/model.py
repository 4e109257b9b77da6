"""``marco model export``: the bundled model as a folder other engines load (vLLM reads no GGUF)."""

from __future__ import annotations

import typer

from marco.cli import app

model_app = typer.Typer(help="The bundled model: export it for engines that read no GGUF (vLLM).", no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("export")
def export(
    model: str = typer.Argument(..., help="smollm2 (the bundled GGUF) or a path to a .gguf file."),
    out: str = typer.Argument(..., help="Folder to write: config.json, model.safetensors, tokenizer files."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights' dtype in the folder: float32 (the GGUF's dequantised values) or bfloat16."),
) -> None:
    """Write MODEL as a safetensors folder; serve it with vLLM (`--model vllm:OUT`).

    Example: marco model export smollm2 ./smollm2-st   (then: marco solve "..." --model vllm:./smollm2-st)
    `vllm:smollm2` does this once by itself, into ~/.cache/marco/models/.
    """
    from marco.llm.export import export_gguf, gguf_location

    try:
        gguf = gguf_location(model)
    except FileNotFoundError:
        gguf = None
    if gguf is None:
        typer.echo(f"error: {model!r} is neither smollm2 nor a .gguf file", err=True)
        raise typer.Exit(1)
    folder, file = gguf
    path = export_gguf(folder, file, out, dtype)
    typer.echo(str(path))
