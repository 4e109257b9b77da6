"""Numbers in model output: find them in any script and normalise them to a canonical string.

Rules (pinned, tested in ``tests/test_extract.py``):

* Digits of any script count: every character with a Unicode *decimal* value (Bengali ৩, Telugu ౩,
  Thai ๓, Devanagari ३, Arabic-Indic ٣, full-width ３, ...) reads as its ASCII digit. ``unicodedata.decimal``
  rather than ``unicodedata.digit``: the latter also maps superscripts and circled digits, so the ``²`` of
  ``25 m²`` would read as a number.
* Group separators: ``,`` and ``.``, no-break / narrow no-break / thin spaces and ``'``; a plain space or
  a full-width ``，`` only when exactly three digits follow (``70 000``, ``２，１２５``). Groups after the
  first have three digits; with commas the Indian lakh style (``1,00,000``) is accepted too.
* ``,`` versus ``.``: when both occur, the one that comes last is the decimal mark (``1,234.5`` and
  ``1.234,5`` are both 1234.5). When only one kind occurs, several times, it groups (``1.234.567``). When it
  occurs once it groups if exactly three digits follow and the leading part is 1-3 digits not starting with
  0 (``2,125``, ``2.125``: 2125, whatever the language: MGSM answers are integers and its own answer column
  writes ``2,125`` in every language); otherwise it is a decimal mark (``2.5``, ``1,25``, ``0.125``).
  The price: an English ``3.125`` reads as 3125.
* A sequence that fits none of these (``1,2,3``) is read as separate numbers.
* A ``-`` or ``−`` directly before the number (or before a currency sign that precedes it) makes it negative
  unless a letter or digit comes right before the sign: ``-3`` and ``= −3`` are negative, ``16-3`` is not.
* Currency and percent signs around a number are ignored.

Canonical form: plain ASCII, no grouping, no trailing zeros, no ``-0``: ``"70000"``, ``"2.5"``, ``"-3"``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

_SPACES = "\u00a0\u202f\u2009'\u2019"
# A plain space or a full-width comma only groups when exactly three digits follow: elsewhere they separate
# list items ("16，3" in Chinese is two numbers).
_NUMBER = re.compile(rf"\d+(?:(?:[.,{_SPACES}]|[ \uff0c](?=\d{{3}}(?!\d)))\d+)*")
_MINUS = "-\u2212"
_CURRENCY = "$€£¥₹৳฿₽₩₦₱円元"


@dataclass(frozen=True)
class NumberMatch:
    """A number found in a text: its canonical value and where it was (in the original text)."""

    value: str
    start: int
    end: int


def ascii_digits(text: str) -> str:
    """``text`` with every decimal digit of any script replaced by its ASCII digit (same length)."""
    if text.isascii():
        return text
    out = []
    for ch in text:
        if not ch.isascii():
            value = unicodedata.decimal(ch, None)
            if value is not None:
                ch = str(value)
        out.append(ch)
    return "".join(out)


def canonical(value: Decimal) -> str:
    """The canonical string of a number: ``Decimal('2.50')`` -> ``"2.5"``, ``-0`` -> ``"0"``."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _grouped(groups: list[str], comma: bool) -> bool:
    first, rest = groups[0], groups[1:]
    if not 1 <= len(first) <= 3 or (first.startswith("0") and len(first) > 1):
        return False
    if all(len(g) == 3 for g in rest):
        return True
    # Indian grouping: 1,00,000 and 12,34,56,789 (two-digit groups, then a last group of three).
    return comma and len(first) <= 2 and len(rest[-1]) == 3 and all(len(g) == 2 for g in rest[:-1])


def parse_number(token: str) -> Decimal | None:
    """The value of one number token with ASCII digits and separators, or None if its grouping is invalid."""
    seps = [(i, c) for i, c in enumerate(token) if not c.isdigit()]
    if not seps:
        return Decimal(token)
    marks = {c for _, c in seps if c in ".,"}
    spaces = [i for i, c in seps if c not in ".,"]
    decimal_at: int | None = None
    if len(marks) == 2:
        decimal_at = seps[-1][0]
        if sum(1 for _, c in seps if c == token[decimal_at]) != 1:
            return None
    elif len(marks) == 1:
        mark = marks.pop()
        positions = [i for i, c in seps if c == mark]
        if len(positions) == 1:
            at = positions[0]
            if spaces:
                if at != seps[-1][0]:
                    return None
                decimal_at = at
            else:
                head, tail = token[:at], token[at + 1:]
                if not (len(tail) == 3 and 1 <= len(head) <= 3 and not head.startswith("0")):
                    decimal_at = at
    integer, fraction = (token, "") if decimal_at is None else (token[:decimal_at], token[decimal_at + 1:])
    if not fraction.isdigit() and fraction:
        return None
    group_seps = {c for c in integer if not c.isdigit()}
    if len(group_seps) > 1:
        return None
    if group_seps:
        groups = re.split(r"\D", integer)
        if not _grouped(groups, comma=group_seps == {","}):
            return None
    digits = re.sub(r"\D", "", integer)
    try:
        return Decimal(f"{digits}.{fraction}" if fraction else digits)
    except InvalidOperation:  # pragma: no cover - the regex admits digits only
        return None


def _negative(text: str, start: int) -> bool:
    i = start - 1
    if i >= 0 and text[i] in _CURRENCY:
        i -= 1
    if i < 0 or text[i] not in _MINUS:
        return False
    before = text[i - 1] if i > 0 else ""
    return not before.isalnum()


def find_numbers(text: str) -> list[NumberMatch]:
    """Every number in ``text``, in order, with canonical values (see the module rules)."""
    digits = ascii_digits(text)
    found: list[NumberMatch] = []
    for m in _NUMBER.finditer(digits):
        value = parse_number(m.group())
        if value is not None:
            if _negative(digits, m.start()):
                value = -value
            found.append(NumberMatch(canonical(value), m.start(), m.end()))
            continue
        for part in re.finditer(r"\d+", m.group()):
            start = m.start() + part.start()
            value = Decimal(part.group())
            if part.start() == 0 and _negative(digits, start):
                value = -value
            found.append(NumberMatch(canonical(value), start, start + len(part.group())))
    return found


def last_number(text: str) -> str | None:
    """The canonical value of the last number in ``text``, or None when it has none."""
    found = find_numbers(text)
    return found[-1].value if found else None


def normalize_number(text: str) -> str | None:
    """The canonical value when ``text`` is a single number (signs, currency and ``%`` allowed), else None.

    Used to read reference answers, where anything besides one number is an error.
    """
    found = find_numbers(text)
    if len(found) != 1:
        return None
    rest = ascii_digits(text)[: found[0].start] + ascii_digits(text)[found[0].end:]
    if re.sub(rf"[\s{re.escape(_MINUS + _CURRENCY)}%+]", "", rest):
        return None
    return found[0].value
