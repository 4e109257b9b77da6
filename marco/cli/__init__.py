"""The ``marco`` command line. Each command group lives in its own module and registers on ``app``."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="marco",
    help="Marco-o1 style reasoning search at batch scale: MCTS over LLM generations, scored by token confidence.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # help texts are plain text: specs like server[+llamacpp]:http://HOST[/v1] must not be read as markup
    rich_markup_mode=None,
)

# Command modules register themselves on `app` when imported (keep one import per module).
from marco.cli import solve as _solve  # noqa: E402,F401
from marco.cli import run as _run  # noqa: E402,F401
from marco.cli import db as _db  # noqa: E402,F401
from marco.cli import traces as _traces  # noqa: E402,F401
from marco.cli import report as _report  # noqa: E402,F401
from marco.cli import queue as _queue  # noqa: E402,F401
from marco.cli import data as _data  # noqa: E402,F401
from marco.cli import synthesize as _synthesize  # noqa: E402,F401
from marco.cli import pipeline as _pipeline  # noqa: E402,F401
from marco.cli import export as _export  # noqa: E402,F401
from marco.cli import ui as _ui  # noqa: E402,F401
from marco.cli import compare as _compare  # noqa: E402,F401
from marco.cli import model as _model  # noqa: E402,F401
from marco.cli import archive as _archive  # noqa: E402,F401


def main() -> None:
    from marco.store.urls import install_redaction

    install_redaction()  # no password of a database or broker URL in an error, a log line or a traceback
    app()
