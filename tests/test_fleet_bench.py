"""bench/fleet.py at its smallest: real worker processes, Redis and Postgres, a kill and a slow worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fleet_bench_runs_at_minimal_size() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet.py"), "--sizes", "1", "--problems", "64", "--batches", "2",
         "--chunk", "2", "--round-s", "0.2", "--window", "8", "--warmup", "2", "--kill-sizes", "2", "--kill-every", "4",
         "--slow-factor", "3", "--hostage-workers", "2", "--base-port", "19250"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=380,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("fleet_scaling_efficiency_16: ")
    assert float(lines[-1].split(": ")[1]) == pytest.approx(1.0)  # one worker against itself
    table = lines[lines.index("all sizes (window 8s each):") + 1:]
    head = table[0].split()
    rows = {r.split()[0]: dict(zip(head[1:], r.split()[1:])) for r in table[1:3]}
    assert float(rows["1"]["probl/s"]) > 0 and float(rows["1"]["nodes/s"]) > 0
    assert rows["2+kill/4s"]["killed"] != "0"
    assert rows["1"]["dup_nodes"] == rows["2+kill/4s"]["dup_nodes"] == "0"  # no tree position written twice
    hostage = next(line for line in lines if line.startswith("hostage:"))
    assert "not done 0" in hostage


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_fleet_bench_submit_during_at_minimal_size() -> None:
    """--submit-during: 2 workers busy on a backlog while 3,000 problems are submitted in 10 chunks."""
    import json

    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet.py"), "--sizes", "2", "--problems", "200", "--batches", "1",
         "--chunk", "1", "--round-s", "0.02", "--window", "5", "--warmup", "3", "--submit-during", "3000",
         "--submit-chunk", "2", "--submit-rows-per-txn", "300", "--base-port", "19270"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=110,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("submit_during_claim_p99_ratio: ")
    r = json.loads(next(line for line in lines if line.startswith("submit_during: ")).split(": ", 1)[1])
    for prefix in ("  submission: ", "  claims before ", "  lock waits ", "  progress: ", "  integrity: "):
        assert any(line.startswith(prefix) for line in lines), prefix
    assert r["chunks"] == 10 and r["submit_s"] > 0 and r["rows_s"] > 0
    assert r["chunk_write_max_ms"] >= r["chunk_write_median_ms"] > 0
    assert r["claims_before"] > 0 and r["claims_during"] > 0  # the fleet kept claiming while the batch was written
    assert r["claim_during_p99_ms"] > 0 and r["claim_p99_ratio"] > 0
    assert r["lock_samples_during"] > 0
    # progress showed: the batch was in `marco status` while written, and its early jobs ran before the last chunk
    assert r["status_samples"] > 0 and r["claimed_before_last_chunk"] > 0
    # nothing lost, nothing twice
    assert r["jobs"] == r["jobs_expected"] == r["jobs_distinct"] == r["plan_jobs_distinct"] == r["messages_sent"] == 1500
    assert r["problems_stored"] == 3000 and r["searches"] == r["searched_problems"] == 3000
    # not closed before the last chunk: open afterwards (its jobs are still queued), the marker gone
    assert not r["closed_early"] and r["status_closed_while_submitting"] == 0
    assert r["batch_status_after"] in ("queued", "running") and not r["submitting_marker_after"]


def test_lock_sampler_sees_a_claim_waiting_on_a_row_lock(pg_database) -> None:
    """The sampler behind --submit-during's lock-wait figure: a claim blocked by a transaction holding its job."""
    import threading
    import time

    from sqlalchemy import text

    sys.path.insert(0, str(ROOT / "bench"))
    import fleet

    from marco.search.base import SearchConfig
    from marco.store import Store
    from marco.tasks.base import Problem

    url = pg_database()
    store = Store.open(url)
    plan = store.create_batch([Problem("demo", "en", 0, "q", ("42",))], [SearchConfig(strategy="greedy")], model="scripted", task="demo")
    job_id = plan.job_ids[0]
    sampler = fleet.LockSampler(url, url.rsplit("/", 1)[1], 0.02)
    sampler.phase = "during"
    sampler.start()
    with store.engine.connect() as holder:
        holder.execute(text("SELECT id FROM jobs WHERE id = :j FOR UPDATE"), {"j": job_id})
        claim = threading.Thread(target=store.claim_job, args=(job_id, "w", 60))
        claim.start()
        time.sleep(0.6)
        holder.rollback()
    claim.join(10)
    sampler.stop_event.set()
    sampler.join(10)
    s = sampler.summary("during")
    assert s["claim_lock_waits"] == 1 and 400 < s["claim_lock_wait_max_ms"] < 2000
    assert "FOR UPDATE" in s["longest_wait"]["blocker"]
    store.close()
