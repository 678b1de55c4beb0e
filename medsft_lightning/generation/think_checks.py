"""Does a Qwen3 thinking model still switch between its modes? Checks on one reply each, and their rates.

Three modes, the reply as generated (``raw``: ``<think>`` and ``</think>`` kept, the stop token left out):

- ``think`` (thinking on): ``starts_with_think`` (the reply opens with ``<think>``), ``closed_once`` (exactly one
  ``</think>``), ``answer_after`` (a non-empty answer follows it), ``no_second_think`` (no other ``<think>``),
  ``within_budget`` (ended by its stop token without the thinking budget forcing ``</think>``);
- ``no_think_flag`` (``enable_thinking=False``: the template pre-fills an empty think block): ``no_think_text``
  (neither tag in the reply: it did not think anyway), ``answered`` (non-empty), ``finished`` (its stop token);
- ``no_think_switch`` (``/no_think`` in the user turn; the template opens a thinking turn): ``empty_think_block``
  (the reply opens with ``<think>`` and only whitespace before ``</think>``), ``answer_after``, ``finished``.

A reply passes its mode when every check holds; the rates are shares of the replies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from medsft_lightning.data.formatting import THINK_CLOSE, THINK_OPEN

CHECKS = {
    "think": ("starts_with_think", "closed_once", "answer_after", "no_second_think", "within_budget"),
    "no_think_flag": ("no_think_text", "answered", "finished"),
    "no_think_switch": ("empty_think_block", "answer_after", "finished"),
}
MODE_LABELS = {"think": "thinking on", "no_think_flag": "enable_thinking=False", "no_think_switch": "/no_think"}
_EMPTY_BLOCK = re.compile(r"^\s*" + re.escape(THINK_OPEN) + r"\s*" + re.escape(THINK_CLOSE))


def _after_close(raw: str) -> str:
    return raw.split(THINK_CLOSE, 1)[1].strip() if THINK_CLOSE in raw else ""


def check_reply(mode: str, reply: Mapping) -> dict[str, bool]:
    """The checks of ``mode`` (see the module docstring) on one reply (``raw``, ``finish_reason``,
    ``forced_think_end``).

    >>> check_reply("no_think_switch", {"raw": "<think>\\n\\n</think>\\n\\n答案：B", "finish_reason": "stop"})
    {'empty_think_block': True, 'answer_after': True, 'finished': True}
    """
    raw, finished = reply["raw"], reply["finish_reason"] == "stop"
    if mode == "think":
        return {"starts_with_think": raw.lstrip().startswith(THINK_OPEN), "closed_once": raw.count(THINK_CLOSE) == 1,
                "answer_after": bool(_after_close(raw)), "no_second_think": raw.count(THINK_OPEN) <= 1,
                "within_budget": finished and not reply.get("forced_think_end", False)}
    if mode == "no_think_flag":
        return {"no_think_text": THINK_OPEN not in raw and THINK_CLOSE not in raw, "answered": bool(raw.strip()),
                "finished": finished}
    if mode == "no_think_switch":
        return {"empty_think_block": bool(_EMPTY_BLOCK.match(raw)), "answer_after": bool(_after_close(raw)),
                "finished": finished}
    raise ValueError(f"unknown thinking mode {mode!r}; one of {', '.join(CHECKS)}")


def rates(mode: str, replies: Sequence[Mapping]) -> dict[str, float | int | None]:
    """Share of ``replies`` passing each check of ``mode``, ``pass`` (all of them) and the count ``n``.

    >>> rates("no_think_flag", [{"raw": "B", "finish_reason": "stop"}, {"raw": "<think>x", "finish_reason": "length"}])
    {'no_think_text': 0.5, 'answered': 1.0, 'finished': 0.5, 'pass': 0.5, 'n': 2}
    """
    checked = [check_reply(mode, r) for r in replies]
    n = len(checked)
    out: dict[str, float | int | None] = {name: (sum(c[name] for c in checked) / n if n else None)
                                          for name in CHECKS[mode]}
    out["pass"] = sum(all(c.values()) for c in checked) / n if n else None
    out["n"] = n
    return out
