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


def flower_argv(port: int = 5555, address: str = "0.0.0.0", basic_auth: str | None = None, url_prefix: str = "") -> list[str]:
    """Arguments after ``celery -A worker.app`` that start Flower with basic auth.

    ``basic_auth`` is ``user:password`` (comma-separated for several users), default
    ``$FLOWER_BASIC_AUTH``; Flower is never started without it.
    """
    auth = basic_auth or os.environ.get("FLOWER_BASIC_AUTH")
    if not auth or ":" not in auth:
        raise ValueError("Flower needs basic auth: pass --basic-auth user:password or set FLOWER_BASIC_AUTH")
    argv = ["flower", f"--port={port}", f"--address={address}", f"--basic-auth={auth}"]
    if url_prefix:
        argv.append(f"--url-prefix={url_prefix}")
    return argv


def celery_command(argv: Sequence[str]) -> list[str]:
    """A full command line running ``celery -A worker.app ARGV`` with this interpreter."""
    return [sys.executable, "-m", "celery", "-A", "worker.app", *argv]
