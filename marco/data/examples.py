"""CoT training examples in Marco-o1's format, and their export.

An example is a chat: the system prompt, the user question, and the assistant answer
``<Thought>…</Thought>\\n<Output>…</Output>``. Exports use the conversational format TRL reads: a
``messages`` column for SFT, ``prompt``/``chosen``/``rejected`` columns for preference pairs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

Message = dict[str, str]

# Used only until `marco.prompts` exists in the working tree; the real prompt lives there.
_FALLBACK_SYSTEM_PROMPT = (
    "You are a well-trained AI assistant. When you answer a question, think step by step inside "
    "<Thought> and </Thought>, then give the final answer inside <Output> and </Output>."
)

_ANSWER_RE = re.compile(r"^\s*<Thought>(?P<thought>.*?)</Thought>\s*<Output>(?P<output>.*?)</Output>\s*$", re.S)


def system_prompt() -> str:
    """Marco-o1's system prompt (:data:`marco.prompts.SYSTEM_PROMPT`)."""
    try:
        from marco.prompts import SYSTEM_PROMPT
    except ImportError:
        return _FALLBACK_SYSTEM_PROMPT
    return SYSTEM_PROMPT


def format_answer(thought: str, output: str) -> str:
    """The assistant turn of an example: ``<Thought>…</Thought>\\n<Output>…</Output>``."""
    return f"<Thought>\n{thought.strip()}\n</Thought>\n<Output>\n{output.strip()}\n</Output>"


def parse_answer(text: str) -> tuple[str, str] | None:
    """``(thought, output)`` of a well-formed answer (each tag once, nothing outside them), else None."""
    m = _ANSWER_RE.match(text)
    if m is None:
        return None
    thought, output = m.group("thought"), m.group("output")
    if any(tag in thought + output for tag in ("<Thought>", "</Thought>", "<Output>", "</Output>")):
        return None
    return thought.strip(), output.strip()


def chat(question: str, answer: str | None = None, system: str | None = None) -> list[Message]:
    """Chat messages: system prompt, user question and (when given) the assistant answer."""
    messages = [
        {"role": "system", "content": system_prompt() if system is None else system},
        {"role": "user", "content": question},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


@dataclass
class CotExample:
    """One SFT example.

    ``source`` says where it came from: ``search:<id>`` for a synthesised one, ``import:<file>`` for an
    imported one; ``meta`` carries the rest of its provenance (node path, row number, …). ``quality`` is the
    source's own score of the example (the path's value for a search, 1.0 when a file gives none).
    """

    id: str
    messages: list[Message]
    source: str
    lang: str = ""
    quality: float = 1.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def question(self) -> str:
        """The last user turn."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")

    @property
    def answer(self) -> str:
        """The last assistant turn."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        # JSON text keeps `meta` one column type in Arrow whatever its keys are per row.
        row["meta"] = json.dumps(self.meta, ensure_ascii=False, sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "CotExample":
        meta = row.get("meta") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        return cls(
            id=str(row["id"]),
            messages=[{"role": m["role"], "content": m["content"]} for m in row["messages"]],
            source=str(row.get("source", "")),
            lang=str(row.get("lang") or ""),
            quality=float(row.get("quality", 1.0) if row.get("quality") is not None else 1.0),
            meta=dict(meta),
        )


@dataclass
class PreferencePair:
    """A preference pair for DPO-style training: the same prompt, a preferred and a rejected answer."""

    id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    source: str = ""
    lang: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        # TRL's conversational preference format: the answers are assistant-message lists.
        return {
            "id": self.id,
            "prompt": self.prompt,
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
            "source": self.source,
            "lang": self.lang,
            "meta": json.dumps(self.meta, ensure_ascii=False, sort_keys=True),
        }


Record = CotExample | PreferencePair


def write_jsonl(records: Iterable[Record], path: str | os.PathLike[str]) -> int:
    """Write one JSON object per line (atomically: a temporary file renamed into place); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_row(), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_jsonl(path: str | os.PathLike[str]) -> list[CotExample]:
    """Examples written by :func:`write_jsonl`."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(CotExample.from_row(json.loads(line)))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a CoT example ({e})") from e
    return out


def save_dataset(records: Sequence[Record], directory: str | os.PathLike[str]) -> str:
    """Save as a Hugging Face ``datasets`` directory (``save_to_disk``) that TRL trainers read as is.

    Examples give a ``messages`` column (SFT); preference pairs give ``prompt``/``chosen``/``rejected`` (DPO).
    """
    from datasets import Dataset

    if not records:
        raise ValueError("nothing to save: the dataset is empty")
    kinds = {type(r) for r in records}
    if len(kinds) > 1:
        raise ValueError("a dataset holds either CoT examples or preference pairs, not both")
    Dataset.from_list([r.to_row() for r in records]).save_to_disk(str(directory))
    return str(directory)
