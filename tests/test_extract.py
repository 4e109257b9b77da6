"""Answer extraction for MGSM: every language's digits and number formats, and the tricky cases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from marco.tasks import get_task
from marco.tasks.base import Problem
from marco.tasks.mgsm import LANGS, load_tsv
from marco.tasks.numbers import find_numbers, last_number, normalize_number

ASCII = "0123456789"


@dataclass(frozen=True)
class Style:
    """How a completion in one language writes a number."""

    digits: str
    group: str  # thousands separator; "" for none
    indian: bool  # lakh grouping: 1,14,200
    output: str  # the <Output> sentence, {n} is the number
    thought: str  # the last line of the thought, {n} is the number


STYLES: dict[str, Style] = {
    "en": Style(ASCII, ",", False, "She makes ${n} every day.", "So the answer is {n}."),
    "de": Style(ASCII, ".", False, "Sie nimmt täglich {n} $ ein.", "Also ist die Antwort {n}."),
    "es": Style(ASCII, ".", False, "Gana {n} dólares al día.", "Entonces la respuesta es {n}."),
    "fr": Style(ASCII, "\u202f", False, "Elle gagne {n} $ par jour.", "La réponse est donc {n}."),
    "ru": Style(ASCII, "\u00a0", False, "Она зарабатывает {n} $ в день.", "Итак, ответ: {n}."),
    "sw": Style(ASCII, ",", False, "Anatengeneza ${n} kila siku.", "Kwa hiyo jibu ni {n}."),
    "bn": Style("০১২৩৪৫৬৭৮৯", ",", True, "তিনি প্রতিদিন {n} ডলার আয় করেন।", "সুতরাং উত্তর হল {n}।"),
    "te": Style("౦౧౨౩౪౫౬౭౮౯", ",", True, "ఆమె ప్రతిరోజూ {n} డాలర్లు సంపాదిస్తుంది.", "కాబట్టి సమాధానం {n}."),
    "th": Style("๐๑๒๓๔๕๖๗๘๙", ",", False, "เธอได้รับ {n} ดอลลาร์ต่อวัน", "ดังนั้นคำตอบคือ {n}"),
    "ja": Style("０１２３４５６７８９", "，", False, "彼女は毎日{n}ドル稼ぎます。", "したがって答えは{n}です。"),
    "zh": Style(ASCII, "", False, "她每天赚{n}美元。", "所以答案是{n}。"),
}


def render(value: int, style: Style) -> str:
    """``value`` written the way ``style`` writes numbers."""
    text = str(value)
    if style.group and len(text) > 3:
        head, groups = text[:-3], [text[-3:]]
        size = 2 if style.indian else 3
        while head:
            groups.insert(0, head[-size:])
            head = head[:-size]
        text = style.group.join(groups)
    return text.translate(str.maketrans(ASCII, style.digits))


def completion(question_numbers: list[str], answer: str, style: Style, tagged: bool) -> str:
    """A fake completion that repeats the question's numbers in its thought, then gives ``answer``."""
    thought = "\n\n".join(f"{n} ..." for n in question_numbers)
    if tagged:
        return f"<Thought>\n{thought}\n</Thought>\n<Output>\n{style.output.format(n=answer)}\n</Output>"
    return f"<Thought>\n{thought}\n\n{style.thought.format(n=answer)}"


def test_every_language_has_a_style() -> None:
    assert set(STYLES) == set(LANGS)


@pytest.mark.parametrize("lang", LANGS)
def test_gold_answers_in_every_language_are_extracted_and_scored(data_dir: Path, lang: str) -> None:
    task = get_task("mgsm")
    problems = load_tsv(data_dir / "mgsm" / f"mgsm_{lang}.tsv", "mgsm", lang)
    style = STYLES[lang]
    assert len(problems) == 250
    for problem in problems:
        gold = int(problem.references[0])
        numbers = [m.value for m in find_numbers(problem.question)]
        for tagged in (True, False):
            text = completion(numbers, render(gold, style), style, tagged)
            answer = task.extract(text, problem)
            assert answer == str(gold), (problem.key, tagged, text)
            assert task.score(answer, problem).correct
            wrong = completion(numbers, render(gold + 1, style), style, tagged)
            assert task.score(task.extract(wrong, problem), problem).correct is False


