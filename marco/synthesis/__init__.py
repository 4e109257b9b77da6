"""Synthesis: stored search trees → CoT training examples in Marco-o1's format, and preference pairs.

``synthesize(store, SynthesisConfig(...), run_id)`` builds them; :mod:`marco.synthesis.job` runs that as a
stored ``synthesize`` job (rows in ``cot_examples``, exports to ``datasets``/JSONL).
"""

from marco.synthesis.build import assistant_turn, path_text, preference_pairs, synthesize, unfinished_reason
from marco.synthesis.config import SynthesisConfig, SynthesisResult
from marco.synthesis.job import export_run, plan_synthesis, run_synthesis

__all__ = [
    "SynthesisConfig",
    "SynthesisResult",
    "assistant_turn",
    "export_run",
    "path_text",
    "plan_synthesis",
    "preference_pairs",
    "run_synthesis",
    "synthesize",
    "unfinished_reason",
]
