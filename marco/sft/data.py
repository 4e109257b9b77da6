"""Read SFT chats from a ``datasets`` directory, a JSONL file, a Parquet file, or ``gold-cot:SPLIT?start=N&limit=M``
(worked solutions of a generated training split, made on the fly: what ``marco data gold-cot`` writes).

Rows with a ``messages`` column are taken as they are; ``instruction``/``response`` rows become chats with
Marco-o1's system prompt (as :mod:`marco.data.importer` does, without its quality filters). A row that is
not a chat stops the load with its row number: training on silently shrunk data is worse than an error.
:func:`split_and_mix` holds out a validation split of every source and mixes the rest by weight.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

from marco.data.importer import RowError, row_messages, read_rows, row_to_example

Message = dict[str, str]

GOLD_PREFIX = "gold-cot:"


def gold_source(source: str) -> tuple[str, int, int | None]:
    """``gold-cot:SPLIT?start=N&limit=M`` → ``(split, start, limit)`` (start 0 and the whole split when absent)."""
    from urllib.parse import parse_qsl

    dataset, _, query = source.removeprefix(GOLD_PREFIX).partition("?")
    try:
        params = dict(parse_qsl(query, strict_parsing=True)) if query else {}
        unknown = set(params) - {"start", "limit"}
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)}")
        start, limit = int(params.get("start", 0)), (int(params["limit"]) if "limit" in params else None)
        if start < 0 or (limit is not None and limit < 1):
            raise ValueError("start must be >= 0 and limit >= 1")
    except ValueError as e:
        raise ValueError(f"{source}: {e} (expected gold-cot:SPLIT?start=N&limit=M, e.g. "
                         f"gold-cot:arith-train?start=40000&limit=256)") from None  # fmt: skip
    return dataset, start, limit


def _chat(row: dict[str, Any], source: str, index: int) -> list[Message]:
    if "messages" in row and row["messages"] is not None:
        messages = row_messages(row)
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("the conversation has no assistant turn")
        return messages
    return row_to_example(row, source, index).messages


def _rows(source: str) -> Iterable[tuple[int, dict[str, Any] | RowError]]:
    if source.startswith(GOLD_PREFIX):
        from marco.tasks.arith import gold_cot_rows

        return enumerate(gold_cot_rows(*gold_source(source)))  # refuses an evaluation split
    path = Path(source)
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"{source} is not a `datasets` directory (save_to_disk): {e}") from e
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise ValueError(f"{source} has splits {sorted(ds)} but no 'train' split")
            ds = ds["train"]
        return enumerate(ds)
    if not path.exists():
        raise FileNotFoundError(f"no training data at {source} (expected a datasets directory, .jsonl or .parquet)")
    return read_rows(path)


def load_chats(source: str | os.PathLike[str], limit: int | None = None) -> list[list[Message]]:
    """Every chat of ``source`` (at most ``limit``)."""
    source = str(source)
    name = Path(source).name
    chats: list[list[Message]] = []
    for index, row in _rows(source):
        if limit is not None and len(chats) >= limit:
            break
        try:
            if isinstance(row, RowError):
                raise row
            chats.append(_chat(row, name, index))
        except (RowError, ValueError, TypeError) as e:
            raise ValueError(f"{source}: row {index} is not a chat: {e}") from e
    if not chats:
        raise ValueError(f"{source}: no training examples")
    return chats


def split_and_mix(
    sources: Sequence[dict[str, Any]], eval_fraction: float, seed: int, limit: int | None = None
) -> tuple[list[list[Message]], list[list[Message]], list[dict[str, Any]]]:
    """``(train, eval, report)``: each source's chats, ``eval_fraction`` of each held out (at least one
    when the fraction is positive and the source has two or more), the rest repeated/sampled by its weight
    (integer part: whole copies; fractional part: a seeded sample) and shuffled together.

    The report says, per source, how many chats it had, held out and put into the training mix.
    """
    rng = random.Random(seed)
    train: list[list[Message]] = []
    held: list[list[Message]] = []
    report: list[dict[str, Any]] = []
    for src in sources:
        chats = load_chats(src["path"], limit)
        order = list(range(len(chats)))
        rng.shuffle(order)
        n_eval = min(len(chats) - 1, round(eval_fraction * len(chats)))
        held += [chats[i] for i in order[:n_eval]]
        rest = [chats[i] for i in order[n_eval:]]
        weight = float(src.get("weight", 1.0))
        whole, frac = int(weight), weight - int(weight)
        picked = rest * whole + rng.sample(rest, round(frac * len(rest)))
        train += picked
        report.append({"path": src["path"], "weight": weight, "examples": len(chats), "eval": n_eval,
                       "train": len(picked)})  # fmt: skip
    if not train:
        names = ", ".join(s["path"] for s in sources)
        raise ValueError(f"{names}: the weights leave no training example; raise a weight")
    rng.shuffle(train)
    return train, held, report
