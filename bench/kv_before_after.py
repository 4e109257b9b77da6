"""The transformers backend before and after the KV-cache rework, at the product's default shapes, one run.

Runs ``bench/search_efficiency.py`` of an earlier commit (``--before``, default ``7b42be8``: the parent of
6648b5e, which moved the KV cache into preallocated slots inside one memory budget) from a temporary git
worktree, then this checkout's, with the same shapes: 64 MGSM-en problems searched in lockstep
(``ministep:32``, k = 3, budget 1024, rollouts up to 384 tokens: ``marco run``'s defaults), and raw batched
generation at the same width. Each run is its own process; its peak resident memory is read from the
kernel's accounting of that child (``wait4``), so it covers model loading, the search and raw generation.

The two runs are sequential, so a load change between them skews the throughput ratio: the load average is
printed before each. The search itself changed between the commits too (issue 8: rollout reuse, stop at
``</Output>``), so the MCTS rows spend tokens differently; the raw rows generate the same kind of tokens.

Last lines: ``mcts_tokens_per_s_after_vs_before``, ``raw_tokens_per_s_after_vs_before``,
``peak_rss_before_vs_after``.

Usage: python bench/kv_before_after.py [--before 7b42be8] [--problems 64] [--budget 1024] [--rollout 384]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^(lockstep MCTS|raw batched generate)\s+(\d+)\s+([\d.]+)\s+([\d.]+)", re.M)


@dataclass
class Run:
    label: str
    tokens: dict[str, int]
    seconds: dict[str, float]
    peak_rss_mib: float
    output: str

    def tps(self, part: str) -> float:
        return self.tokens[part] / self.seconds[part]


def run_bench(label: str, root: Path, args: list[str]) -> Run:
    """One bench process in ``root`` (its own ``marco``), with its peak RSS from ``wait4``."""
    print(f"[{label}] {root} · load {os.getloadavg()[0]:.1f}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "bench/search_efficiency.py", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"[{label}] bench failed:\n{out}")
    rows = {m.group(1): m for m in ROW.finditer(out)}
    if len(rows) != 2:
        sys.exit(f"[{label}] could not read the bench's output:\n{out}")
    print(out, flush=True)
    return Run(label, {k: int(m.group(2)) for k, m in rows.items()},
               {k: float(m.group(3)) for k, m in rows.items()}, usage.ru_maxrss / 1024, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="7b42be8", help="the commit to compare against (before the KV rework)")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--rollout", type=int, default=384)
    args = ap.parse_args()
    shapes = ["--problems", str(args.problems), "--budget", str(args.budget), "--rollout", str(args.rollout),
              "--skip-sequential"]
    with tempfile.TemporaryDirectory(prefix="marco-before-") as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.before],
                       check=True)
        try:
            before = run_bench(f"before {args.before}", old, shapes)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    after = run_bench("after (this checkout)", ROOT, [*shapes, "--skip-depth"])

    print(f"{'run':<34}{'MCTS tok/s':>12}{'raw tok/s':>11}{'MCTS tokens':>13}{'peak RSS MiB':>14}")
    for r in (before, after):
        print(f"{r.label:<34}{r.tps('lockstep MCTS'):>12.1f}{r.tps('raw batched generate'):>11.1f}"
              f"{r.tokens['lockstep MCTS']:>13}{r.peak_rss_mib:>14.0f}")
    print(f"mcts_tokens_per_s_after_vs_before: {after.tps('lockstep MCTS') / before.tps('lockstep MCTS'):.2f}")
    print(f"raw_tokens_per_s_after_vs_before: "
          f"{after.tps('raw batched generate') / before.tps('raw batched generate'):.2f}")
    print(f"peak_rss_before_vs_after: {before.peak_rss_mib / after.peak_rss_mib:.2f}")


if __name__ == "__main__":
    main()
