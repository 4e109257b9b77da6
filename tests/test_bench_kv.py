"""bench/kv_before_after.py --raw-only, tiny, against this checkout's own HEAD (any clone has it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[1]


def test_raw_only_runs_both_trees_with_equal_rows_and_reports_the_ratio() -> None:
    args = ["--raw-only", "--before", "HEAD", "--problems", "2", "--children", "2", "--per-row", "8", "--rounds", "1"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kv_before_after.py"), *args],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=550,
    )
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-5000:]
    rounds = re.findall(r"^(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+$", out.stdout, re.M)
    assert [r[0] for r in rounds] == ["1"], report[-5000:]
    for _, before, after, ratio in rounds:
        assert float(before) > 0 and float(after) > 0
        assert float(ratio) == pytest.approx(float(after) / float(before), rel=0.01)
    assert "rows 2 x 2, 8 new tokens each, no stops" in out.stdout, report[-5000:]
    median = re.search(r"^raw_tokens_per_s_after_vs_before: ([\d.]+)$", out.stdout, re.M)
    assert median and 0.2 < float(median[1]) < 5, report[-5000:]  # the same code on both sides
    rss = re.search(r"^peak RSS MiB: before (\d+), after (\d+)$", out.stdout, re.M)
    assert rss and int(rss[1]) > 200 and int(rss[2]) > 200, report[-5000:]  # a loaded model, read via wait4
    # the temporary worktree is removed again
    trees = subprocess.run(["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True).stdout
    assert "marco-before-" not in trees, trees
