"""Compare MCTS's final picks (``--select``) on the same trees, with the scripted ``band`` model.

Runs ``mcts:ministep:32`` (k = 3, c = 0.3) once per problem at each budget with ``bench/uct_sweep.py``'s
``band`` model (4-step chains, each step right with p = 0.6, right steps ~0.06 more confident, the way
SmolLM2's confidences sit in a narrow band), then re-picks every tree with each selection, so the picks
are paired on identical searches. Prints accuracy, tree / chosen-path depth and a sign test against
``value`` (the old default). For stored real-model trees use ``scripts/final_pick.py``.

Usage: python bench/final_pick_sweep.py [--budgets 1024,2048] [--problems 300]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from uct_sweep import arithmetic_problems, band_responder, band_scorer  # noqa: E402

from marco.compare.stats import paired_test  # noqa: E402
from marco.llm.scripted import ScriptedBackend  # noqa: E402
from marco.search.base import SELECTIONS, SearchConfig  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402
from marco.search.mcts import MCTSSearch  # noqa: E402
from marco.tasks import get_task  # noqa: E402
from marco.tasks.base import Problem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="1024,2048")
    ap.add_argument("--problems", type=int, default=300)
    args = ap.parse_args()
    task = get_task("demo")
    probs = [Problem("demo", "en", p.index, p.question, ("42",)) for p in arithmetic_problems(args.problems)]
    for budget in map(int, args.budgets.split(",")):
        backend = ScriptedBackend(band_responder, band_scorer)
        cfg = SearchConfig(strategy="mcts", action="ministep:32", children=3, exploration=0.3, budget=budget,
                           max_answer_tokens=192)
        t = time.time()
        results = LockstepDriver(backend, task, cfg, continuous=False).run(probs)
        scores: dict[str, list[float]] = {}
        depths: dict[str, list[tuple[int, int]]] = {}
        for select in SELECTIONS:
            config = SearchConfig.from_dict({**cfg.to_dict(), "select": select})
            picked = []
            for r in results:
                state = MCTSSearch(r.search_id, r.problem, task, backend, config, list(r.tree))
                state.done = True
                picked.append(state.result())
            scores[select] = [1.0 if p.correct else 0.0 for p in picked]
            depths[select] = [(p.depth, p.path_depth) for p in picked]
        n = len(probs)
        print(f"budget {budget}, {n} problems, tokens/search {sum(r.tokens for r in results) / n:.0f}, "
              f"{time.time() - t:.0f}s")
        for select in SELECTIONS:
            test = paired_test(scores[select], scores["value"])
            tree = sum(d for d, _ in depths[select]) / n
            path = sum(d for _, d in depths[select]) / n
            print(f"  {select:10s} accuracy {100 * sum(scores[select]) / n:5.1f}%  depth {tree:.2f} / {path:.2f}  "
                  f"vs value {test.wins}/{test.losses}, p = {test.p:.2g}")


if __name__ == "__main__":
    main()
