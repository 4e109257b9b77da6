"""The store's data-loop methods (issue 5): stage batches, CoT examples, training runs, checkpoints.

:class:`TrainingStoreMixin` is mixed into :class:`marco.store.store.Store`; everything here uses the same
engine, sessions and bulk helpers. A checkpoint is a ``models`` row (kind ``checkpoint``, ``parent_id`` the
model it was trained from, ``path`` its directory, ``meta`` its lineage) whose spec is ``checkpoint:<id>``;
:meth:`TrainingStoreMixin.checkpoint_path` turns ``checkpoint:ID`` back into that directory.
"""

from __future__ import annotations

from typing import Any, Sequence

from sqlalchemy import func, select, update

from marco.search.tree import make_id
from marco.store.fence import check_fence
from marco.store.db import StoreError
from marco.store.models import Batch, CotExampleRow, Job, Model, ProblemRow, Search, TrainingRun

CHECKPOINT_PREFIX = "checkpoint:"
SYNTHESIS_PREFIX = "synthesis:"
_MIN_PREFIX = 6  # shortest id prefix `checkpoint:`/`synthesis:` accept


def _uuidish(value: str) -> bool:
    import uuid

    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


class TrainingStoreMixin:
    """Stage batches, ``cot_examples``, ``training_runs`` and checkpoint lineage (see the module docstring)."""

    # provided by Store
    sessions: Any
    dialect: str

    # ------------------------------------------------------------------ stage batches (one job each)
    def create_stage_batch(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        name: str | None = None,
        dataset: str | None = None,
        model: str | None = None,
        config: dict[str, Any] | None = None,
        priority: int = 0,
        batch_id: str | None = None,
    ) -> tuple[str, str]:
        """A ``synthesize`` or ``train`` batch with its single job (``payload`` is what the job runs);
        returns ``(batch_id, job_id)``. With a given ``batch_id`` a second call writes nothing."""
        import uuid

        batch_id = batch_id or str(uuid.uuid4())
        job_id = make_id("job", batch_id, 0)
        model_id = self.ensure_model(model) if model else None  # type: ignore[attr-defined]
        batch_row = {
            "id": batch_id, "name": name or f"{kind}-{batch_id[:8]}", "kind": kind, "dataset": dataset,
            "model_id": model_id, "config": {"model": model, **(config or {})}, "priority": priority,
            "n_problems": 0, "n_jobs": 1, "n_searches": 0,
        }  # fmt: skip
        job_row = {"id": job_id, "batch_id": batch_id, "seq": 0, "kind": kind, "payload": payload}
        with self.sessions.begin() as s:
            s.execute(self.insert_ignore(Batch.__table__), [batch_row])  # type: ignore[attr-defined]
            s.execute(self.insert_ignore(Job.__table__), [job_row])  # type: ignore[attr-defined]
        return batch_id, job_id

    def set_batch_result(self, batch_id: str, result: dict[str, Any], fence: Any = None) -> None:
        """Keep a stage's outcome summary in ``batches.config["result"]`` (before its job is finished);
        with ``fence`` only while that claim holds the job (:mod:`marco.store.fence`)."""
        with self.sessions.begin() as s:
            check_fence(s, fence)
            batch = s.get(Batch, batch_id)
            if batch is None:
                raise StoreError(f"no batch {batch_id!r}")
            batch.config = {**(batch.config or {}), "result": result}

    def pipeline_batches(self, pipeline_id: str) -> list[Batch]:
        """Every batch of a pipeline (``config.pipeline_id``), oldest first."""
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(Batch)
                    .where(Batch.config["pipeline_id"].as_string() == pipeline_id)
                    .order_by(Batch.created_at, Batch.id)
                )
            )

    def clear_staged(self, batch_id: str, flag: str) -> None:
        """Forget that a batch's stage handlers ran (so a resumed stage chains again when it ends)."""
        with self.sessions.begin() as s:
            batch = s.get(Batch, batch_id)
            if batch is not None and (batch.config or {}).get(flag):
                batch.config = {k: v for k, v in batch.config.items() if k != flag}

    # ------------------------------------------------------------------ synthesis sources
    def completed_searches(
        self,
        batches: Sequence[str] | None = None,
        dataset: str | None = None,
        langs: Sequence[str] | None = None,
    ) -> list[tuple[Search, ProblemRow]]:
        """Searches that ended (``done``) with their problems, filtered, in a stable order."""
        stmt = (
            select(Search, ProblemRow)
            .join(ProblemRow, Search.problem_id == ProblemRow.id)
            .where(Search.status == "done")
        )
        if batches:
            stmt = stmt.where(Search.batch_id.in_([self.resolve_batch(b) for b in batches]))  # type: ignore[attr-defined]
        if dataset is not None:
            stmt = stmt.where(Search.dataset == dataset)
        if langs:
            stmt = stmt.where(Search.lang.in_(list(langs)))
        stmt = stmt.order_by(ProblemRow.dataset, ProblemRow.lang, ProblemRow.index, Search.created_at, Search.id)
        with self.sessions() as s:
            return [(r[0], r[1]) for r in s.execute(stmt).all()]

    # ------------------------------------------------------------------ cot_examples
    def write_cot_examples(self, rows: Sequence[dict[str, Any]], fence: Any = None) -> int:
        """Bulk ``INSERT ... ON CONFLICT DO NOTHING`` (ids are deterministic: a rerun writes nothing twice);
        with ``fence`` only while that claim holds the job, in the insert's transaction."""
        if rows:
            with self.sessions.begin() as s:
                check_fence(s, fence)
                self._bulk_insert(s, CotExampleRow.__table__, list(rows))  # type: ignore[attr-defined]
        return len(rows)

    def cot_examples(self, run_id: str, kind: str | None = "sft") -> list[CotExampleRow]:
        """The examples of a synthesis run, in the order they were made."""
        stmt = select(CotExampleRow).where(CotExampleRow.run_id == run_id)
        if kind is not None:
            stmt = stmt.where(CotExampleRow.kind == kind)
        with self.sessions() as s:
            rows = list(s.scalars(stmt))
        return sorted(rows, key=lambda r: (int((r.meta or {}).get("order", 0)), str(r.id)))

    def resolve_synthesis(self, ref: str) -> str:
        """The synthesis run (a ``synthesize`` batch) named by ``ref``: its id or id prefix, its name, or a
        reason batch (id or name) it was synthesised from (the newest such run that is done)."""
        ref = ref[len(SYNTHESIS_PREFIX):] if ref.startswith(SYNTHESIS_PREFIX) else ref
        with self.sessions() as s:
            runs = select(Batch).where(Batch.kind == "synthesize")
            if _uuidish(ref):
                row = s.get(Batch, ref)
                if row is not None and row.kind == "synthesize":
                    return str(row.id)
            found = s.scalars(runs.where(Batch.name == ref).order_by(Batch.created_at.desc())).first()
            if found is not None:
                return str(found.id)
            if len(ref) >= _MIN_PREFIX and not _uuidish(ref):
                hits = [str(r.id) for r in s.scalars(runs) if str(r.id).startswith(ref)]
                if len(hits) == 1:
                    return hits[0]
            # a reason batch: the newest finished synthesis run made from it
            try:
                source = self.resolve_batch(ref)  # type: ignore[attr-defined]
            except StoreError:
                source = None
            if source is not None:
                candidates = s.scalars(
                    runs.where(Batch.status == "done").order_by(Batch.created_at.desc())
                ).all()
                for run in candidates:
                    if source in ((run.config or {}).get("source_batches") or []):
                        return str(run.id)
        raise StoreError(f"no synthesis run {ref!r}: run `marco synthesize --batch BATCH` first")

    # ------------------------------------------------------------------ training_runs
    def create_training_run(self, run_id: str, fence: Any = None, **values: Any) -> str:
        """Insert a ``training_runs`` row unless it exists (a retried job keeps its run id)."""
        row = {
            "id": run_id, "hyperparameters": {}, "losses": [], "metrics": {}, "status": "queued", **values,
        }  # fmt: skip
        with self.sessions.begin() as s:
            check_fence(s, fence)
            s.execute(self.insert_ignore(TrainingRun.__table__), [row])  # type: ignore[attr-defined]
        return run_id

    def update_training_run(self, run_id: str, fence: Any = None, **values: Any) -> None:
        """Set ``values`` on a training run; with ``fence`` only while that claim holds its job."""
        with self.sessions.begin() as s:
            check_fence(s, fence)
            s.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(**values))

    def get_training_run(self, run_id: str) -> TrainingRun:
        with self.sessions() as s:
            row = s.get(TrainingRun, run_id) if _uuidish(run_id) else None
            if row is None:
                raise StoreError(f"no training run {run_id!r}")
            return row

    def training_runs(self, limit: int = 50) -> list[TrainingRun]:
        with self.sessions() as s:
            return list(s.scalars(select(TrainingRun).order_by(TrainingRun.created_at.desc()).limit(limit)))

    # ------------------------------------------------------------------ checkpoints and lineage
    def model_spec(self, model_id: str) -> str | None:
        """The spec (what ``load_backend`` takes) of the ``models`` row ``model_id``; None when unknown."""
        with self.sessions() as s:
            row = s.get(Model, model_id)
            return None if row is None else str(row.spec)

    def model_id_for(self, spec: str) -> str:
        """The ``models`` id of a spec: a checkpoint's own id, or the base model's (created on first use)."""
        if spec.startswith(CHECKPOINT_PREFIX):
            return str(self.get_checkpoint(spec).id)
        return self.ensure_model(spec)  # type: ignore[attr-defined,no-any-return]

    def register_checkpoint(
        self, training_run_id: str, path: str, base: str, lineage: dict[str, Any], name: str | None = None,
        fence: Any = None,
    ) -> str:
        """Record a trained checkpoint in ``models`` (spec ``checkpoint:<id>``, ``parent_id`` its base model,
        ``meta`` its lineage) and link it from its training run; returns the model id."""
        model_id = make_id("model", "checkpoint", training_run_id)
        parent = self.model_id_for(base)
        row = {
            "id": model_id, "name": name or f"sft-{training_run_id[:8]}", "spec": CHECKPOINT_PREFIX + model_id,
            "kind": "checkpoint", "parent_id": parent, "path": path,
            "meta": {**lineage, "training_run_id": training_run_id, "base_model_id": parent},
        }  # fmt: skip
        with self.sessions.begin() as s:
            check_fence(s, fence)  # a claim that lost its lease registers nothing
            s.execute(self.insert_ignore(Model.__table__), [row])  # type: ignore[attr-defined]
            s.execute(update(Model).where(Model.id == model_id).values(path=path, meta=row["meta"]))
            s.execute(update(TrainingRun).where(TrainingRun.id == training_run_id).values(output_model_id=model_id))
        return model_id

    def get_checkpoint(self, ref: str) -> Model:
        """The checkpoint ``ref`` names: ``checkpoint:ID`` or ``ID``, where ID is the checkpoint's model id,
        its training run's id, or a unique prefix (≥ 6 characters) of either."""
        ref = ref[len(CHECKPOINT_PREFIX):] if ref.startswith(CHECKPOINT_PREFIX) else ref
        ref = ref.strip()
        with self.sessions() as s:
            if _uuidish(ref):
                row = s.get(Model, ref)
                if row is None:
                    run = s.get(TrainingRun, ref)
                    if run is not None and run.output_model_id is not None:
                        row = s.get(Model, run.output_model_id)
                if row is not None and row.kind == "checkpoint":
                    return row
            elif len(ref) >= _MIN_PREFIX:
                models = s.scalars(select(Model).where(Model.kind == "checkpoint")).all()
                hits = {str(m.id): m for m in models if str(m.id).startswith(ref)}
                runs = s.scalars(select(TrainingRun).where(TrainingRun.output_model_id.is_not(None))).all()
                for r in runs:
                    if str(r.id).startswith(ref):
                        m = s.get(Model, r.output_model_id)
                        if m is not None:
                            hits[str(m.id)] = m
                if len(hits) == 1:
                    return next(iter(hits.values()))
                if len(hits) > 1:
                    raise StoreError(f"checkpoint:{ref} is ambiguous ({len(hits)} matches): give more of the id")
        raise StoreError(f"no checkpoint {ref!r} in the store: list checkpoints with `marco pipeline checkpoints`")

    def checkpoint_path(self, ref: str) -> str:
        """The directory of checkpoint ``ref`` (what ``checkpoint:ID`` resolves to everywhere)."""
        import os

        model = self.get_checkpoint(ref)
        if not model.path or not os.path.isdir(model.path):
            raise StoreError(f"checkpoint {model.id} points at {model.path!r}, which is not a directory on this machine")
        return model.path

    def lineage(self, ref: str) -> list[Model]:
        """A checkpoint and its ancestors, newest first, ending at the base model."""
        chain = [self.get_checkpoint(ref)]
        with self.sessions() as s:
            while chain[-1].parent_id is not None and len(chain) < 100:
                parent = s.get(Model, chain[-1].parent_id)
                if parent is None:
                    break
                chain.append(parent)
        return chain

    def checkpoints(self, limit: int = 50) -> list[Model]:
        with self.sessions() as s:
            return list(
                s.scalars(select(Model).where(Model.kind == "checkpoint").order_by(Model.created_at.desc()).limit(limit))
            )

    def count_rows(self, table: Any, *where: Any) -> int:
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(table).where(*where)) or 0)


__all__ = ["CHECKPOINT_PREFIX", "SYNTHESIS_PREFIX", "TrainingStoreMixin"]
