"""The trace store: every batch, job, problem, search and tree node, in Postgres or SQLite.

``Store.open(url)`` connects (and migrates); :class:`StoreSink` persists a running search round by round;
``Store.load_nodes`` hands a stored search back to the driver to continue.
"""

from marco.store.db import DEFAULT_URL, ENV_VAR, StoreError, default_url, make_engine, normalize_url
from marco.store.sink import LeaseLost, StoreSink
from marco.store.store import BatchPlan, BatchProgress, JobClaim, Store

__all__ = [
    "DEFAULT_URL",
    "ENV_VAR",
    "BatchPlan",
    "BatchProgress",
    "JobClaim",
    "LeaseLost",
    "Store",
    "StoreError",
    "StoreSink",
    "default_url",
    "make_engine",
    "normalize_url",
]
