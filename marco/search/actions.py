"""Action granularity: where one generated continuation is cut into a tree node.

- ``ministep:N``: exactly the first N generated tokens (fewer only when the generation ended sooner).
- ``step``: up to the first blank line inside ``<Thought>``, or the end of the thought, whichever comes
  first (capped at ``max_step_tokens``); a marker that spans the parent's last tokens and the new ones
  counts. After the thought has closed, the rest of a sample (the output) is one step.

Cut points are found on token boundaries by decoding prefixes; "contains the marker" is monotone in the
prefix length, so a binary search needs O(log n) decodes.
"""

from __future__ import annotations

from typing import Callable, Sequence

BLANK_LINE = "\n\n"
THOUGHT_END = "</Thought>"

Decode = Callable[[Sequence[int]], str]


def first_prefix_containing(decode: Decode, ids: Sequence[int], marker: str, start_text: str = "") -> int | None:
    """Smallest k such that ``start_text + decode(ids[:k])`` contains ``marker`` beyond ``start_text``."""
    offset = max(0, len(start_text) - len(marker) + 1)

    def has(k: int) -> bool:
        return marker in (start_text + decode(ids[:k]))[offset:]

    if not ids or not has(len(ids)):
        return None
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if has(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def last_prefix_before(decode: Decode, ids: Sequence[int], marker: str) -> int | None:
    """Largest k such that ``decode(ids[:k])`` ends before ``marker`` starts (None: no marker)."""
    text = decode(ids)
    at = text.find(marker)
    if at < 0:
        return None
    lo, hi = 0, len(ids)
    while lo < hi:  # largest k with len(decode(ids[:k])) <= at and no marker inside
        mid = (lo + hi + 1) // 2
        if len(decode(ids[:mid])) <= at:
            lo = mid
        else:
            hi = mid - 1
    return lo


def action_length(
    decode: Decode, ids: Sequence[int], ministep: int | None, max_step_tokens: int, before: Sequence[int] = (),
    thought_open: bool = True,
) -> int:
    """How many of ``ids`` form the next action (at least 1 when ``ids`` is not empty).

    ``before`` holds the generated tokens of the path so far (only its tail is decoded) and
    ``thought_open`` says whether the path is still inside ``<Thought>``. A step splits only inside the
    thought: at the first blank line or ``</Thought>``, also one that starts in the parent's tokens and
    ends in these (a step cut after "...5.\n" is followed by a step "\n"); once the thought is closed
    the rest of the sample (the output) is one step.
    """
    if not ids:
        return 0
    if ministep is not None:
        return min(ministep, len(ids))
    if not thought_open:
        return len(ids)
    window = list(ids[:max_step_tokens])
    tail = decode(list(before[-8:])) if before else ""
    # a parent that already ended at a blank line starts no new one with its last newline
    blank_tail = "" if tail.endswith(BLANK_LINE) else tail
    cuts = [k for k in (
        first_prefix_containing(decode, window, BLANK_LINE, blank_tail),
        first_prefix_containing(decode, window, THOUGHT_END, tail),
    ) if k]
    return min(cuts) if cuts else len(window)
