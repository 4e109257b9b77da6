"""The Celery application: configuration and routing only (tasks live in :mod:`worker.tasks`).

``celery -A worker.app worker`` (or ``marco worker``) finds ``app`` here. Importing this module imports
neither torch nor any backend: models are loaded lazily, inside each pool process, after the fork.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from worker.settings import QUEUE_FOR_TASK, QUEUES, QueueSettings
from worker.tasks import register_tasks


def preload_alive_timeout(settings: QueueSettings) -> float:
    """Seconds a new pool process may take before Celery gives up on it: 4 s (Celery's default) plus
    ``settings.preload_timeout_s`` when ``$MARCO_PRELOAD_MODELS`` names models to load at process start."""
    import os

    return 4.0 + (float(settings.preload_timeout_s) if os.environ.get("MARCO_PRELOAD_MODELS", "").strip() else 0.0)


def create_app(settings: QueueSettings | None = None) -> Celery:
    from marco.store.urls import install_redaction

    install_redaction()  # the worker's and Flower's logs never show a URL's password
    """A Celery app for ``settings`` (default: from the environment).

    With no broker configured the app still exists (tasks are plain functions the scheduler calls
    in-process), it just points at kombu's in-memory transport so nothing tries to reach Redis.
    """
    settings = settings or QueueSettings.from_env()
    app = Celery("marco", broker=settings.broker_url or "memory://", set_as_current=False)
    app.conf.update(
        # JSON only: a message is a job id, never a pickled object.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        # The store is the source of truth; Celery results are never read.
        result_backend=None,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        # A message is acknowledged only once its job has finished, and a worker takes one at a time, so a
        # worker that dies mid-job leaves its message to be delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.soft_time_limit_s,
        task_time_limit=settings.hard_time_limit_s,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Batch priorities: Redis keeps one list per priority step and serves the lowest number first.
            "queue_order_strategy": "priority",
            "priority_steps": list(range(10)),
            "sep": ":",
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="reason",
        task_routes={name: {"queue": queue} for name, queue in QUEUE_FOR_TASK.items()},
        task_create_missing_queues=False,
        # Events for Flower and `celery events`.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # A pool process must report ready within this time (Celery's default is 4 s); preloading a model in
        # worker_process_init counts, so the limit follows $MARCO_PRELOAD_TIMEOUT when models are preloaded.
        worker_proc_alive_timeout=preload_alive_timeout(settings),
    )
    app.conf.marco_settings = settings
    register_tasks(app)
    return app


app = create_app()
