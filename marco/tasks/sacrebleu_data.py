"""WMT22 zh→en through sacrebleu's test-set downloader (marco never ships it: WMT research-use terms).

sacrebleu keeps test sets under ``$SACREBLEU`` (default ``~/.sacrebleu``): the release tarball in
``wmt22/raw/`` and one text file per field, e.g. ``wmt22/wmt22.zh-en.src`` and ``wmt22.zh-en.ref-A``.
Reading the cache never touches the network; :func:`download_wmt22` does, with a socket timeout so an
offline machine fails fast with a one-line :class:`~marco.tasks.data.DataError` instead of hanging.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from marco.tasks.data import DataError

TESTSET, LANGPAIR = "wmt22", "zh-en"
TIMEOUT_ENV = "MARCO_DOWNLOAD_TIMEOUT"


def cache_dir() -> Path:
    """sacrebleu's folder for WMT22 (``$SACREBLEU/wmt22``, as sacrebleu resolved it at import)."""
    from sacrebleu.utils import SACREBLEU_DIR

    return Path(SACREBLEU_DIR) / TESTSET


def _field_file(field: str) -> Path:
    return cache_dir() / f"{TESTSET}.{LANGPAIR}.{field.replace(':', '-')}"


def cached_wmt22() -> tuple[Path, list[Path]] | None:
    """``(source, references)`` from sacrebleu's cache when it holds WMT22 zh-en, else None (no network)."""
    src = _field_file("src")
    refs = sorted(p for p in cache_dir().glob(f"{TESTSET}.{LANGPAIR}.ref-*") if p.stat().st_size > 0) if src.is_file() else []
    return (src, refs) if refs and src.stat().st_size > 0 else None


def is_cached_file(path: Path) -> bool:
    try:
        path.resolve().relative_to(cache_dir().resolve())
    except (ValueError, OSError):
        return False
    return True


def download_wmt22(timeout_s: float | None = None) -> tuple[Path, list[Path]]:
    """Fetch WMT22 zh-en with sacrebleu (source and every reference translator, A and B); raise a one-line
    :class:`DataError` with the reason when the machine is offline or the download fails."""
    from sacrebleu.dataset import DATASETS

    timeout = timeout_s if timeout_s is not None else float(os.environ.get(TIMEOUT_ENV, "30"))
    dataset = DATASETS[TESTSET]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # sacrebleu's urlopen has no timeout of its own
    try:
        files = dataset.get_files(LANGPAIR)
        fields = dataset.fieldnames(LANGPAIR)
    except (Exception, SystemExit) as exc:  # sacrebleu exits on SSL and checksum errors
        _drop_partial_tarball(dataset)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(reason) from None
    finally:
        socket.setdefaulttimeout(previous)
    by_field = dict(zip(fields, files))
    refs = [Path(by_field[f]) for f in sorted(by_field) if f.startswith("ref:")]
    if "src" not in by_field or not refs:
        raise DataError(f"sacrebleu's {TESTSET} {LANGPAIR} has no source or reference fields ({', '.join(fields)})")
    return Path(by_field["src"]), refs


def _drop_partial_tarball(dataset: object) -> None:
    """Remove a tarball a failed download left behind, so the next try starts clean (sacrebleu would
    otherwise take a truncated file for a finished download)."""
    from sacrebleu.utils import get_md5sum

    for url, md5 in zip(getattr(dataset, "data", None) or [], getattr(dataset, "md5", None) or []):
        tarball = cache_dir() / "raw" / f"{TESTSET}.{os.path.basename(url)}"
        if tarball.is_file() and get_md5sum(str(tarball)) != md5:
            tarball.unlink()
