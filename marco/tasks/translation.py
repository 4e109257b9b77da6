"""Chinese→English translation (FLORES-200 devtest, WMT22 general test), scored with chrF and BLEU."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sacrebleu

from marco import prompts
from marco.tasks.base import Problem, Score
from marco.tasks.data import DataError, read_lines, require_data_dir

LANG = "zh-en"
FLORES_DIR = "flores200_devtest_zho_Hans-eng_Latn"
WMT_DIR = "wmt22_generaltest_zh-en"
CORPORA = ("flores200", "wmt22")

INSTRUCTION = (
    "Translate the following Chinese text into English. Write only the English translation inside "
    "<Output></Output>."
)


@dataclass(frozen=True)
class Corpus:
    """One aligned test set on disk: a source file and one or more reference files."""

    name: str
    source: Path
    references: tuple[Path, ...]
    domains: Path | None = None


def _flores(folder: Path) -> Corpus | None:
    src, ref = folder / "zho_Hans.devtest", folder / "eng_Latn.devtest"
    return Corpus("flores200", src, (ref,)) if src.is_file() and ref.is_file() else None


def _wmt(folder: Path) -> Corpus | None:
    src = folder / "generaltest2022.zh-en.src.zh"
    refs = tuple(sorted(folder.glob("generaltest2022.zh-en.ref.*.en")))
    if not (src.is_file() and refs):
        return None
    domains = folder / "generaltest2022.zh-en.domains.tsv"
    return Corpus("wmt22", src, refs, domains if domains.is_file() else None)


def find_corpus(data_dir: Path, prefer: str = "flores200") -> Corpus:
    """Detect the layout of ``data_dir``: a FLORES or WMT22 folder, their parent ``translation/`` folder, or
    the data root above it. From a parent folder ``prefer`` picks the corpus (FLORES by default)."""
    if prefer not in CORPORA:
        raise ValueError(f"unknown corpus {prefer!r}; choose one of {', '.join(CORPORA)}")
    for folder in (data_dir, data_dir / "translation"):
        found = _flores(folder) or _wmt(folder)
        if found:
            return found
        subdirs = {"flores200": folder / FLORES_DIR, "wmt22": folder / WMT_DIR}
        order = [prefer] + [c for c in CORPORA if c != prefer]
        for name in order:
            found = _flores(subdirs[name]) if name == "flores200" else _wmt(subdirs[name])
            if found:
                return found
    raise DataError(
        f"no translation data in {str(data_dir)!r}: expected zho_Hans.devtest + eng_Latn.devtest (FLORES-200) "
        f"or generaltest2022.zh-en.src.zh + .ref.*.en (WMT22); pass --data-dir ../shared/data/translation/{FLORES_DIR}"
    )


def _read_all(path: Path) -> list[str]:
    lines = []
    for number, text in read_lines(path):
        if text is None:
            raise DataError(f"{path.name} line {number}: not valid UTF-8")
        lines.append(text)
    return lines


def _domains(path: Path | None, count: int) -> list[str]:
    if path is None:
        return [""] * count
    rows = [t.split("\t") for _, t in read_lines(path) if t]
    header = rows[0] if rows else []
    if "domain" not in header:
        return [""] * count
    col = header.index("domain")
    values = [r[col] if len(r) > col else "" for r in rows[1:]]
    return values + [""] * (count - len(values))


def load_corpus(corpus: Corpus, limit: int | None = None) -> list[Problem]:
    """Problems of ``corpus``; files of different lengths are a :class:`DataError`. An empty source line
    becomes a Problem with ``error`` set."""
    source = _read_all(corpus.source)
    refs = [_read_all(p) for p in corpus.references]
    for path, lines in zip(corpus.references, refs):
        if len(lines) != len(source):
            raise DataError(
                f"misaligned files: {corpus.source.name} has {len(source)} lines but {path.name} has {len(lines)}"
            )
    domains = _domains(corpus.domains, len(source))
    count = len(source) if limit is None else min(limit, len(source))
    problems = []
    for i in range(count):
        meta = {"source": corpus.source.name, "line": str(i + 1)}
        if domains[i]:
            meta["domain"] = domains[i]
        error = None
        if not source[i].strip():
            error = f"line {i + 1}: empty source sentence"
        elif not any(r[i].strip() for r in refs):
            error = f"line {i + 1}: empty reference"
        references = tuple(r[i].strip() for r in refs)
        problems.append(Problem(corpus.name, LANG, i, source[i].strip(), references, error, meta))
    return problems


def _last_paragraph(text: str) -> str:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return paragraphs[-1] if paragraphs else ""


@dataclass
class Translation:
    """zh→en translation. ``corpus`` picks FLORES-200 or WMT22 when ``data_dir`` is a parent folder; a
    corpus folder given directly is used as it is. ``Score.value`` is sentence chrF / 100 (in [0, 1]);
    ``corpus_metrics`` reports corpus chrF and BLEU on sacrebleu's 0-100 scale."""

    name: str = "translation"
    corpus: str = "flores200"
    system: str = prompts.SYSTEM_PROMPT

    def load(self, data_dir: str | None, langs: Sequence[str] | None, limit: int | None) -> list[Problem]:
        wanted = [p.strip() for item in (langs or ()) for p in item.split(",") if p.strip()]
        if any(lang not in (LANG, "all") for lang in wanted):
            raise ValueError(f"translation only has the language pair {LANG!r}, not {','.join(wanted)!r}")
        root = require_data_dir(data_dir, "translation")
        return load_corpus(find_corpus(root, self.corpus), limit)

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        return prompts.chat(f"{INSTRUCTION}\n\n{problem.question}", self.system)

    def extract(self, text: str, problem: Problem) -> str | None:
        """``<Output>`` content, else the text after ``</Thought>``, else the last non-empty paragraph."""
        found = prompts.output_text(text)
        if not found:
            found = prompts.after_thought(text)
        if not found:
            found = _last_paragraph(prompts.split_thought_output(text)[0])
        return found or None

    def score(self, answer: str | None, problem: Problem) -> Score:
        if not answer or problem.error is not None:
            return Score(None, 0.0)
        refs = [r for r in problem.references if r]
        return Score(None, sacrebleu.sentence_chrf(answer, refs).score / 100.0)

    def corpus_metrics(self, answers: Sequence[str | None], problems: Sequence[Problem]) -> dict[str, float]:
        """Corpus chrF and BLEU over every problem (a missing answer counts as an empty translation);
        problems with a different number of references are padded, as sacrebleu allows."""
        if len(answers) != len(problems):
            raise ValueError(f"{len(answers)} answers for {len(problems)} problems")
        if not problems:
            return {"chrf": 0.0, "bleu": 0.0}
        hyps = [a or "" for a in answers]
        width = max(len(p.references) for p in problems)
        streams: list[list[str | None]] = [
            [p.references[k] if k < len(p.references) else None for p in problems] for k in range(width)
        ]
        return {
            "chrf": sacrebleu.corpus_chrf(hyps, streams).score,  # type: ignore[arg-type]
            "bleu": sacrebleu.corpus_bleu(hyps, streams).score,  # type: ignore[arg-type]
        }
