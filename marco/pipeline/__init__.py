"""Expert iteration and an evaluation matrix as scheduler-driven stages: per round, search the training split
with the newest model → synthesise → SFT; then every model × strategy × budget × dataset of the matrix → the
table. See :mod:`marco.pipeline.stages`."""

from marco.pipeline.spec import EvalDataset, Evaluation, MatrixBlock, PipelineSpec, Split, Stage

__all__ = ["EvalDataset", "Evaluation", "MatrixBlock", "PipelineSpec", "Split", "Stage"]
