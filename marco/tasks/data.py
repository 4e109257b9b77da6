"""Where evaluation data lives, and reading it line by line without losing a bad line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

DATA_DIR_ENV = "MARCO_DATA_DIR"
PACKAGED_DIR = Path(__file__).resolve().parents[1] / "datasets"  # MGSM and FLORES-200 zh-en ship here


class DataError(ValueError):
    """Data that cannot be loaded at all (missing folder or file, misaligned files). One line, says what to do."""


def data_override() -> str | None:
    """``$MARCO_DATA_DIR`` when set (a folder that replaces the packaged data), else None."""
    return os.environ.get(DATA_DIR_ENV) or None


def default_data_dir() -> str:
    """Where data is read from with no ``--data-dir``: ``$MARCO_DATA_DIR``, else the packaged ``marco/datasets``."""
    return data_override() or str(PACKAGED_DIR)


def require_data_dir(data_dir: str | os.PathLike[str] | None, dataset: str) -> Path:
    """``data_dir`` (or the default) as an existing folder, else a :class:`DataError` saying what to pass."""
    chosen = data_dir if data_dir is not None else default_data_dir()
    path = Path(chosen).expanduser()
    if not path.is_dir():
        where = "--data-dir" if data_dir is not None else f"${DATA_DIR_ENV}"
        raise DataError(
            f"data directory {str(path)!r} ({where}) does not exist; point it at a folder with the {dataset} "
            f"files, or leave it unset to use the data shipped with marco"
        )
    return path


def source_label(path: Path) -> str:
    """``packaged`` for a file shipped with marco, else the folder it was read from."""
    from marco.tasks.packaged import is_packaged

    return "packaged" if is_packaged(path) else str(path.parent)


def read_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """``(line_number, text)`` for every line of a UTF-8 file (1-based, newline removed, BOM dropped).

    ``text`` is None for a line that is not valid UTF-8, so a caller can report it and go on. A packaged file
    is checked against its SHA-256 first (:func:`marco.tasks.packaged.verify`).
    """
    from marco.tasks.packaged import verify

    verify(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None