def test_native_digits_are_really_rendered() -> None:
    # Guards the test above against a style that silently falls back to ASCII.
    assert render(114200, STYLES["bn"]) == "১,১৪,২০০"
    assert render(2125, STYLES["th"]) == "๒,๑๒๕"
    assert render(276000, STYLES["ja"]) == "２７６，０００"
    assert render(5600, STYLES["fr"]) == "5\u202f600"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 70,000 dollars.", "70000"),
        ("Die Antwort ist 70.000 Euro.", "70000"),
        ("Réponse : 70 000 €", "70000"),
        ("1.234.567", "1234567"),
        ("1,234,567", "1234567"),
        ("1,234.5", "1234.5"),
        ("1.234,5", "1234.5"),
        ("1 234,5", "1234.5"),
        ("2.5 hours", "2.5"),
        ("2,5 Stunden", "2.5"),
        ("$2.50", "2.5"),
        ("0.125", "0.125"),
        ("18.00", "18"),
        ("It is 18.", "18"),
        ("-3", "-3"),
        ("x = −3", "-3"),
        ("a loss of -$5", "-5"),
        ("16-3-4=9", "9"),
        ("16-3", "3"),
        ("-0", "0"),
        ("50%", "50"),
        ("¥1,200", "1200"),
        ("₹1,00,000", "100000"),
        ("1,2,3", "3"),
        ("Total: ३२ (Devanagari)", "32"),
        ("٤٥ (Arabic-Indic)", "45"),
        ("Thai ๑๘ บาท", "18"),
        ("area 25 m²", "25"),
        ("in 2019 100 people", "100"),
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text: str, expected: str | None) -> None:
    assert last_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<Thought>\n16 - 3 - 4 = 9\n\n9 * 2 = 18\n</Thought>\n<Output>\n18\n</Output>", "18"),
        # The output wins over later numbers (none here) and earlier ones in the thought.
        ("<Thought>\nMaybe 20.\n</Thought>\n<Output>$18 per day</Output>", "18"),
        # Unclosed output: generation stopped at the </Output> stop string.
        ("9 * 2 = 18\n</Thought>\n<Output>\nShe makes $18", "18"),
        # No number in the output: fall back to the last number of the text.
        ("9 * 2 = 18\n</Thought>\n<Output>eighteen</Output>", "18"),
        # No tags at all.
        ("16 - 3 - 4 = 9, and 9 * 2 = 18", "18"),
        # After a reflection the last <Output> counts.
        ("<Output>20</Output> Wait! Maybe I made some mistakes! <Output>18</Output>", "18"),
        ("<Thought>\nI do not know.", None),
    ],
)
def test_extract_from_completion(text: str, expected: str | None) -> None:
    problem = Problem("mgsm", "en", 0, "q", ("18",))
    task = get_task("mgsm")
    answer = task.extract(text, problem)
    assert answer == expected
    assert task.score(answer, problem).correct is (expected == "18")


def test_score_is_numeric_not_textual() -> None:
    task = get_task("mgsm")
    problem = Problem("mgsm", "en", 0, "q", ("2125",))
    assert task.score("2125", problem).value == 1.0
    assert task.score("2125.0", problem).correct
    assert task.score("2,125", problem).correct
    assert not task.score("212", problem).correct
    assert task.score(None, problem).value == 0.0
    assert not task.score("not a number", problem).correct


def test_normalize_number_accepts_one_number_only() -> None:
    assert normalize_number(" 2,125 ") == "2125"
    assert normalize_number("$-3") == "-3"
    assert normalize_number("50%") == "50"
    assert normalize_number("12 apples") is None
    assert normalize_number("1 2") is None
    assert normalize_number("abc") is None
    assert normalize_number("") is None
