"""The generated arithmetic splits: old splits unchanged, a training split that cannot leak, a hard tier, and
worked solutions that are right and in Marco-o1's format."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from marco import prompts
from marco.tasks import get_task
from marco.tasks.arith import SPLITS, evaluation_keys, gold_completion, gold_cot_rows, problem_key, worked

# sha256 of [(question, references, meta)] of the whole split, as published results were measured on them.
PUBLISHED = {
    "arith": "5222748c83c5829fc9b95120143939507099a2f3ba85453c8f95def064ec7b33",
    "arith-heldout": "aa4081aae8a075a6a00e5d0c145bc0a79e2198cfc9b3210d0213a7c3b1344b64",
}
_ARITH = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_splits_are_unchanged(name: str) -> None:
    problems = get_task(name).load(None, None, None)
    digest = hashlib.sha256(json.dumps([(p.question, p.references, p.meta) for p in problems]).encode()).hexdigest()
    assert digest == PUBLISHED[name]


def test_training_split_shares_no_key_with_any_evaluation_split() -> None:
    train = SPLITS["arith-train"]
    assert train.size >= 20_000 and not train.evaluation
    keys = [problem_key("arith-train", i) for i in range(train.size)]
    evaluation = evaluation_keys()
    assert len(evaluation) > 1000
    assert not set(keys) & evaluation
    # ...and it is not a handful of sums repeated: most training keys are distinct, over every template
    assert len(set(keys)) > 0.6 * train.size
    assert {k[0] for k in keys} == {k[0] for k in evaluation}
    questions = {p.question for p in get_task("arith-train").load(None, None, 5000)}
    for name in ("arith", "arith-heldout", "arith-hard"):
        assert not questions & {p.question for p in get_task(name).load(None, None, None)}


@pytest.mark.parametrize("name", ["arith", "arith-heldout", "arith-hard", "arith-train"])
def test_every_worked_solution_is_right(name: str) -> None:
    """Each step's arithmetic holds, the last step gives the answer, and the hard tier has 3+ steps."""
    problems = get_task(name).load(None, None, 300)
    for i, problem in enumerate(problems):
        w = worked(name, i)
        assert w.answer >= 0 and str(w.answer) == problem.references[0] and w.question == problem.question
        results = []
        for step in w.steps:
            for a, op, b, c in _ARITH.findall(step):
                a, b, c = int(a), int(b), int(c)
                assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b if a % b == 0 else None}[op] == c, step
                results.append(c)
        assert results[-1] == w.answer
        assert len(w.steps) >= (3 if name == "arith-hard" else 2)


def test_hard_tier_has_larger_numbers() -> None:
    def mean_answer(name: str) -> float:
        return sum(worked(name, i).answer for i in range(300)) / 300

    assert mean_answer("arith-hard") > 4 * mean_answer("arith-heldout")


def test_gold_completion_is_well_formed_and_scores_correct() -> None:
    task = get_task("arith-train")
    for p in task.load(None, None, 24):
        text = gold_completion(worked("arith-train", p.index))
        thought, output = prompts.split_thought_output(text)
        assert text.startswith(prompts.ASSISTANT_PREFIX) and output == p.references[0]
        assert "\n\n" in thought  # one step a paragraph: `step` actions see the same steps
        assert task.score(task.extract(text, p), p).correct


def test_gold_cot_refuses_evaluation_splits_and_imports_cleanly(tmp_path) -> None:
    for name in ("arith", "arith-heldout", "arith-hard"):
        with pytest.raises(ValueError, match="evaluation split"):
            next(gold_cot_rows(name))
    from marco.data.importer import import_cot

    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gold_cot_rows("arith-train", 0, 40)))
    result = import_cot(path)
    assert len(result.examples) >= 36  # the near-duplicate filter may merge a few look-alike sums
    first = result.examples[0]
    assert first.messages[-1]["content"].endswith("</Output>") and first.messages[1]["role"] == "user"


def test_gold_cot_cli(tmp_path) -> None:
    from typer.testing import CliRunner

    from marco.cli import app

    out = tmp_path / "g.jsonl"
    ok = CliRunner().invoke(app, ["data", "gold-cot", "--limit", "5", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert len(out.read_text().splitlines()) == 5
    bad = CliRunner().invoke(app, ["data", "gold-cot", "--dataset", "arith-hard", "--out", str(tmp_path / "x.jsonl")])
    assert bad.exit_code != 0 and "evaluation split" in bad.output
