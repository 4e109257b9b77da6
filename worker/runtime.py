"""What one worker process keeps between jobs: its store connection and its loaded models.

Each pool process builds its own runtime on first use (after the fork), so database connections are
never shared between processes and CUDA is never initialised in a parent that forks. A model is loaded
once per process and spec, then reused by every job the process runs.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from worker.settings import QueueSettings


class StoreUnavailable(ConnectionError):
    """The database does not answer (the task retries with backoff)."""


class WorkerRuntime:
    """Lazily opened store and backend cache for the current process."""

    def __init__(self, settings: QueueSettings, name: str | None = None) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._store: Any = None
        self._backends: Any = None
        self._lock = threading.Lock()

    @property
    def store(self) -> Any:
        """The store at ``settings.database_url`` (``$MARCO_DATABASE_URL``), opened on first use."""
        with self._lock:
            if self._store is None:
                from marco.store import Store, StoreError
                from marco.store.migrate import SchemaTooNew

                try:
                    self._store = Store.open(self.settings.database_url)
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

                self._backends = BackendCache()
            return self._backends

    def preload(self, specs: list[str]) -> None:
        """Load ``specs`` now (in a pool process, after the fork) so the first job does not pay for it."""
        for spec in specs:
            self.backends.get(spec)

    def close(self) -> None:
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
        _runtime.name = name
    return _runtime


def reset() -> None:
    """Forget the runtime (called in each new pool process and at shutdown)."""
    global _runtime, _pid
    if _runtime is not None and _pid == os.getpid():
        _runtime.close()
    _runtime = None
    _pid = None
