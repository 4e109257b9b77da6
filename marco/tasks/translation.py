"""Chinese→English translation (FLORES-200 devtest, WMT22 general test), scored with chrF and BLEU."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import sacrebleu

from marco import prompts
from marco.tasks.base import DatasetInfo, Problem, Score
from marco.tasks.data import DataError, data_override, read_lines, require_data_dir, source_label

LANG = "zh-en"
FLORES_DIR = "flores200_devtest_zho_Hans-eng_Latn"
WMT_DIR = "wmt22_generaltest_zh-en"
CORPORA = ("flores200", "wmt22")
LICENCES = {"flores200": "CC BY-SA 4.0", "wmt22": "WMT research use (not shipped)"}

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
        f"or generaltest2022.zh-en.src.zh + .ref.*.en (WMT22) in it, its translation/ folder or translation/{FLORES_DIR}; "
        f"leave --data-dir unset to use the FLORES-200 shipped with marco"
    )


def find_wmt22(data_dir: str | None, download: bool = True) -> Corpus:
    """WMT22 zh→en, which marco does not ship (research-use terms): from ``data_dir`` (or ``$MARCO_DATA_DIR``)
    when it holds the WMT22 files, else from sacrebleu's cache, else downloaded by sacrebleu (``download``).
    Raises a one-line :class:`DataError` saying what to do when none of them works."""
    from marco.tasks import sacrebleu_data

    override = data_dir if data_dir is not None else data_override()
    if override is not None:
        root = Path(override).expanduser()
        for folder in (root, root / WMT_DIR, root / "translation", root / "translation" / WMT_DIR):
            found = _wmt(folder)
            if found:
                return found
    cached = sacrebleu_data.cached_wmt22()
    if cached is not None:
        return Corpus("wmt22", cached[0], tuple(cached[1]))
    where = f"{str(override)!r} has no WMT22 files and " if override is not None else ""
    if not download:
        raise DataError(
            f"WMT22 zh-en is not shipped with marco; {where}it is not in sacrebleu's cache "
            f"({sacrebleu_data.cache_dir()}): run with --testset wmt22 once online, or pass --data-dir"
        )
    try:
        src, refs = sacrebleu_data.download_wmt22()
    except DataError as exc:
        raise DataError(
            f"WMT22 zh-en is not shipped with marco (WMT research-use terms); {where}sacrebleu could not "
            f"download it ({exc}). Either run this once on a machine that is online (sacrebleu caches it in "
            f"{sacrebleu_data.cache_dir()}; `sacrebleu -t wmt22 -l zh-en --echo src > /dev/null` does the same, "
            f"then copy that wmt22 folder into $SACREBLEU or ~/.sacrebleu here), or pass --data-dir DIR where DIR "
            f"holds generaltest2022.zh-en.src.zh and generaltest2022.zh-en.ref.A.en "
            f"(github.com/wmt-conference/wmt22-news-systems, folder txt/)"
        ) from None
    return Corpus("wmt22", src, tuple(refs))


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


def _where(path: Path) -> str:
    from marco.tasks import sacrebleu_data

    if sacrebleu_data.is_cached_file(path):
        return f"sacrebleu cache {path.parent}"
    label = source_label(path)
    return label if label == "packaged" else f"data dir {label}"


def _last_paragraph(text: str) -> str:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return paragraphs[-1] if paragraphs else ""


@dataclass
class Translation:
    """zh→en translation. ``corpus`` picks the test set: ``flores200`` (shipped with marco; from a parent
    ``data_dir`` it is preferred, and a corpus folder given directly is used as it is) or ``wmt22`` (never
    shipped: read from ``data_dir``, sacrebleu's cache or sacrebleu's downloader, see :func:`find_wmt22`).
    ``Score.value`` is sentence chrF / 100 (in [0, 1]); ``corpus_metrics`` reports corpus chrF and BLEU on
    sacrebleu's 0-100 scale."""

    name: str = "translation"
    corpus: str = "flores200"
    system: str = prompts.SYSTEM_PROMPT

    def load(self, data_dir: str | None, langs: Sequence[str] | None, limit: int | None) -> list[Problem]:
        wanted = [p.strip() for item in (langs or ()) for p in item.split(",") if p.strip()]
        if any(lang not in (LANG, "all") for lang in wanted):
            raise ValueError(f"translation only has the language pair {LANG!r}, not {','.join(wanted)!r}")
        return load_corpus(self.locate(data_dir), limit)

    def locate(self, data_dir: str | None, download: bool = True) -> Corpus:
        """The files this task reads (see the class docstring); ``download=False`` never goes online."""
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown test set {self.corpus!r}; choose one of {', '.join(CORPORA)}")
        if self.corpus == "wmt22":
            return find_wmt22(data_dir, download)
        return find_corpus(require_data_dir(data_dir, "translation"), self.corpus)

    def catalog(self, data_dir: str | None) -> list[DatasetInfo]:
        """Both zh→en test sets: where each is read from (never downloading), its segments and licence."""
        rows = []
        for name in CORPORA:
            select = "--dataset translation" + (" --testset wmt22" if name == "wmt22" else "")
            try:
                corpus = Translation(corpus=name).locate(data_dir, download=False)
                if corpus.name != name:
                    raise DataError(f"{data_dir} holds {corpus.name}, not {name}")
                count = len(load_corpus(corpus))
            except DataError as exc:
                rows.append(DatasetInfo(name, LANG, None, "not available", LICENCES[name], select, str(exc)))
                continue
            where = _where(corpus.source)
            rows.append(DatasetInfo(name, LANG, count, where, LICENCES[name], select))
        return rows

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
