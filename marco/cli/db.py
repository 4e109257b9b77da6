"""``marco db``: apply migrations and check that models and migrations agree.

Also the ``--db`` option and :func:`open_store` every store-touching command shares.
"""

from __future__ import annotations

from typing import NoReturn

import typer

from marco.cli import app
from marco.store.db import ENV_VAR, StoreError, default_url
from marco.store.urls import safe_url

db_app = typer.Typer(help="The trace store's schema: upgrade, check.", no_args_is_help=True)
app.add_typer(db_app, name="db")

DbOption = typer.Option(
    None, "--db", envvar=ENV_VAR, show_envvar=True,
    help="Database URL: sqlite:///marco.db (default) or postgresql://user@host/db.",
)


def fail(message: str) -> NoReturn:
    """Print a one-line error and exit with status 1."""
    from marco.store.urls import redact

    typer.echo(f"error: {redact(message)}", err=True)
    raise typer.Exit(1)


def open_store(url: str | None, upgrade: bool = True):  # type: ignore[no-untyped-def]
    """The store at ``url`` (or ``$MARCO_DATABASE_URL``, or sqlite:///marco.db), migrated; errors exit 1."""
    from marco.store import Store

    try:
        return Store.open(url or default_url(), upgrade=upgrade)
    except StoreError as exc:
        fail(str(exc))


def load_model(spec: str, store):  # type: ignore[no-untyped-def]
    """``load_backend(spec)``, with ``checkpoint:ID`` resolved through ``store``; a bad spec exits 1."""
    from marco.llm import checkpoint_resolver, load_backend
    from marco.llm.engine_map import EngineProtocolError

    try:
        with checkpoint_resolver(store.checkpoint_path):
            return load_backend(spec)
    except (StoreError, OSError) as exc:  # OSError: a missing file or directory, a hub id that cannot be fetched
        fail(str(exc).splitlines()[0])  # (a model server that does not answer is a ConnectionError, an OSError)
    except (ValueError, EngineProtocolError) as exc:  # a malformed server spec, a server of another protocol
        fail(str(exc).splitlines()[0])


@db_app.command("upgrade")
def upgrade(
    db: str = DbOption,
    revision: str = typer.Option("head", "--revision", help="Target revision."),
) -> None:
    """Apply the migrations in migrations/ to the database.

    Connect to Postgres itself, never through PgBouncer: a URL marked ?pgbouncer=1 (or
    $MARCO_DB_PGBOUNCER=1) is refused. Workers and the scheduler may then use the PgBouncer URL."""
    from marco.store import migrate

    store = open_store(db, upgrade=False)
    try:
        before = migrate.current_revision(store.engine)
        migrate.upgrade(store.engine, revision)
        after = migrate.current_revision(store.engine)
    except Exception as exc:  # a failed migration leaves the database at its previous revision
        fail(f"upgrade failed: {str(exc).splitlines()[0]}")
    typer.echo(f"{safe_url(store.engine.url)}: {before or 'empty'} -> {after}")


@db_app.command("downgrade")
def downgrade(
    revision: str = typer.Argument(..., help="Target revision ('base' drops every table)."),
    db: str = DbOption,
) -> None:
    """Revert migrations down to REVISION."""
    from marco.store import migrate

    store = open_store(db, upgrade=False)
    try:
        migrate.downgrade(store.engine, revision)
    except StoreError as exc:
        fail(str(exc))
    typer.echo(f"now at {migrate.current_revision(store.engine) or 'base'}")


@db_app.command("check")
def check(db: str = DbOption) -> None:
    """Fail (exit 1) unless the database is at the latest migration and matches the models exactly."""
    from marco.store import migrate

    store = open_store(db, upgrade=False)
    current, head = migrate.current_revision(store.engine), migrate.head_revision()
    if current != head:
        fail(f"database is at revision {current or 'none'}, migrations head is {head}: run `marco db upgrade`")
    diffs = migrate.diff(store.engine)
    if diffs:
        for d in diffs:
            typer.echo(f"  {d}", err=True)
        fail(f"models and migrations disagree ({len(diffs)} differences): write a migration "
             "(alembic revision --autogenerate)")
    typer.echo(f"ok: revision {head}, models and migrations agree")
