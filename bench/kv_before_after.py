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

In that mode the raw rows generate as many tokens each as the MCTS run spent per row, and MCTS spends
differently at the two commits, so the two raw rows may differ in length. ``--raw-only`` removes that: every
run generates exactly ``--per-row`` tokens in each of P x k rows (no stops), and the runs alternate
before, after, before, after ... ``--rounds`` times, so a load change hits both sides. Its last lines:
``raw_tokens_per_s_after_vs_before`` (median of the per-round ratios) and ``peak_rss_before_vs_after``.

Usage: python bench/kv_before_after.py [--before 7b42be8] [--problems 64] [--budget 1024] [--rollout 384]
       python bench/kv_before_after.py --raw-only [--problems 32] [--per-row 300] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


def run_child(label: str, root: Path, argv: list[str], stderr: int = subprocess.DEVNULL) -> tuple[str, float]:
    """``python ARGV`` in ``root`` (its own ``marco``): its stdout and its peak RSS in MiB, from ``wait4``."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, *argv], cwd=root, env=env, stdout=subprocess.PIPE, stderr=stderr,
                            text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"[{label}] failed:\n{out[-3000:]}")
    return out, usage.ru_maxrss / 1024


@contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """A temporary git worktree of ``commit``, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="marco-before-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), commit], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def run_bench(label: str, root: Path, args: list[str]) -> Run:
    """One ``bench/search_efficiency.py`` process in ``root``."""
    print(f"[{label}] {root} · load {os.getloadavg()[0]:.1f}", flush=True)
    out, rss = run_child(label, root, ["bench/search_efficiency.py", *args])
    rows = {m.group(1): m for m in ROW.finditer(out)}
    if len(rows) != 2:
        sys.exit(f"[{label}] could not read the bench's output:\n{out}")
    print(out, flush=True)
    return Run(label, {k: int(m.group(2)) for k, m in rows.items()},
               {k: float(m.group(3)) for k, m in rows.items()}, rss, out)


# Run inside either tree (the backend API it uses is the same at both commits): P MGSM-en prompts, k rows
# each, exactly N new tokens per row; prints "raw TOKENS SECONDS".
RAW_SCRIPT = """
import sys, time
from marco.llm import load_backend
from marco.llm.base import GenerationRequest
from marco.tasks import default_data_dir, get_task
problems, k, per_row = (int(a) for a in sys.argv[1:4])
backend = load_backend("smollm2")
data = default_data_dir()
task = get_task("mgsm" if data else "demo")
ps = task.load(data, ["en"], problems) if data else task.load(None, None, problems)
backend.generate([GenerationRequest(backend.encode("Hello"), 4)])
reqs = [GenerationRequest(backend.apply_chat_template(task.messages(p), "<Thought>\\n"), per_row, n=k,
                          temperature=0.7, seed=i, ignore_eos=True) for i, p in enumerate(ps)]
t = time.perf_counter()
out = backend.generate(reqs)
print("raw", sum(g.num_tokens for gs in out for g in gs), time.perf_counter() - t)
"""
RAW_ROW = re.compile(r"^raw (\d+) ([\d.]+)$", re.M)


def run_raw(label: str, root: Path, problems: int, k: int, per_row: int) -> tuple[float, float]:
    """One raw-generation process in ``root``: (tokens per second, peak RSS in MiB)."""
    out, rss = run_child(label, root, ["-c", RAW_SCRIPT, str(problems), str(k), str(per_row)],
                         stderr=subprocess.STDOUT)
    m = RAW_ROW.search(out)
    if m is None:
        sys.exit(f"[{label}] could not read the raw generation's output:\n{out[-3000:]}")
    return int(m.group(1)) / float(m.group(2)), rss


def raw_only(args: argparse.Namespace, old: Path) -> None:
    ratios: list[float] = []
    rss: dict[str, list[float]] = {"before": [], "after": []}
    print(f"{'round':<7}{'before tok/s':>14}{'after tok/s':>13}{'after/before':>14}{'load':>7}")
    for i in range(args.rounds):
        load = os.getloadavg()[0]
        b, rb = run_raw("before", old, args.problems, args.children, args.per_row)
        a, ra = run_raw("after", ROOT, args.problems, args.children, args.per_row)
        rss["before"].append(rb)
        rss["after"].append(ra)
        ratios.append(a / b)
        print(f"{i + 1:<7}{b:>14.1f}{a:>13.1f}{a / b:>14.3f}{load:>7.1f}", flush=True)
    print(f"rows {args.problems} x {args.children}, {args.per_row} new tokens each, no stops")
    print(f"raw_tokens_per_s_after_vs_before: {statistics.median(ratios):.3f}")
    print(f"peak RSS MiB: before {max(rss['before']):.0f}, after {max(rss['after']):.0f}")
    print(f"peak_rss_before_vs_after: {max(rss['before']) / max(rss['after']):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default="7b42be8", help="the commit to compare against (before the KV rework)")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--rollout", type=int, default=384)
    ap.add_argument("--raw-only", action="store_true", help="only raw generation, same tokens per row, alternating")
    ap.add_argument("--per-row", type=int, default=300, help="--raw-only: new tokens per row")
    ap.add_argument("--children", type=int, default=3, help="--raw-only: rows per problem")
    ap.add_argument("--rounds", type=int, default=2, help="--raw-only: before/after pairs")
    args = ap.parse_args()
    if args.raw_only:
        with worktree(args.before) as old:
            raw_only(args, old)
        return
    shapes = ["--problems", str(args.problems), "--budget", str(args.budget), "--rollout", str(args.rollout),
              "--skip-sequential"]
    with worktree(args.before) as old:
        before = run_bench(f"before {args.before}", old, shapes)
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
