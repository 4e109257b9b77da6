"""MGSM: grade-school maths word problems in 11 languages, scored by exact numeric match."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Sequence

from marco import prompts
from marco.tasks.base import DatasetInfo, Problem, Score
from marco.tasks.data import DataError, read_lines, require_data_dir, source_label
from marco.tasks.numbers import last_number, normalize_number

LANGS: tuple[str, ...] = ("bn", "de", "en", "es", "fr", "ja", "ru", "sw", "te", "th", "zh")
DEFAULT_LANGS: tuple[str, ...] = ("en",)
LICENCE = "CC BY 4.0"

# "Put the final number in <Output>", in each MGSM language.
INSTRUCTIONS: dict[str, str] = {
    "en": "Think step by step, then write only the final answer, a single number, inside <Output></Output>.",
    "bn": "ধাপে ধাপে চিন্তা করুন, তারপর চূড়ান্ত উত্তরটি (একটি মাত্র সংখ্যা) <Output></Output> এর মধ্যে লিখুন।",
    "de": "Denke Schritt für Schritt nach und schreibe dann nur die endgültige Antwort, eine einzige Zahl, "
    "in <Output></Output>.",
    "es": "Piensa paso a paso y luego escribe solo la respuesta final, un único número, dentro de "
    "<Output></Output>.",
    "fr": "Réfléchis étape par étape, puis écris seulement la réponse finale, un seul nombre, dans "
    "<Output></Output>.",
    "ja": "段階的に考えてから、最終的な答え（数字一つだけ）を <Output></Output> の中に書いてください。",
    "ru": "Рассуждай шаг за шагом, а затем запиши только окончательный ответ — одно число — внутри "
    "<Output></Output>.",
    "sw": "Fikiri hatua kwa hatua, kisha andika jibu la mwisho pekee, nambari moja, ndani ya <Output></Output>.",
    "te": "దశలవారీగా ఆలోచించి, తర్వాత తుది సమాధానాన్ని మాత్రమే (ఒకే సంఖ్య) <Output></Output> లోపల రాయండి.",
    "th": "คิดทีละขั้นตอน แล้วเขียนเฉพาะคำตอบสุดท้ายซึ่งเป็นตัวเลขเดียวไว้ใน <Output></Output>",
    "zh": "请逐步思考，然后只把最终答案（一个数字）写在 <Output></Output> 中。",
}


def parse_langs(langs: Sequence[str] | None, known: Sequence[str], default: Sequence[str]) -> list[str]:
    """Languages to load: ``None`` -> ``default``; ``"all"`` -> every known one; comma lists are split."""
    if not langs:
        return list(default)
    chosen: list[str] = []
    for item in langs:
        for lang in (part.strip() for part in item.split(",")):
            if not lang:
                continue
            if lang == "all":
                chosen.extend(known)
                continue
            if lang not in known:
                raise ValueError(f"unknown language {lang!r}; choose from {', '.join(known)} (or 'all')")
            chosen.append(lang)
    return list(dict.fromkeys(chosen))


def math_extract(text: str) -> str | None:
    """The answer of a maths completion: the last number of its ``<Output>`` if that holds one, else the last
    number of the whole text; canonical (see :mod:`marco.tasks.numbers`)."""
    output = prompts.output_text(text)
    if output is not None:
        found = last_number(output)
        if found is not None:
            return found
    return last_number(text)


def math_score(answer: str | None, problem: Problem) -> Score:
    """Exact numeric match against any reference: ``Score(True, 1.0)`` or ``Score(False, 0.0)``."""
    if answer is None or problem.error is not None:
        return Score(False, 0.0)
    got = normalize_number(answer)
    if got is None:
        return Score(False, 0.0)
    correct = any(Decimal(got) == Decimal(ref) for ref in problem.references)
    return Score(correct, 1.0 if correct else 0.0)


def accuracy(answers: Sequence[str | None], problems: Sequence[Problem]) -> dict[str, float]:
    """``{"accuracy": fraction correct}`` (0.0 for no problems)."""
    if len(answers) != len(problems):
        raise ValueError(f"{len(answers)} answers for {len(problems)} problems")
    if not problems:
        return {"accuracy": 0.0}
    right = sum(1 for a, p in zip(answers, problems) if math_score(a, p).correct)
    return {"accuracy": right / len(problems)}


def _parse_row(dataset: str, lang: str, index: int, number: int, text: str | None, source: str) -> Problem:
    meta = {"source": source, "line": str(number)}

    def bad(reason: str, question: str = "") -> Problem:
        return Problem(dataset, lang, index, question, (), f"line {number}: {reason}", meta)

    if text is None:
        return bad("not valid UTF-8")
    if "\t" not in text:
        return bad("expected 'question<TAB>answer', found no tab", text.strip())
    question, raw_answer = text.rsplit("\t", 1)
    question = question.strip()
    if not question:
        return bad("empty question")
    answer = normalize_number(raw_answer)
    if answer is None:
        return bad(f"answer {raw_answer.strip()!r} is not a number", question)
    return Problem(dataset, lang, index, question, (answer,), None, meta)


def load_tsv(path: Path, dataset: str, lang: str, limit: int | None = None) -> list[Problem]:
    """Problems of one ``question<TAB>answer`` file; a malformed row becomes a Problem with ``error`` set.

    ``index`` counts non-blank rows from 0; blank lines are skipped (they hold nothing to lose).
    """
    problems: list[Problem] = []
    for number, text in read_lines(path):
        if limit is not None and len(problems) >= limit:
            break
        if text is not None and not text.strip():
            continue
        problems.append(_parse_row(dataset, lang, len(problems), number, text, path.name))
    return problems


def find_mgsm_file(data_dir: Path, lang: str) -> Path:
    """``mgsm_<lang>.tsv`` in ``data_dir/mgsm/`` or ``data_dir`` itself."""
    name = f"mgsm_{lang}.tsv"
    for folder in (data_dir / "mgsm", data_dir):
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"{name} not found in {str(data_dir)!r} or its mgsm/ folder; point --data-dir (or $MARCO_DATA_DIR) at a "
        f"folder with mgsm_<lang>.tsv files, or leave it unset to use the MGSM shipped with marco"
    )


@dataclass
class MGSM:
    """MGSM (Shi et al., 2022). ``instructions`` is ``native`` (the answer instruction in the problem's
    language, as Marco-o1's "output in the user's language" rule suggests) or ``english``."""

    name: str = "mgsm"
    instructions: str = "native"
    system: str = prompts.SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if self.instructions not in ("native", "english"):
            raise ValueError(f"unknown instructions {self.instructions!r}; choose 'native' or 'english'")

    def load(self, data_dir: str | None, langs: Sequence[str] | None, limit: int | None) -> list[Problem]:
        """``limit`` problems (all when None) of each language; ``langs=None`` means English."""
        chosen = parse_langs(langs, LANGS, DEFAULT_LANGS)
        root = require_data_dir(data_dir, "mgsm")
        problems: list[Problem] = []
        for lang in chosen:
            problems.extend(load_tsv(find_mgsm_file(root, lang), self.name, lang, limit))
        return problems

    def catalog(self, data_dir: str | None) -> list[DatasetInfo]:
        """One line per language: problems, where they are read from, licence."""
        rows = []
        for lang in LANGS:
            select = f"--dataset {self.name} --lang {lang}"
            try:
                path = find_mgsm_file(require_data_dir(data_dir, self.name), lang)
                count = len(load_tsv(path, self.name, lang))
            except DataError as exc:
                rows.append(DatasetInfo(self.name, lang, None, "not available", LICENCE, select, str(exc)))
                continue
            where = source_label(path)
            rows.append(DatasetInfo(self.name, lang, count, where if where == "packaged" else f"data dir {where}",
                                    LICENCE, select))  # fmt: skip
        return rows

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        lang = problem.lang if self.instructions == "native" else "en"
        instruction = INSTRUCTIONS.get(lang, INSTRUCTIONS["en"])
        return prompts.chat(f"{problem.question}\n\n{instruction}", self.system)

    def extract(self, text: str, problem: Problem) -> str | None:
        return math_extract(text)

    def score(self, answer: str | None, problem: Problem) -> Score:
        return math_score(answer, problem)

    def corpus_metrics(self, answers: Sequence[str | None], problems: Sequence[Problem]) -> dict[str, float]:
        return accuracy(answers, problems)
