"""Queue settings, read from the environment (nothing here imports Celery or torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

BROKER_ENV = "MARCO_BROKER_URL"
DATABASE_ENV = "MARCO_DATABASE_URL"

# Queue per job kind. `reason` and `train` want a GPU in production, `synthesize` is CPU work.
QUEUES: tuple[str, ...] = ("reason", "synthesize", "train")
TASK_FOR_KIND: dict[str, str] = {
    "reason": "marco.reason",
    "synthesize": "marco.synthesize",
    "train": "marco.train",
    "sleep": "marco.sleep",  # a job that only waits: the queue's own scaling, measured by the benchmark
}
QUEUE_FOR_TASK: dict[str, str] = {
    "marco.reason": "reason",
    "marco.synthesize": "synthesize",
    "marco.train": "train",
    "marco.sleep": "reason",
}


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"${name} must be a whole number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"${name} must be positive, got {value}")
    return value


@dataclass(frozen=True)
class QueueSettings:
    """Where the broker and the store are, and how long a job may run.

    ``lease_s`` is how long a job's lease in the store lasts between renewals; a worker that dies stops
    renewing it and the scheduler re-enqueues the job once it expires. ``visibility_timeout_s`` (Redis
    redelivers an unacknowledged message after it) is always above the hard time limit, otherwise a long
    job would be handed to a second worker while the first one is still running it. ``progress_timeout_s``
    ends a job that made no progress for that long (a hung model call), on every pool.
    """

    broker_url: str | None = None
    database_url: str | None = None
    soft_time_limit_s: int = 3 * 3600
    hard_time_limit_s: int = 3 * 3600 + 300
    lease_s: int = 120
    max_retries: int = 8
    retry_backoff_max_s: int = 600
    preload_timeout_s: int = 900  # how long a pool process may take to start (preloading its models)
    # a job with no progress (no lockstep round written, no training step) for this long is ended by its
    # heartbeat with that reason, whatever the pool (prefork, solo, threads): $MARCO_PROGRESS_TIMEOUT
    progress_timeout_s: int = 1800

    def __post_init__(self) -> None:
        if self.hard_time_limit_s <= self.soft_time_limit_s:
            raise ValueError(
                f"the hard time limit ({self.hard_time_limit_s}s) must be above the soft one "
                f"({self.soft_time_limit_s}s): the soft limit is what lets a job record why it stopped"
            )

    @property
    def visibility_timeout_s(self) -> int:
        return self.hard_time_limit_s + max(300, self.hard_time_limit_s // 10)

    @property
    def distributed(self) -> bool:
        """True when a broker is configured; otherwise jobs run in the submitting process."""
        return bool(self.broker_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "QueueSettings":
        env = os.environ if env is None else env
        soft = _int(env, "MARCO_TASK_SOFT_LIMIT", cls.soft_time_limit_s)
        hard = _int(env, "MARCO_TASK_HARD_LIMIT", max(cls.hard_time_limit_s, soft + 60))
        return cls(
            broker_url=env.get(BROKER_ENV) or None,
            database_url=env.get(DATABASE_ENV) or None,
            soft_time_limit_s=soft,
            hard_time_limit_s=hard,
            lease_s=_int(env, "MARCO_LEASE_SECONDS", cls.lease_s),
            max_retries=_int(env, "MARCO_TASK_MAX_RETRIES", cls.max_retries),
            retry_backoff_max_s=_int(env, "MARCO_RETRY_BACKOFF_MAX", cls.retry_backoff_max_s),
            preload_timeout_s=_int(env, "MARCO_PRELOAD_TIMEOUT", cls.preload_timeout_s),
            progress_timeout_s=_int(env, "MARCO_PROGRESS_TIMEOUT", cls.progress_timeout_s),
        )
