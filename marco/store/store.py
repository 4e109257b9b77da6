"""The :class:`Store` facade: one class over the store's parts, each with one job.

- :mod:`marco.store.base`: engine, sessions, bulk-insert helpers, the database clock;
- :mod:`marco.store.planning`: models, batches, their problems/jobs/searches; cancel, requeue, delete;
- :mod:`marco.store.queue`: the job state machine (claim, lease, end, expiry, batch closing);
- :mod:`marco.store.writes`: nodes, search status and results a running job writes;
- :mod:`marco.store.reads`: progress, traces, trees, what a job and the reports read;
- :mod:`marco.store.training`: CoT examples, training runs, checkpoints (issue 5);
- :mod:`marco.store.archive`: an ended batch's nodes to a verified file and back (issue 18).

Everything that touches many rows goes through Core bulk statements (a list of parameter rows per
statement), never ORM objects one by one, so planning 10,000 problems or writing a lockstep round of
hundreds of nodes costs a handful of round trips.
"""

from __future__ import annotations

from marco.store.archive import ArchiveMixin  # issue 18: ended batches' nodes to a file and back
from marco.store.planning import PlanningMixin
from marco.store.queue import QueueMixin
from marco.store.reads import ReadsMixin
from marco.store.rows import (  # noqa: F401  (re-exported: callers import these from here)
    BatchPlan,
    BatchProgress,
    JobClaim,
    _aware,
    _chunks,
    _is_uuid,
    node_to_row,
    problem_from_row,
    row_to_node,
    utcnow,
)
from marco.store.training import TrainingStoreMixin  # issue 5: cot_examples, training_runs, checkpoints
from marco.store.writes import NODE_TABLE, WritesMixin  # noqa: F401


class Store(QueueMixin, PlanningMixin, WritesMixin, ReadsMixin, TrainingStoreMixin, ArchiveMixin):
    """The project's database: one per URL/engine. Thread-safe like its engine; cheap to share.

    ``Store.open(url)`` checks that the database answers and brings its schema to the latest migration.
    """
