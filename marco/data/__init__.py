"""CoT training data: the example format, its export, and import of external CoT sets with quality filters."""

from marco.data.examples import (
    CotExample,
    PreferencePair,
    chat,
    format_answer,
    parse_answer,
    read_jsonl,
    save_dataset,
    system_prompt,
    write_jsonl,
)
from marco.data.filters import FilterReport, default_filters, run_filters
from marco.data.importer import ImportResult, import_cot

__all__ = [
    "CotExample",
    "FilterReport",
    "ImportResult",
    "PreferencePair",
    "chat",
    "default_filters",
    "format_answer",
    "import_cot",
    "parse_answer",
    "read_jsonl",
    "run_filters",
    "save_dataset",
    "system_prompt",
    "write_jsonl",
]
