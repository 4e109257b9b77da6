"""The Celery app follows the queue rules (no services needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.app import create_app
from worker.settings import QUEUE_FOR_TASK, QUEUES, TASK_FOR_KIND, QueueSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def app():
    return create_app(QueueSettings(broker_url="redis://127.0.0.1:6379/15", soft_time_limit_s=600, hard_time_limit_s=700))


def test_json_only_late_ack_prefetch_one(app) -> None:
    c = app.conf
    assert c.task_serializer == "json" and c.result_serializer == "json"
    assert list(c.accept_content) == ["json"]
    assert c.task_acks_late is True
    assert c.task_reject_on_worker_lost is True
    assert c.worker_prefetch_multiplier == 1
    assert c.task_ignore_result is True and not c.result_backend


def test_visibility_timeout_is_above_the_hard_limit(app) -> None:
    assert app.conf.task_time_limit == 700 and app.conf.task_soft_time_limit == 600
    assert app.conf.broker_transport_options["visibility_timeout"] > app.conf.task_time_limit


def test_every_task_has_limits_retries_and_its_queue(app) -> None:
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import OperationalError

    names = set(TASK_FOR_KIND.values())
    assert names <= set(app.tasks)
    for name in names:
        task = app.tasks[name]
        assert task.soft_time_limit == 600 and task.time_limit == 700
        assert task.acks_late and task.reject_on_worker_lost
        assert OperationalError in task.autoretry_for and BrokerError in task.autoretry_for
        assert task.retry_backoff and task.retry_jitter and task.max_retries >= 1
        route = app.amqp.router.route({}, name, args=["job"], kwargs={})
        assert route["queue"].name == QUEUE_FOR_TASK[name]
    for queue in QUEUES:  # each queue is fed by the task of the same name
        assert app.amqp.router.route({}, f"marco.{queue}", args=[], kwargs={})["queue"].name == queue


def test_hard_limit_must_exceed_soft_limit() -> None:
    with pytest.raises(ValueError, match="hard time limit"):
        QueueSettings(soft_time_limit_s=100, hard_time_limit_s=100)


def test_settings_from_env_reject_garbage_with_the_variable_name() -> None:
    with pytest.raises(ValueError, match="MARCO_LEASE_SECONDS"):
        QueueSettings.from_env({"MARCO_LEASE_SECONDS": "soon"})
    s = QueueSettings.from_env({"MARCO_BROKER_URL": "redis://h:1/2", "MARCO_TASK_SOFT_LIMIT": "50000"})
    assert s.distributed and s.hard_time_limit_s > 50000
    assert not QueueSettings.from_env({}).distributed


def test_importing_the_worker_never_imports_torch() -> None:
    # The prefork parent must not touch torch/CUDA; models load inside each pool process.
    code = "import sys, worker.app, worker.tasks, scheduler; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))"
    out = subprocess.run(
        [sys.executable, "-c", "import json;" + code],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
