"""Import external CoT data (JSONL or Parquet) into Marco's example format, through the quality filters.

Rows may be shaped ``instruction``/``response`` (also ``question``/``prompt`` with ``output``/``answer``/
``completion``, as in the Open-O1 CoT set) or carry a ``messages`` list (``conversations`` with
``from``/``value`` works too). Every example gets Marco-o1's system prompt. A row that cannot be read is not
an error: it is counted, with its reason, in the report's ``parse`` step.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from marco.data.examples import CotExample, Message, system_prompt
from marco.data.filters import Filter, FilterReport, StepStats, default_filters, run_filters
from marco.search.tree import make_id

QUESTION_KEYS = ("instruction", "question", "prompt", "query")
ANSWER_KEYS = ("response", "output", "answer", "completion")
_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "model": "assistant", "system": "system"}


class RowError(ValueError):
    """A source row that is not a usable CoT example."""


def read_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any] | RowError]]:
    """``(row number, row)`` of a JSONL or Parquet file; a malformed JSONL line yields a :class:`RowError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".json", ".jsonl.gz", ".ndjson"):
        import gzip

        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, RowError(f"invalid JSON ({e.msg})")
                    continue
                yield i, row if isinstance(row, dict) else RowError("line is not a JSON object")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        offset = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for j, row in enumerate(batch.to_pylist()):
                yield offset + j, row
            offset += batch.num_rows
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl or .parquet)")


def row_messages(row: dict[str, Any]) -> list[Message]:
    raw = row.get("messages", row.get("conversations"))
    if raw is not None:
        if isinstance(raw, str):
            raw = json.loads(raw)
        if not isinstance(raw, list):
            raise RowError("messages is not a list")
        out: list[Message] = []
        for m in raw:
            if not isinstance(m, dict):
                raise RowError("a message is not an object")
            role = _ROLE_ALIASES.get(str(m.get("role", m.get("from", ""))).lower())
            content = m.get("content", m.get("value"))
            if role is None or not isinstance(content, str):
                raise RowError("a message lacks a known role or text content")
            out.append({"role": role, "content": content})
        return out
    question = next((row[k] for k in QUESTION_KEYS if isinstance(row.get(k), str)), None)
    answer = next((row[k] for k in ANSWER_KEYS if isinstance(row.get(k), str)), None)
    if question is None or answer is None:
        raise RowError(
            f"no question ({'/'.join(QUESTION_KEYS)}) and answer ({'/'.join(ANSWER_KEYS)}) text, nor messages"
        )
    # Alpaca-style rows put the material the instruction is about in `input`.
    extra = row.get("input")
    if isinstance(extra, str) and extra.strip():
        question = f"{question}\n\n{extra}"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def row_to_example(row: dict[str, Any], source: str, index: int) -> CotExample:
    """A :class:`CotExample` from one source row, with Marco-o1's system prompt in place of any other."""
    messages = [m for m in row_messages(row) if m["role"] != "system"]
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError("the conversation does not end with an assistant answer")
    if not any(m["role"] == "user" for m in messages):
        raise RowError("the conversation has no user turn")
    quality = row.get("quality", row.get("score"))
    return CotExample(
        id=make_id("import", source, index),
        messages=[{"role": "system", "content": system_prompt()}, *messages],
        source=f"import:{source}",
        lang=str(row.get("lang") or ""),
        quality=float(quality) if isinstance(quality, (int, float)) else 1.0,
        meta={"row": index},
    )


@dataclass
class ImportResult:
    examples: list[CotExample]
    report: FilterReport


def import_cot(
    path: str | os.PathLike[str],
    steps: Sequence[Filter] | None = None,
    limit: int | None = None,
) -> ImportResult:
    """Read ``path``, convert its rows and run them through ``steps`` (default: :func:`default_filters`).

    The report's first step, ``parse``, counts the rows that could not be converted.
    """
    source = Path(path).name
    steps = default_filters() if steps is None else steps
    parse = StepStats("parse")
    report = FilterReport([parse])

    def parsed() -> Iterator[CotExample]:
        for index, row in read_rows(path):
            if limit is not None and parse.seen >= limit:
                return
            parse.seen += 1
            if isinstance(row, RowError):
                parse.drop(f"row {index}", str(row))
                continue
            try:
                yield row_to_example(row, source, index)
            except (RowError, ValueError, TypeError) as e:
                parse.drop(f"row {index}", str(e))

    kept, report = run_filters(parsed(), steps, report)
    return ImportResult(kept, report)
