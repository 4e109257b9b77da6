"""The data loop as scheduler-driven stages: reason over a train split → synthesise → SFT → reason with
the new checkpoint over a test split → a before/after report. See :mod:`marco.pipeline.stages`."""

from marco.pipeline.spec import STAGES, PipelineSpec, Split

__all__ = ["STAGES", "PipelineSpec", "Split"]
