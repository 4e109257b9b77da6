"""Getting jobs to workers: a Celery message per job, or (with no broker) running them right here."""

from __future__ import annotations

from typing import Protocol, Sequence

from worker.settings import TASK_FOR_KIND, QueueSettings

MAX_PRIORITY = 9


class BrokerUnavailable(RuntimeError):
    """The broker does not answer (one-line message that says what to do)."""


class Dispatcher(Protocol):
    """Hands jobs (``(job_id, kind)``) to whatever executes them."""

    distributed: bool

    def check(self) -> None:
        """Raise :class:`BrokerUnavailable` when jobs could not be handed over right now."""
        ...

    def enqueue(self, jobs: Sequence[tuple[str, str]], priority: int = 0) -> None:
        ...


def task_name(kind: str) -> str:
    try:
        return TASK_FOR_KIND[kind]
    except KeyError:
        raise ValueError(f"no task runs jobs of kind {kind!r}; known kinds: {', '.join(TASK_FOR_KIND)}") from None


class CeleryDispatcher:
    """One message per job on the job kind's queue, all sent over one broker connection.

    ``priority`` is the batch's priority, 0-9, higher first (Redis serves the lower Celery priority
    number first, hence the flip).
    """

    distributed = True

    def __init__(self, settings: QueueSettings | None = None, app: object | None = None) -> None:
        from worker.app import create_app

        self.settings = settings or QueueSettings.from_env()
        self.app = app or create_app(self.settings)

    def _where(self) -> str:
        from kombu.utils.url import maybe_sanitize_url

        return str(maybe_sanitize_url(self.settings.broker_url or ""))

    def check(self, timeout_s: float = 3.0) -> None:
        try:
            with self.app.connection_for_write() as conn:  # type: ignore[attr-defined]
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=timeout_s)
        except Exception as exc:  # kombu wraps socket errors differently per transport
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BrokerUnavailable(
                f"broker {self._where()} does not answer ({reason}); start Redis or fix $MARCO_BROKER_URL "
                f"(unset it to run jobs in-process)"
            ) from exc

    def enqueue(self, jobs: Sequence[tuple[str, str]], priority: int = 0) -> None:
        celery_priority = MAX_PRIORITY - max(0, min(MAX_PRIORITY, priority))
        try:
            with self.app.producer_or_acquire() as producer:  # type: ignore[attr-defined]
                for job_id, kind in jobs:
                    self.app.send_task(  # type: ignore[attr-defined]
                        task_name(kind), args=[job_id], producer=producer, priority=celery_priority, retry=False
                    )
        except ValueError:
            raise
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BrokerUnavailable(f"could not enqueue on {self._where()} ({reason}); is Redis up?") from exc


class InlineDispatcher:
    """No broker: each job runs to completion in this process, through the same task function."""

    distributed = False

    def __init__(self, settings: QueueSettings | None = None, store: object | None = None) -> None:
        from worker import runtime

        self.settings = settings or QueueSettings.from_env()
        self.runtime = runtime.current(self.settings)
        if store is not None:
            self.runtime._store = store  # share the caller's store instead of opening a second engine

    def check(self) -> None:
        return None

    def enqueue(self, jobs: Sequence[tuple[str, str]], priority: int = 0) -> None:
        from worker.tasks import run_job

        for job_id, kind in jobs:
            task_name(kind)
            run_job(job_id, self.runtime)


def make_dispatcher(settings: QueueSettings | None = None, store: object | None = None) -> Dispatcher:
    """Celery when ``$MARCO_BROKER_URL`` is set, in-process otherwise."""
    settings = settings or QueueSettings.from_env()
    if settings.distributed:
        return CeleryDispatcher(settings)
    return InlineDispatcher(settings, store=store)
