"""Keep a job's lease alive while a long step (synthesis, training) runs outside any lockstep round."""

from __future__ import annotations

import threading
from typing import Any


class LeaseKeeper:
    """Renews ``job_id``'s lease every ``lease_s / 3`` seconds from a daemon thread while in its block.

    ``lost`` turns True when a renewal finds the lease gone (it expired and another worker took the job):
    the caller must then not write the job's outcome.
    """

    def __init__(self, store: Any, job_id: str, worker: str, lease_s: float) -> None:
        self.store, self.job_id, self.worker, self.lease_s = store, job_id, worker, lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id[:8]}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(max(1.0, self.lease_s / 3)):
            try:
                if not self.store.renew_lease(self.job_id, self.worker, self.lease_s):
                    self.lost = True
                    return
            except Exception:  # the database blinked: try again next period, the lease has slack
                continue

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
