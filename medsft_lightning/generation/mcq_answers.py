"""The answer letters of a generated reply to a multiple-choice question, read from the text after ``</think>``.

Only the answer counts: a think block mentions every option while weighing them, and a reply whose think was
never closed (cut by the token limit) has no answer at all. In the answer the last explicit statement wins
(``答案：C``, ``答案为 A、B、D``, ``正确答案是C``, ``故选B``, ``Answer: C``, ``The answer is (B)``,
``**Answer:** A and C``, ``\\boxed{D}``, ``the correct option is E``); without one, an answer that opens with a
letter (``B. 急性心肌梗死``, ``(C)``, ``A、C``) gives it. Letters must be upper-case and stand alone (``Answer: DNA``
is no ``D``), and every one must be among the question's options. Anything else is unparseable: counted as
wrong and reported with its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from medsft_lightning.data.formatting import THINK_CLOSE, THINK_OPEN

_LETTERS = r"[A-H]+(?![A-Za-z])"
_GROUP = rf"(?P<letters>{_LETTERS}(?:\s*(?:[、,，/&]|and|和|及|与)?\s*{_LETTERS})*)"
_OPEN = r"\s*[:：]?\s*\**\s*[:：]?\s*[（(\[]?\s*"
MARKERS = [
    re.compile(r"答案\s*(?:应?[是为選选]|應為)?" + _OPEN + _GROUP),
    re.compile(r"(?:应|故|因此|所以)?选(?:择)?" + _OPEN + _GROUP),
    re.compile(r"(?i:\b(?:final\s+)?answer\b(?:\s+is)?)" + _OPEN + r"(?:(?i:option)\s+)?" + _GROUP),
    re.compile(r"(?i:\bcorrect\s+(?:option|choice|answers?)\s+(?:is|are))" + _OPEN + _GROUP),
    re.compile(r"\\boxed\{\s*" + _GROUP + r"\s*\}"),
]
LEADING = re.compile(r"^\s*[（(]?\s*" + _GROUP + r"\s*[)）]?(?:[\.．、:：\s]|$)")


@dataclass(frozen=True)
class Extracted:
    """The letters read (sorted, distinct; ``None`` when unparseable) and, when unparseable, why."""

    letters: str | None
    reason: str | None = None


def answer_part(raw: str, thinking: bool) -> str | None:
    """The answer of a reply: the text after ``</think>``; ``None`` when ``thinking`` and the think never closed.
    Without thinking the whole reply is the answer (less any think block it wrote anyway)."""
    if THINK_CLOSE in raw:
        return raw.split(THINK_CLOSE, 1)[1].strip()
    if thinking:
        return None
    return raw.replace(THINK_OPEN, "").strip()


def _letters(group: str) -> str:
    return "".join(sorted({ch for ch in group if "A" <= ch <= "H"}))


def extract_letters(raw: str, options: str, thinking: bool = True) -> Extracted:
    """The answer letters of one reply (see the module docstring).

    Args:
        raw: the generated text (``<think>…</think>`` included when there is one).
        options: the question's option letters, e.g. ``"ABCDE"``.
        thinking: the reply was generated with thinking on (then only the text after ``</think>`` counts).

    >>> extract_letters("<think>A or B? A is wrong.</think>\\n\\n答案：B", "ABCD")
    Extracted(letters='B', reason=None)
    >>> extract_letters("<think>A is wrong, so", "ABCD").reason
    'think not closed: no answer'
    """
    answer = answer_part(raw, thinking)
    if answer is None:
        return Extracted(None, "think not closed: no answer")
    if not answer:
        return Extracted(None, "empty answer")
    found = None
    for pattern in MARKERS:
        for match in pattern.finditer(answer):
            if found is None or match.start() >= found.start():
                found = match
    found = found or LEADING.match(answer)
    if found is None:
        return Extracted(None, "no answer letter")
    letters = _letters(found.group("letters"))
    if not set(letters) <= set(options):
        return Extracted(None, f"letter(s) {letters} not among the options {options}")
    return Extracted(letters)
