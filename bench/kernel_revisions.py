"""Time a native kernel of this checkout against the same kernel at another git revision.

The two libraries register the same ``torch.ops.marco`` ops, so each is timed in a process of its own: the
bench's script is run again with ``--time LIBRARY`` (plus its own arguments), prints one JSON object of
``{case: milliseconds}`` as its last line, and the processes alternate ``rounds`` times, so that a change
in the machine's speed hits both.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from marco.llm.kernels import build

KERNELS = Path(__file__).resolve().parents[1] / "marco" / "llm" / "kernels"


def compare(script: str, kernel: str, base: str, child_args: list[str], rounds: int) -> dict[str, dict[str, list[float]]]:
    """``{"before": {case: [ms per round]}, "after": ...}``: ``kernel`` (a file of ``marco/llm/kernels``) at git
    revision ``base`` built into a library of its own (before), against this checkout's library (after).
    Exits with git's message where ``base`` has no such file."""
    source = subprocess.run(["git", "show", f"{base}:marco/llm/kernels/{kernel}"], capture_output=True, text=True,
                            cwd=KERNELS)
    if source.returncode != 0:
        sys.exit(f"git show {base}:marco/llm/kernels/{kernel} failed: {source.stderr.strip()}")
    times: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / kernel).write_text(source.stdout)
        libs = {"before": str(build(source=Path(tmp) / kernel, out=Path(tmp) / "base.so")), "after": str(build())}
        for _ in range(rounds):
            for which, lib in libs.items():
                done = subprocess.run([sys.executable, script, "--time", lib, *child_args], capture_output=True,
                                      text=True)
                if done.returncode != 0:
                    sys.exit(f"timing {which} ({lib}) failed:\n{done.stderr.strip()[-3000:]}")
                for case, ms in json.loads(done.stdout.strip().splitlines()[-1]).items():
                    times[which].setdefault(case, []).append(ms)
    return times


def median_ratio(times: dict[str, dict[str, list[float]]], case: str) -> float:
    """The median over rounds of before / after for ``case`` (> 1: this checkout is faster)."""
    return statistics.median(b / a for b, a in zip(times["before"][case], times["after"][case]))
