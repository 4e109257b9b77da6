"""One process-wide flag: the worker was asked to stop (SIGTERM). Running jobs stop after their current
round and hand their job back (see :mod:`marco.store.heartbeat`). Import-light on purpose: a signal
handler sets it."""

from __future__ import annotations

import threading

SHUTDOWN = threading.Event()
