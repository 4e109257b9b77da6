"""A short run of bench/soak.py: every fault injected mid-batch, and no job lost or wrong."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
ROOT = Path(__file__).resolve().parents[1]


def test_short_soak_loses_nothing_and_changes_no_answer() -> None:
    args = ["--problems", "160", "--chunk", "4", "--kill-every", "8", "--cut-for", "12", "--stall", "150", "--timeout", "900"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), *args],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1150,
    )
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    faults = re.search(r"faults: (\d+) worker kill\(s\), Redis flushed (\d)x, Postgres cut (\d)x", out.stdout)
    assert faults, report[-5000:]
    assert int(faults[1]) >= 1 and faults[2] == "1" and faults[3] == "1", report[-5000:]  # every fault happened
    assert re.search(r"^jobs lost: 0 of 40 ", out.stdout, re.M), report[-5000:]
    assert re.search(r"^duplicate nodes: 0 ", out.stdout, re.M), report[-5000:]
    assert re.search(r"^answers that differ from the undisturbed run: 0 of 160 ", out.stdout, re.M), report[-5000:]
    assert re.search(r"^double runs: 0 job", out.stdout, re.M), report[-5000:]  # per-run markers in order
    assert out.stdout.strip().splitlines()[-1] == "soak_jobs_lost_or_wrong: 0", report[-5000:]
