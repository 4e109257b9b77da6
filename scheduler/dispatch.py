"""Getting jobs to workers: a Celery message per job, or (with no broker) running them right here."""

from __future__ import annotations

import base64
import json
import logging
import time
from typing import Protocol, Sequence

from marco.store.urls import one_line, safe_url
from worker.settings import QUEUE_FOR_TASK, QUEUES, TASK_FOR_KIND, QueueSettings

MAX_PRIORITY = 9

log = logging.getLogger("marco.scheduler")


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


UNACKED = "_unacked"  # key of :meth:`CeleryDispatcher.held`'s count of delivered, unacknowledged messages


def _job_of(raw: bytes | str) -> str | None:
    """The job id a kombu Redis ``unacked`` entry (``[payload, exchange, routing_key]``) carries: the task's
    first argument, from the message body (Celery protocol 2: ``[args, kwargs, embed]``)."""
    try:
        payload = json.loads(raw)[0]
        body = payload["body"]
        if payload.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not a Marco task message: it covers no job


def queue_for_kind(kind: str) -> str:
    """The queue a job of ``kind`` is sent to."""
    return QUEUE_FOR_TASK.get(TASK_FOR_KIND.get(kind, ""), kind)


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
        return safe_url(self.settings.broker_url)

    def check(self, timeout_s: float = 3.0) -> None:
        try:
            with self.app.connection_for_write() as conn:  # type: ignore[attr-defined]
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, timeout=timeout_s)
        except Exception as exc:  # kombu wraps socket errors differently per transport
            reason = one_line(exc)
            raise BrokerUnavailable(
                f"broker {self._where()} does not answer ({reason}); start Redis or fix $MARCO_BROKER_URL "
                f"(unset it to run jobs in-process)"
            ) from exc

    def held(self) -> dict[str, int] | None:
        """Messages the broker holds now: ``{queue: waiting}`` for every Marco queue, plus :data:`UNACKED`
        (delivered to a worker, not yet acknowledged; Redis only). None when the broker cannot be asked: the
        scheduler then has no evidence of lost messages beyond their age."""
        try:
            with self.app.connection_for_read() as conn:  # type: ignore[attr-defined]
                channel = conn.default_channel
                out: dict[str, int] = {}
                for queue in QUEUES:
                    if hasattr(channel, "_size"):  # kombu's virtual transports (Redis): every priority list
                        out[queue] = int(channel._size(queue))
                    else:
                        out[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
                client, key = getattr(channel, "client", None), getattr(channel, "unacked_key", None)
                out[UNACKED] = int(client.hlen(key)) if client is not None and key else 0
                return out
        except Exception as exc:
            reason = one_line(exc)
            log.warning("cannot count the messages on %s (%s)", self._where(), reason)
            return None

    def unacked_jobs(self, max_age_s: float | None = None) -> list[str] | None:
        """The job ids of the messages delivered to a worker and not yet acknowledged, delivered at most
        ``max_age_s`` ago when given (Redis only; None when the broker cannot be asked). A worker killed with
        SIGKILL leaves its messages here until the visibility timeout (hours), long after their jobs were
        requeued and done, or never claimed at all: the count alone would hide them as messages in flight."""
        try:
            with self.app.connection_for_read() as conn:  # type: ignore[attr-defined]
                channel = conn.default_channel
                client, key = getattr(channel, "client", None), getattr(channel, "unacked_key", None)
                index = getattr(channel, "unacked_index_key", None)
                if client is None or not key:
                    return []
                if max_age_s is None or not index:
                    raws = client.hvals(key)
                else:
                    tags = client.zrangebyscore(index, time.time() - max_age_s, "+inf")
                    raws = [r for r in client.hmget(key, tags) if r is not None] if tags else []
                return [job for raw in raws if (job := _job_of(raw)) is not None]
        except Exception as exc:
            log.warning("cannot read the unacknowledged messages on %s (%s)", self._where(), one_line(exc))
            return None

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
            reason = one_line(exc)
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
