"""``marco ui``: the read-only trace explorer in the browser."""

from __future__ import annotations

import os

import typer

from marco.cli import app
from marco.cli.db import DbOption, fail
from marco.store.db import StoreError, default_url


@app.command("ui")
def ui(
    db: str = DbOption,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but localhost needs a token."),
    port: int = typer.Option(8765, "--port", help="Port to listen on."),
    token: str = typer.Option(
        None, "--token", envvar="MARCO_UI_TOKEN", show_envvar=True,
        help="Require this token on every request (header 'Authorization: Bearer T', or open the page once with ?token=T). "
        "Required when --host is not a loopback address.",
    ),
    allowed_hosts: list[str] = typer.Option(
        None, "--allowed-host", envvar="MARCO_UI_ALLOWED_HOSTS", show_envvar=True,
        help="A Host name the explorer answers (repeat it; the variable takes a comma-separated list; '*': any). "
        "Default: the bound host, localhost, 127.0.0.1 and [::1]; any other Host is refused (DNS rebinding).",
    ),
    decode_tokens: bool = typer.Option(
        True, "--decode-tokens/--no-decode-tokens",
        help="Colour node text token by token, loading each model's tokenizer once (off: colour blocks per token).",
    ),
) -> None:
    """Browse stored batches, searches and trees: http://HOST:PORT/ (JSON under /api/...). Never writes."""
    from marco.ui.app import UISettings, create_app

    hosts = tuple(h.strip() for item in (allowed_hosts or []) for h in item.split(",") if h.strip()) or None
    settings = UISettings(db=db or default_url(), host=host, port=port, token=token or None, decode_tokens=decode_tokens,
                          allowed_hosts=hosts)  # fmt: skip
    try:
        application = create_app(settings)
    except (ValueError, StoreError) as exc:
        fail(str(exc))
    import uvicorn

    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    typer.echo(f"marco ui on http://{shown}:{port}/" + ("?token=…" if settings.token else "") + "  (Ctrl-C stops)")
    uvicorn.run(application, host=host, port=port, log_level=os.environ.get("MARCO_UI_LOG", "warning"))
