"""Command lines for a worker and for Flower, shared by ``marco worker``/``marco flower`` and the tests."""

from __future__ import annotations

import os
import sys
from typing import Sequence

from worker.settings import QUEUES

POOLS = ("prefork", "solo", "threads")


def parse_queues(queues: str | Sequence[str]) -> list[str]:
    """``"reason,synthesize"`` -> ``["reason", "synthesize"]``; unknown names raise ``ValueError``."""
    names = [q.strip() for q in (queues.split(",") if isinstance(queues, str) else queues) if q.strip()]
    unknown = [q for q in names if q not in QUEUES]
    if not names or unknown:
        raise ValueError(f"unknown queue(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(QUEUES)}")
    return names


def worker_argv(
    queues: str | Sequence[str] = QUEUES,
    concurrency: int = 1,
    name: str = "marco@%h",
    pool: str = "prefork",
    loglevel: str = "INFO",
) -> list[str]:
    """Arguments after ``celery -A worker.app`` that start a worker.

    Concurrency defaults to 1: a worker process holds one model, and one model per GPU is the usual
    deployment. Gossip and mingle are off (workers share nothing but the store, and startup is faster);
    events stay on for Flower.
    """
    if concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; choose from {', '.join(POOLS)}")
    return [
        "worker",
        "--queues", ",".join(parse_queues(queues)),
        "--concurrency", str(concurrency),
        "--hostname", name,
        "--pool", pool,
        "--loglevel", loglevel,
        "--prefetch-multiplier", "1",
        "--task-events",
        "--without-gossip",
        "--without-mingle",
    ]


def flower_argv(port: int = 5555, address: str = "127.0.0.1", basic_auth: str | None = None, url_prefix: str = "") -> list[str]:
    """Arguments after ``celery -A worker.app`` that start Flower with basic auth.

    ``basic_auth`` is ``user:password`` (comma-separated for several users), default
    ``$FLOWER_BASIC_AUTH``; Flower is never started without it, nor with a placeholder password. Basic auth
    does not cover ``/metrics`` and ``/healthcheck`` (Flower 2.2 serves them to anyone), hence the
    localhost default: reach it from elsewhere through a proxy (docs/operations.md).
    """
    from worker.credentials import basic_auth_problems

    auth = basic_auth or os.environ.get("FLOWER_BASIC_AUTH")
    if not auth or ":" not in auth:
        raise ValueError("Flower needs basic auth: pass --basic-auth user:password or set FLOWER_BASIC_AUTH")
    problems = basic_auth_problems(auth, "Flower's basic auth")
    if problems:
        raise ValueError("; ".join(problems) + ": choose a real password (e.g. `openssl rand -hex 24`)")
    # the credentials go to Flower through $FLOWER_BASIC_AUTH (flower_env), never on its command line,
    # where `ps` and `docker inspect` show them
    argv = ["flower", f"--port={port}", f"--address={address}"]
    if url_prefix:
        argv.append(f"--url-prefix={url_prefix}")
    return argv


def flower_env(basic_auth: str | None = None) -> dict[str, str]:
    """The environment that gives Flower its basic auth (``$FLOWER_BASIC_AUTH``, which Flower reads itself)."""
    auth = basic_auth or os.environ.get("FLOWER_BASIC_AUTH") or ""
    return {"FLOWER_BASIC_AUTH": auth}


STOP_MARGIN_S = 30  # handing the lease back and closing connections, with room for a slow database


def stop_grace_s(lease_s: int, round_s: int | None = None) -> int:
    """Seconds a worker needs between SIGTERM and exit: finish its round, hand back its lease, exit.

    ``round_s`` is the longest round expected (one generation step of every running search); by default
    the lease, which deployments size above a round. Add the margin for the release. Compose's
    ``stop_grace_period`` is this (``MARCO_STOP_GRACE_PERIOD``, default ``120 + 30 = 150s`` for the default
    lease). A worker killed past it loses only the round it was in: its lease expires and the scheduler
    re-enqueues the job, which resumes from its stored rounds.
    """
    return (lease_s if round_s is None else round_s) + STOP_MARGIN_S


def celery_command(argv: Sequence[str]) -> list[str]:
    """A full command line running ``celery -A worker.app ARGV`` with this interpreter."""
    return [sys.executable, "-m", "celery", "-A", "worker.app", *argv]
