"""Sweep MCTS's UCT constant c (and Q normalisation) on small arithmetic word problems, same problems
and seed for every setting, one run.

Q (mean token confidence) lives in a narrow band (~0.7-0.95), so a large c makes UCT close to
breadth-first: the tree stays shallow. This prints, per setting, accuracy, tokens spent, the mean depth
the tree reached and the depth of the chosen answer, so the default c can be picked from numbers.

``--model band`` runs a scripted model of that regime instead (fast, many problems): chains of 4 steps,
each step right with probability 0.6 (one wrong step makes the answer wrong); token confidences lie in
~0.74-0.90, about 0.06 higher on right steps, with noise, the way SmolLM2's do.

Usage: python bench/uct_sweep.py [--problems 16] [--budget 512] [--cs 0.1,0.25,0.5,1,2] [--model smollm2|band]
Last line: ``best_c: X`` (highest accuracy; ties broken by depth reached).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from marco.llm import load_backend  # noqa: E402
from marco.search.base import SearchConfig  # noqa: E402
from marco.search.driver import LockstepDriver  # noqa: E402
from marco.tasks import get_task  # noqa: E402
from marco.tasks.base import Problem  # noqa: E402

NAMES = ("Tom", "Sara", "Ben", "Lily", "Omar", "Mia")
THINGS = ("apples", "pencils", "stickers", "marbles", "books", "cookies")


def arithmetic_problems(count: int, seed: int = 0) -> list[Problem]:
    """One-operation word problems on small integers (written here; easy enough for a 135M model)."""
    rng = random.Random(seed)
    out: list[Problem] = []
    for i in range(count):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        kind = i % 3
        if kind == 0:
            q, ans = f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now?", a + b
        elif kind == 1:
            a += b
            q, ans = f"{name} has {a} {thing} and gives {b} {thing} away. How many {thing} does {name} have left?", a - b
        else:
            q, ans = f"A bag holds {a} {thing}. How many {thing} are in {b} bags?", a * b
        out.append(Problem("demo", "en", i, q, (str(ans),)))
    return out


def band_responder(prefix: str, rng: random.Random) -> str:
    """Four steps, each right (" ok") with probability 0.6; the answer is 42 only if every step was right."""
    if "</Thought>" in prefix:
        return ""
    done = prefix.count("\n\n")
    wrong = "oops" in prefix
    out = []
    for i in range(done, 4):
        ok = rng.random() < 0.6
        wrong = wrong or not ok
        out.append(f"Step {i + 1}: {'ok, carry on' if ok else 'oops, slip up'} with the numbers.\n\n")
    answer = str(40 + rng.randint(3, 9)) if wrong else "42"
    return "".join(out) + f"So {answer}.\n</Thought>\n<Output>{answer}</Output>"


def band_scorer(text: str, position: int) -> float:
    """~0.86 on right steps, ~0.80 after a slip, +-0.06 deterministic noise per token."""
    noise = (hash_unit(text) - 0.5) * 0.12
    base = 0.80 if "oops" in text.rpartition("\n\n")[2] or "oops" in text[-60:] else 0.86
    return base + noise


def hash_unit(text: str) -> float:
    import hashlib

    return int.from_bytes(hashlib.md5(text.encode()).digest()[:4], "big") / 2**32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--children", type=int, default=3)
    ap.add_argument("--action", default="ministep:32")
    ap.add_argument("--cs", default="0.1,0.25,0.5,1,2")
    ap.add_argument("--normalize", action="store_true", help="also run every c with Q normalised among siblings")
    ap.add_argument("--max-answer-tokens", type=int, default=192)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    if args.model == "band":
        from marco.llm.scripted import ScriptedBackend

        backend = ScriptedBackend(band_responder, band_scorer)
    else:
        backend = load_backend(args.model)
    task = get_task("demo")
    problems = arithmetic_problems(args.problems)
    if args.model == "band":
        problems = [Problem("demo", "en", p.index, p.question, ("42",)) for p in problems]
    settings = [(float(c), False) for c in args.cs.split(",")]
    if args.normalize:
        settings += [(c, True) for c, _ in settings]
    print(f"model {args.model} · {len(problems)} problems · mcts {args.action} k={args.children} budget {args.budget}")
    print(f"{'c':>6} {'norm':>5} {'acc':>6} {'tokens':>7} {'depth':>6} {'chosen':>7} {'refl':>5} {'s':>6}")
    rows = []
    for c, norm in settings:
        config = SearchConfig(strategy="mcts", action=args.action, children=args.children, exploration=c,
                              normalize=norm, budget=args.budget, max_answer_tokens=args.max_answer_tokens,
                              seed=args.seed)
        t = time.perf_counter()
        results = LockstepDriver(backend, task, config).run(problems)
        wall = time.perf_counter() - t
        acc = sum(bool(r.correct) for r in results) / len(results)
        tokens = sum(r.tokens for r in results) / len(results)
        depth = sum(r.depth for r in results) / len(results)
        chosen = sum(len(r.chosen_path) - 1 for r in results) / len(results)
        refl = sum(r.reflections for r in results) / len(results)
        rows.append((acc, depth, c, norm))
        print(f"{c:>6g} {str(norm):>5} {acc:>6.1%} {tokens:>7.0f} {depth:>6.2f} {chosen:>7.2f} {refl:>5.2f} {wall:>6.0f}",
              flush=True)
    best = max(rows, key=lambda r: (r[0], r[1]))
    print(f"best_c: {best[2]:g}{' (normalized)' if best[3] else ''}")


if __name__ == "__main__":
    main()
