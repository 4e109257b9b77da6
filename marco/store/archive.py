"""Archive: an ended batch's tree nodes out of ``nodes`` into a compressed file, and back (issue 18).

``nodes`` is the one table that grows without bound (about 1 KB per node; docs/operations.md, "Capacity").
:meth:`ArchiveMixin.archive_batch` keeps it bounded without losing anything:

1. **write** every node of the batch (every column: token ids, per-token confidences, statistics, claim) to
   ``DIR/<batch id>.nodes.jsonl.gz`` (gzip, one JSON object per line after a header line; the gzip
   header carries no time, so the same rows always give the same bytes), streamed in chunks under a
   temporary name, flushed to disk and renamed into place;
2. **verify** the file as it lies on disk: decompress and parse every line, count the rows, and compare the
   digest of the decompressed lines with the one computed while writing; compute the file's SHA-256;
3. **mark** the batch, in one transaction that also checks that it is still ended, has no queued or running
   job and still holds exactly that many nodes: ``batches.archived_at``, ``archive_path``, ``archive_rows``,
   ``archive_sha256`` (migration 0007);
4. **delete** the batch's nodes in chunks of ``chunk`` rows, each in its own short transaction, so no lock
   on ``nodes`` is held for long and workers writing other batches never wait behind the archive.

A crash before step 3 leaves every node in place (run it again: the file is rewritten); a crash during step
4 leaves the batch marked with some nodes still in the table (run it again to finish deleting, or restore).
From step 3 on, everything that reads a tree of the batch raises :class:`BatchArchived`, which says where
the file is and how to get the nodes back, instead of showing an empty or partial tree.

:meth:`ArchiveMixin.restore_batch` checks the file against the recorded SHA-256 and batch id, inserts its
rows back (``ON CONFLICT DO NOTHING``, chunked), checks the count and clears the marks. The file is kept.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from sqlalchemy import delete, exists, func, select, update
from sqlalchemy.orm import Session

from marco.store.base import StoreBase
from marco.store.db import StoreError
from marco.store.models import Batch, Job, NodeRow, Search
from marco.store.rows import _aware, _is_uuid, utcnow
from marco.tasks.packaged import sha256_file

NODE_TABLE = NodeRow.__table__
NODE_COLUMNS: tuple[str, ...] = tuple(c.name for c in NODE_TABLE.columns)
FORMAT = "marco-nodes-archive"
FORMAT_VERSION = 1
ENDED = ("done", "failed", "cancelled")
DEFAULT_CHUNK = 5_000
ARCHIVE_DIR_ENV = "MARCO_ARCHIVE_DIR"
_UUID_COLUMNS = {"id", "search_id", "parent_id"}


class BatchArchived(StoreError):
    """A read needs the tree nodes of a batch whose nodes were archived to a file."""

    def __init__(self, batch_id: str, path: str | None, archived_at: datetime | None) -> None:
        self.batch_id, self.path, self.archived_at = batch_id, path, _aware(archived_at)
        when = f"{self.archived_at:%Y-%m-%d %H:%M} UTC" if self.archived_at else "an unknown date"
        super().__init__(
            f"batch {batch_id} was archived to {path} on {when}; "
            f"run `marco archive --restore {batch_id}` to put its tree nodes back"
        )


@dataclass
class ArchiveResult:
    """One batch archived: the file, its rows and checksum, the nodes deleted from the table."""

    batch_id: str
    path: str
    rows: int
    sha256: str
    bytes: int
    deleted: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RestoreResult:
    batch_id: str
    path: str
    rows: int
    inserted: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def default_archive_dir() -> Path:
    """``$MARCO_ARCHIVE_DIR`` or ``./archive``."""
    return Path(os.environ.get(ARCHIVE_DIR_ENV) or "archive")


def archive_file(directory: str | os.PathLike[str], batch_id: str) -> Path:
    return Path(directory) / f"{batch_id}.nodes.jsonl.gz"


def _encode(row: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in zip(NODE_COLUMNS, row):
        if value is not None:
            if name in _UUID_COLUMNS:
                value = str(value)
            elif name == "created_at":
                value = _aware(value).isoformat()  # type: ignore[union-attr]
            elif name in ("token_ids", "confidences"):
                value = list(value)
        out[name] = value
    return out


def _decode(doc: dict[str, Any]) -> dict[str, Any]:
    row = {name: doc[name] for name in NODE_COLUMNS if name in doc}
    if row.get("created_at") is not None:
        row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


def _line(doc: dict[str, Any]) -> bytes:
    # floats as repr (exact round trip); NaN stays NaN
    return (json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def read_archive(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """The header of an archive file and an iterator over its rows as stored (JSON objects)."""
    fh = gzip.open(path, "rb")
    try:
        header = json.loads(fh.readline() or b"{}")
    except (OSError, ValueError, EOFError) as exc:
        fh.close()
        raise StoreError(f"{path} is not a marco node archive ({exc})") from None
    if header.get("format") != FORMAT:
        fh.close()
        raise StoreError(f"{path} is not a marco node archive (header {str(header)[:80]!r})")

    def rows() -> Iterator[dict[str, Any]]:
        with fh:
            for raw in fh:
                yield json.loads(raw)

    return header, rows()


def verify_archive(path: Path, batch_id: str, rows: int | None = None, content_digest: str | None = None) -> str:
    """Read ``path`` back whole (gzip's CRC checks every byte), parse every row and check the batch id, the
    row count and (when given) the digest of the decompressed lines; returns the file's SHA-256.
    Raises :class:`StoreError` naming what does not match."""
    header, docs = read_archive(path)
    if header.get("batch_id") != batch_id:
        raise StoreError(f"{path} holds batch {header.get('batch_id')}, not {batch_id}")
    digest, n = hashlib.sha256(), 0
    try:
        for doc in docs:
            if doc.get("search_id") is None or doc.get("id") is None:
                raise StoreError(f"{path}: row {n + 1} has no id or search_id")
            digest.update(_line(doc))
            n += 1
    except (OSError, EOFError, ValueError) as exc:  # truncated or corrupt gzip, a line that is not JSON
        raise StoreError(f"{path} is damaged after {n} rows ({exc})") from None
    if n != header.get("rows"):
        raise StoreError(f"{path} holds {n} rows, its header says {header.get('rows')}")
    if rows is not None and n != rows:
        raise StoreError(f"{path} holds {n} rows, {rows} were written")
    if content_digest is not None and digest.hexdigest() != content_digest:
        raise StoreError(f"{path}: the rows read back differ from the rows written")
    return sha256_file(path)


def parse_age(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``2w``, ``45s`` (or a bare number of days) as a timedelta."""
    raw = text.strip().lower()
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    unit = raw[-1:] if raw[-1:] in units else "d"
    number = raw[:-1] if raw[-1:] in units else raw
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as an age: use e.g. 30d, 12h, 90m, 2w") from None
    if value < 0:
        raise ValueError(f"an age is 0 or more, got {text!r}")
    return timedelta(**{units[unit]: value})


def raise_if_archived(s: Session, search_ids: Sequence[str]) -> None:
    """Raise :class:`BatchArchived` when any of ``search_ids`` belongs to an archived batch (every read of
    tree nodes calls it in its own session: an indexed lookup of the searches' batches)."""
    ids = [str(i) for i in search_ids if _is_uuid(str(i))]
    for start in range(0, len(ids), 1000):
        row = s.execute(
            select(Batch.id, Batch.archive_path, Batch.archived_at)
            .join(Search, Search.batch_id == Batch.id)
            .where(Search.id.in_(ids[start : start + 1000]), Batch.archived_at.is_not(None))
            .limit(1)
        ).first()
        if row is not None:
            raise BatchArchived(str(row.id), row.archive_path, row.archived_at)


def archived_hint(s: Session, limit: int = 3) -> str:
    """`` (N batches are archived: ...)`` for a "no such node" message, or ``''`` when none is."""
    rows = s.execute(select(Batch.id, Batch.archive_path).where(Batch.archived_at.is_not(None))
                     .order_by(Batch.archived_at.desc()).limit(limit + 1)).all()  # fmt: skip
    if not rows:
        return ""
    names = ", ".join(f"{r.id} ({r.archive_path})" for r in rows[:limit]) + (", ..." if len(rows) > limit else "")
    return (f"; its batch may be archived ({names}): `marco archive --list` shows every archived batch, "
            "`marco archive --restore BATCH` puts one back")


class ArchiveMixin(StoreBase):
    """Archive and restore the tree nodes of ended batches; tell readers where archived trees went."""

    # --- what readers call ---------------------------------------------------------------------------
    def check_batch_not_archived(self, batch_id: str) -> None:
        """Raise :class:`BatchArchived` when ``batch_id``'s nodes are archived (readers of a whole batch)."""
        with self.sessions() as s:
            batch = self._require_batch(s, batch_id)
            if batch.archived_at is not None:
                raise BatchArchived(str(batch.id), batch.archive_path, batch.archived_at)

    def archived_batches(self, limit: int | None = None) -> list[Batch]:
        """Archived batches, most recently archived first."""
        stmt = select(Batch).where(Batch.archived_at.is_not(None)).order_by(Batch.archived_at.desc())
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.sessions() as s:
            return list(s.scalars(stmt))

    # --- choosing batches ----------------------------------------------------------------------------
    def _active_jobs(self, s: Session, batch_id: str) -> int:
        return int(s.scalar(select(func.count()).select_from(Job).where(
            Job.batch_id == batch_id, Job.status.in_(("queued", "running")))) or 0)  # fmt: skip

    def _refuse_unless_ended(self, s: Session, batch: Batch) -> None:
        if batch.status not in ENDED or (batch.config or {}).get("submitting"):
            raise StoreError(
                f"batch {batch.id} is {batch.status}: only ended batches (done, failed, cancelled) are archived; "
                f"wait for it to end or `marco cancel {batch.id}`"
            )
        active = self._active_jobs(s, str(batch.id))
        if active:
            raise StoreError(f"batch {batch.id} still has {active} queued or running job(s): nothing archived")

    def archivable_batches(self, older_than: timedelta) -> list[Batch]:
        """Ended ``reason`` batches not archived yet, which ended (or, without an end time, were created)
        more than ``older_than`` ago and have no queued or running job; oldest first."""
        cutoff = func.now() - older_than if self.dialect == "postgresql" else utcnow() - older_than
        ended_at = func.coalesce(Batch.finished_at, Batch.created_at)
        active = exists().where(Job.batch_id == Batch.id, Job.status.in_(("queued", "running")))
        stmt = (
            select(Batch)
            .where(Batch.kind == "reason", Batch.status.in_(ENDED), Batch.archived_at.is_(None), ended_at < cutoff, ~active)
            .order_by(ended_at)
        )
        with self.sessions() as s:
            return [b for b in s.scalars(stmt) if not (b.config or {}).get("submitting")]

    def count_batch_nodes(self, batch_id: str, session: Session | None = None) -> int:
        """Nodes of the batch's searches still in the table."""
        stmt = select(func.count()).select_from(NODE_TABLE).where(
            NODE_TABLE.c.search_id.in_(select(Search.id).where(Search.batch_id == batch_id)))  # fmt: skip
        if session is not None:
            return int(session.scalar(stmt) or 0)
        with self.sessions() as s:
            return int(s.scalar(stmt) or 0)

    # --- archive ---------------------------------------------------------------------------------------
    def _write_archive(self, batch_id: str, target: Path, chunk: int, on_rows: Callable[[int], None] | None) -> tuple[int, str]:
        """Stream the batch's nodes into ``target`` (atomically); returns (rows, digest of the lines)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}-{secrets.token_hex(3)}.partial")
        stmt = (
            select(NODE_TABLE).join(Search, Search.id == NODE_TABLE.c.search_id)
            .where(Search.batch_id == batch_id).order_by(NODE_TABLE.c.search_id, NODE_TABLE.c.seq)
        )  # fmt: skip
        expected = self.count_batch_nodes(batch_id)
        digest, n = hashlib.sha256(), 0
        header = {"format": FORMAT, "version": FORMAT_VERSION, "table": "nodes", "batch_id": batch_id,
                  "rows": expected, "columns": list(NODE_COLUMNS)}  # fmt: skip
        try:
            with open(partial, "wb") as raw:
                # mtime=0 and no file name in the gzip header: the same rows always make the same bytes
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
                    gz.write(_line(header))
                    with self.engine.connect() as conn:
                        result = conn.execution_options(stream_results=True, yield_per=chunk).execute(stmt)
                        for part in result.partitions(chunk):
                            for row in part:
                                line = _line(_encode(row))
                                digest.update(line)
                                gz.write(line)
                            n += len(part)
                            if on_rows is not None:
                                on_rows(len(part))
                raw.flush()
                os.fsync(raw.fileno())
            if n != expected:
                raise StoreError(f"batch {batch_id}: {n} nodes read while {expected} were counted; nothing archived, run it again")
            os.replace(partial, target)
        finally:
            if partial.exists():
                partial.unlink()
        try:  # the rename itself durable
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
        return n, digest.hexdigest()

    def _delete_nodes(self, batch_id: str, chunk: int, on_deleted: Callable[[int], None] | None = None) -> int:
        """Delete the batch's nodes, ``chunk`` rows per transaction; returns how many."""
        n = NODE_TABLE
        ids = select(n.c.id).where(n.c.search_id.in_(select(Search.id).where(Search.batch_id == batch_id))).limit(chunk)
        total = 0
        while True:
            with self.sessions.begin() as s:
                deleted = s.execute(delete(n).where(n.c.id.in_(ids))).rowcount or 0
            total += deleted
            if on_deleted is not None and deleted:
                on_deleted(deleted)
            if deleted == 0:
                return total

    def archive_batch(
        self,
        batch: str,
        directory: str | os.PathLike[str] | None = None,
        chunk: int = DEFAULT_CHUNK,
        on_rows: Callable[[int], None] | None = None,
        on_deleted: Callable[[int], None] | None = None,
    ) -> ArchiveResult:
        """Move the tree nodes of ``batch`` (an id or a name; it must have ended) into
        ``DIRECTORY/<batch id>.nodes.jsonl.gz``, verified before a single node is deleted (see the module
        docstring). A batch archived earlier whose deletion was interrupted is finished (its file is checked
        against the recorded SHA-256 first). Raises :class:`StoreError` for a batch that has not ended, has
        queued or running jobs, or is archived already."""
        if chunk <= 0:
            raise ValueError("chunk must be a positive number of rows")
        batch_id = self.resolve_batch(batch)
        with self.sessions() as s:
            row = self._require_batch(s, batch_id)
            left = self.count_batch_nodes(batch_id, s) if row.archived_at is not None else None
            if row.archived_at is None:
                self._refuse_unless_ended(s, row)
        if row.archived_at is not None:  # archived before: finish an interrupted deletion, if any
            if left == 0:
                raise StoreError(f"batch {batch_id} is archived already (to {row.archive_path} on "
                                 f"{_aware(row.archived_at):%Y-%m-%d %H:%M} UTC)")  # fmt: skip
            path = Path(row.archive_path or "")
            if not path.is_file() or sha256_file(path) != row.archive_sha256:
                raise StoreError(f"batch {batch_id} is marked archived with {left} nodes still in the table, and its "
                                 f"file {path} is missing or changed: put the file back, then run `marco archive "
                                 f"--restore {batch_id}`")  # fmt: skip
            deleted = self._delete_nodes(batch_id, chunk, on_deleted)
            return ArchiveResult(batch_id, str(path), int(row.archive_rows or 0), str(row.archive_sha256),
                                 path.stat().st_size, deleted)  # fmt: skip
        target = archive_file(directory or default_archive_dir(), batch_id).resolve()
        rows, content = self._write_archive(batch_id, target, chunk, on_rows)
        sha = verify_archive(target, batch_id, rows, content)
        self._mark_archived(batch_id, target, rows, sha)
        deleted = self._delete_nodes(batch_id, chunk, on_deleted)
        return ArchiveResult(batch_id, str(target), rows, sha, target.stat().st_size, deleted)

    def _mark_archived(self, batch_id: str, path: Path, rows: int, sha: str) -> None:
        """Record the archive, in one transaction that re-checks the batch: still ended, no active job, exactly
        ``rows`` nodes in the table (none written or removed since the file was written)."""
        with self.sessions.begin() as s:
            stmt = select(Batch).where(Batch.id == batch_id).execution_options(populate_existing=True)
            if self.dialect == "postgresql":
                stmt = stmt.with_for_update()  # a requeue of the batch (marco retry) waits for this transaction
            batch = s.scalars(stmt).one()
            if batch.archived_at is not None:
                raise StoreError(f"batch {batch_id} was archived by another process meanwhile (to {batch.archive_path})")
            self._refuse_unless_ended(s, batch)
            now_count = self.count_batch_nodes(batch_id, s)
            if now_count != rows:
                raise StoreError(f"batch {batch_id} holds {now_count} nodes now, {rows} were archived: it changed "
                                 "meanwhile; nothing deleted, run it again")  # fmt: skip
            s.execute(update(Batch).where(Batch.id == batch_id).values(
                archived_at=self._now(), archive_path=str(path), archive_rows=rows, archive_sha256=sha))  # fmt: skip

    # --- restore ---------------------------------------------------------------------------------------
    def restore_batch(
        self, batch: str, chunk: int = DEFAULT_CHUNK, path: str | os.PathLike[str] | None = None,
        on_rows: Callable[[int], None] | None = None,
    ) -> RestoreResult:  # fmt: skip
        """Put an archived batch's nodes back from its file (``path``: the file moved elsewhere), checked
        against the SHA-256 recorded at archiving; clears the batch's archive columns. The file is kept."""
        if chunk <= 0:
            raise ValueError("chunk must be a positive number of rows")
        batch_id = self.resolve_batch(batch)
        with self.sessions() as s:
            row = self._require_batch(s, batch_id)
            if row.archived_at is None:
                raise StoreError(f"batch {batch_id} is not archived: its nodes are in the table")
            recorded, expected, sha = row.archive_path, int(row.archive_rows or 0), row.archive_sha256
        source = Path(path or recorded or "")
        if not source.is_file():
            raise StoreError(f"archive file {source} of batch {batch_id} is missing: copy it back there "
                             f"or pass its new place with --file")  # fmt: skip
        actual = sha256_file(source)
        if actual != sha:
            raise StoreError(f"{source} does not match the SHA-256 recorded when batch {batch_id} was archived "
                             f"({actual[:12]}… vs {str(sha)[:12]}…): nothing restored")  # fmt: skip
        header, docs = read_archive(source)
        if header.get("batch_id") != batch_id:
            raise StoreError(f"{source} holds batch {header.get('batch_id')}, not {batch_id}: nothing restored")
        stmt = self.insert_ignore(NODE_TABLE)
        inserted, buf = 0, []
        for doc in docs:
            buf.append(_decode(doc))
            if len(buf) >= chunk:
                inserted += self._insert_rows(stmt, buf, on_rows)
                buf = []
        if buf:
            inserted += self._insert_rows(stmt, buf, on_rows)
        with self.sessions.begin() as s:
            stmt_b = select(Batch).where(Batch.id == batch_id)
            if self.dialect == "postgresql":
                stmt_b = stmt_b.with_for_update()
            s.scalars(stmt_b).one()
            now_count = self.count_batch_nodes(batch_id, s)
            if now_count != expected:
                raise StoreError(f"batch {batch_id}: {now_count} nodes in the table after the restore, the archive "
                                 f"holds {expected}; the batch stays marked archived")  # fmt: skip
            s.execute(update(Batch).where(Batch.id == batch_id).values(
                archived_at=None, archive_path=None, archive_rows=None, archive_sha256=None))  # fmt: skip
        return RestoreResult(batch_id, str(source), expected, inserted)

    def _insert_rows(self, stmt: Any, rows: list[dict[str, Any]], on_rows: Callable[[int], None] | None) -> int:
        with self.sessions.begin() as s:
            n = s.execute(stmt, rows).rowcount
        if on_rows is not None:
            on_rows(len(rows))
        return max(0, int(n or 0))
