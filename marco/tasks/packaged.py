"""The evaluation data shipped inside the package (``marco/datasets/``), checked against its SHA-256 manifest.

``marco/datasets/`` mirrors the layout of a data directory (``mgsm/``, ``translation/<corpus>/``), so the
loaders read it exactly as they read a ``--data-dir``. Every file a loader opens from it is hashed once per
process and compared with ``marco/datasets/SHA256SUMS`` (``sha256sum`` format): a damaged installation fails
with one line that says what to do instead of scoring against altered references.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from marco.tasks import data
from marco.tasks.data import DataError

MANIFEST = "SHA256SUMS"

_verified: set[tuple[Path, int, int]] = set()  # (path, size, mtime_ns) already checked this process


def packaged_dir() -> Path:
    """``marco/datasets`` of this installation."""
    return data.PACKAGED_DIR


def read_manifest(root: Path | None = None) -> dict[str, str]:
    """``{relative path: sha256 hex}`` from ``root/SHA256SUMS``."""
    path = (root or packaged_dir()) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path} is missing: the installation is damaged; reinstall marco or pass --data-dir")
    entries: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            entries[name.lstrip("*")] = digest.lower()
    return entries


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_packaged(path: Path, root: Path | None = None) -> bool:
    """Whether ``path`` lies inside ``root`` (the packaged data)."""
    try:
        path.resolve().relative_to((root or packaged_dir()).resolve())
    except ValueError:
        return False
    return True


def verify(path: Path, root: Path | None = None) -> None:
    """Check one packaged file against the manifest; raise :class:`DataError` (one line) on a mismatch.

    Files outside ``root`` (a ``--data-dir`` override) are the user's own and are not checked.
    """
    root = root or packaged_dir()
    if not is_packaged(path, root):
        return
    stat = path.stat()
    key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return
    rel = path.resolve().relative_to(root.resolve()).as_posix()
    expected = read_manifest(root).get(rel)
    if expected is None:
        raise DataError(f"packaged file {rel} is not in {root / MANIFEST}; reinstall marco or pass --data-dir")
    got = sha256_file(path)
    if got != expected:
        raise DataError(
            f"packaged file {path} fails its SHA-256 check (expected {expected[:12]}…, got {got[:12]}…): "
            f"the installation is damaged or the file was edited; reinstall marco "
            f"(pip install --force-reinstall marco) or pass --data-dir with your own copy"
        )
    _verified.add(key)


def verify_all(root: Path | None = None) -> dict[str, bool]:
    """``{relative path: matches}`` for every manifest entry (a missing file counts as not matching)."""
    root = root or packaged_dir()
    result = {}
    for rel, digest in read_manifest(root).items():
        path = root / rel
        result[rel] = path.is_file() and sha256_file(path) == digest
    return result
