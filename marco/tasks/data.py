"""Where evaluation data lives, and reading it line by line without losing a bad line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

DATA_DIR_ENV = "MARCO_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]


class DataError(ValueError):
    """Data that cannot be loaded at all (missing folder or file, misaligned files). One line, says what to do."""


def default_data_dir() -> str | None:
    """``$MARCO_DATA_DIR``, else the first existing ``../shared/data`` (from the cwd, then the repo root)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return env
    for base in (Path.cwd(), _REPO_ROOT):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return str(candidate)
    return None


def require_data_dir(data_dir: str | os.PathLike[str] | None, dataset: str) -> Path:
    """``data_dir`` (or the default) as an existing folder, else a :class:`DataError` saying what to pass."""
    chosen = data_dir if data_dir is not None else default_data_dir()
    if chosen is None:
        raise DataError(
            f"{dataset} needs its data: pass --data-dir (e.g. ../shared/data) or set ${DATA_DIR_ENV}"
        )
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {str(path)!r} does not exist; pass --data-dir pointing at the data")
    return path


def read_lines(path: Path) -> Iterator[tuple[int, str | None]]:
    """``(line_number, text)`` for every line of a UTF-8 file (1-based, newline removed, BOM dropped).

    ``text`` is None for a line that is not valid UTF-8, so a caller can report it and go on.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None
