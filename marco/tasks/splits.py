"""Which datasets a pipeline may train on.

Evaluation splits measure a model; a model that has searched (and been fine-tuned on) one of them is no longer
measured by it. The policy, checked when a pipeline file is loaded:

- ``EVALUATION_ONLY``: MGSM, the translation test sets, the generated held-out tiers and the demo set. Never
  searched for synthesis, never trained on.
- ``TUNING``: ``arith``, the generated tuning split, chooses search settings (``marco compare``). It is not
  trained on either: 217 of the 500 ``arith-heldout`` problems share template and numbers with it, so a gain
  after training on it would partly be memorisation.
- Everything else (``arith-train``: 50,000 generated problems sharing no (template, numbers) tuple with any
  evaluation split) is trainable.
"""

from __future__ import annotations

EVALUATION_ONLY: frozenset[str] = frozenset(
    {"mgsm", "translation", "flores200", "wmt22", "arith-heldout", "arith-hard", "demo"}
)
TUNING: frozenset[str] = frozenset({"arith"})
TRAINING_SPLITS: tuple[str, ...] = ("arith-train",)


def check_trainable(dataset: str) -> None:
    """Raise :class:`ValueError` when ``dataset`` may not be searched for training data or trained on."""
    name = dataset.strip().lower()
    if name in EVALUATION_ONLY:
        raise ValueError(
            f"{dataset!r} is an evaluation split: a model trained on it can no longer be measured by it; "
            f"train on {' or '.join(TRAINING_SPLITS)} and list {dataset!r} under evaluation"
        )
    if name in TUNING:
        raise ValueError(
            f"{dataset!r} is the tuning split (for choosing search settings) and overlaps arith-heldout; "
            f"train on {' or '.join(TRAINING_SPLITS)} instead"
        )
