"""What one worker process keeps between jobs: its store connection and its loaded models.

Each pool process builds its own runtime on first use (after the fork), so database connections are
never shared between processes and CUDA is never initialised in a parent that forks. A model is loaded
once per process and spec, then reused by every job the process runs.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from typing import Any

from worker.settings import QueueSettings

MODEL_SERVER_ENV = "MARCO_MODEL_SERVER"


def server_routes(value: str) -> dict[str, str]:
    """``$MARCO_MODEL_SERVER`` as ``{batch model spec: server spec}`` (``"*"``: every model).

    Either one server spec or URL (``http://vllm:8000`` or ``server+vllm:http://vllm:8000/v1#qwen``) that
    serves every batch, or ``MODEL=SERVER,...`` pairs (``smollm2=server+llamacpp:http://127.0.0.1:8080``)
    for a worker whose server holds some of the models (the others load locally).
    """
    from marco.llm.served import server_spec_from_env

    routes: dict[str, str] = {}
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        if item.startswith(("server", "http://", "https://")):
            routes["*"] = server_spec_from_env(item)
        else:
            model, sep, target = item.partition("=")
            if not sep or not target.strip():
                raise ValueError(f"${MODEL_SERVER_ENV}: {item!r} is neither a server URL nor MODEL=SERVER")
            routes[model.strip()] = server_spec_from_env(target)
    return routes


def backend_loader(env: "os._Environ[str] | dict[str, str] | None" = None) -> Any:
    """The model loader of this worker: batches go to ``$MARCO_MODEL_SERVER`` when it is set (a batch that
    names a server spec itself, or a model the routes do not cover, loads as named)."""
    from marco.llm import load_backend

    env = os.environ if env is None else env
    routes = server_routes(env.get(MODEL_SERVER_ENV, ""))
    if not routes:
        return load_backend

    def load(spec: str) -> Any:
        target = routes.get(spec, routes.get("*"))
        if target is None or spec.startswith(("server:", "server+", "scripted")):
            return load_backend(spec)
        return load_backend(target)

    return load


# One idle connection per worker process (SQLAlchemy's default keeps up to 5): a job and its heartbeat take
# a second one only while both hold it at once, closed when returned. Measured by bench/fleet.py: 16
# workers held 36 connections with the default pool and 20 with this one (docs/operations.md, "Capacity").
WORKER_POOL: dict[str, int] = {"pool_size": 1, "max_overflow": 4}


class StoreUnavailable(ConnectionError):
    """The database does not answer (the task retries with backoff)."""


class WorkerRuntime:
    """Lazily opened store and backend cache for the current process."""

    def __init__(self, settings: QueueSettings, name: str | None = None) -> None:
        self.settings = settings
        # Random per process and run: two containers with one hostname and pid never share a name. The
        # name alone never lets a claim take another's lease (claims are fenced by token), it says who.
        self.nonce = secrets.token_hex(4)
        self.name = self.named(name)
        # job id -> fencing token of this process's latest claim: a retry after a transient error takes
        # back exactly that claim, never a lease another thread of this process holds under the same name
        self.claims: dict[str, int] = {}
        self._store: Any = None
        self._backends: Any = None
        self._lock = threading.Lock()

    def named(self, base: str | None = None) -> str:
        """``BASE:NONCE`` (default base ``hostname:pid``)."""
        return f"{base or f'{socket.gethostname()}:{os.getpid()}'}:{self.nonce}"

    @property
    def store(self) -> Any:
        """The store at ``settings.database_url`` (``$MARCO_DATABASE_URL``), opened on first use."""
        with self._lock:
            if self._store is None:
                from marco.store import Store, StoreError
                from marco.store.db import pool_kwargs
                from marco.store.migrate import SchemaTooNew

                try:
                    # SQLite has no pool to size; a Postgres worker takes $MARCO_DB_POOL_SIZE/_MAX_OVERFLOW
                    url = self.settings.database_url or ""
                    kwargs = {**WORKER_POOL, **pool_kwargs()} if url.startswith(("postgres", "postgresql")) else {}
                    self._store = Store.open(self.settings.database_url, **kwargs)
                except SchemaTooNew:
                    raise  # not transient: this worker's code is older than the database
                except StoreError as exc:  # unreachable database: a transient error, worth a retry
                    raise StoreUnavailable(str(exc)) from exc
            return self._store

    @property
    def backends(self) -> Any:
        """The process's :class:`marco.jobs.BackendCache` (models keyed by spec, loaded on first use)."""
        with self._lock:
            if self._backends is None:
                from marco.jobs import BackendCache

                self._backends = BackendCache(backend_loader())
            return self._backends

    def preload(self, specs: list[str]) -> None:
        """Load ``specs`` now (in a pool process, after the fork) so the first job does not pay for it."""
        for spec in specs:
            self.backends.get(spec)

    def close(self) -> None:
        if self._backends is not None:  # vLLM engines and the servers started for them end with the worker
            self._backends.close()
            self._backends = None
        if self._store is not None and hasattr(self._store, "close"):
            self._store.close()
        self._store = None


_runtime: WorkerRuntime | None = None
_pid: int | None = None


def current(settings: QueueSettings | None = None, name: str | None = None) -> WorkerRuntime:
    """This process's runtime; a forked child never inherits its parent's (it builds a fresh one)."""
    global _runtime, _pid
    if _runtime is None or _pid != os.getpid():
        _runtime = WorkerRuntime(settings or QueueSettings.from_env(), name=name)
        _pid = os.getpid()
    elif name is not None:
        _runtime.name = _runtime.named(name)
    return _runtime


def reset() -> None:
    """Forget the runtime (called in each new pool process and at shutdown)."""
    global _runtime, _pid
    if _runtime is not None and _pid == os.getpid():
        _runtime.close()
    _runtime = None
    _pid = None
