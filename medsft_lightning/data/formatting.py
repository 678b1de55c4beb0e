"""Pure functions between dataset rows and chat messages. No I/O, no tokenizer, no Lightning."""

from __future__ import annotations

import random
from collections.abc import Mapping

# The seed tutorial's system prompt ("You are a medical expert; answer the user's question with
# your reasoning shown."), kept so that results compare with it.
DEFAULT_SYSTEM_PROMPT = "你是一个医学专家，你需要根据用户的问题，给出带有思考的回答。"

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
NO_THINK = "/no_think"  # Qwen3's soft switch: in a user turn, the model answers without thinking


def row_to_messages(row: Mapping[str, object], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """Turn one dataset row into chat messages for the tokenizer's chat template.

    Args:
        row: a mapping with string fields ``question``, ``think`` and ``answer`` (others ignored).
        system_prompt: the system turn; ``None`` or ``""`` leaves it out.

    Returns:
        ``[system, user(question), assistant(content=answer, reasoning_content=think)]``

    >>> row_to_messages({"question": "Q", "think": "T", "answer": "A"}, system_prompt="S")[2]
    {'role': 'assistant', 'content': 'A', 'reasoning_content': 'T'}
    """
    return prompt_messages(row, system_prompt) + [
        {"role": "assistant", "content": row["answer"], "reasoning_content": row["think"]}
    ]


def no_think_row(row: Mapping[str, object]) -> dict:
    """A row as a Qwen3 non-thinking turn: ``/no_think`` ends the question and the think is empty, so the chat
    template writes the empty think block ``<think>\n\n</think>\n\n`` before the answer (supervised: the model
    learns to emit it), as Qwen3's thinking-mode fusion data does.

    >>> no_think_row({"question": "Q?", "think": "T", "answer": "A"})
    {'question': 'Q? /no_think', 'think': '', 'answer': 'A'}
    """
    return {**row, "question": f"{row['question']} {NO_THINK}", "think": ""}


def no_think_indices(n: int, share: float, seed: int) -> list[int]:
    """Which of ``n`` rows become non-thinking turns: ``round(n * share)`` of them, chosen with ``seed``.

    >>> no_think_indices(10, 0.3, 42) == no_think_indices(10, 0.3, 42), len(no_think_indices(10, 0.3, 42))
    (True, 3)
    """
    return sorted(random.Random(f"no_think:{seed}").sample(range(n), round(n * share))) if share > 0 else []


def with_no_think(rows: list[dict], share: float, seed: int) -> tuple[list[dict], list[int]]:
    """``rows`` with :func:`no_think_indices`' rows as :func:`no_think_row`, and those indices
    (``data.no_think_share``); a share of 0 returns the very same list."""
    chosen = no_think_indices(len(rows), share, seed)
    if not chosen:
        return rows, []
    picked = set(chosen)
    return [no_think_row(r) if i in picked else r for i, r in enumerate(rows)], chosen


def prompt_messages(row: Mapping[str, object], system_prompt: str | None = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """The messages before the assistant turn: what the model sees at generation time."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": row["question"]})
    return messages


def split_think_answer(text: str) -> tuple[str, str, bool]:
    """Split a generated assistant turn into ``(think, answer, well_formed)``.

    ``well_formed`` is True when the text holds one ``<think>…</think>`` block (the opening tag may
    have been part of the prompt) followed by a non-empty answer.

    >>> split_think_answer("<think>\\nfever\\n</think>\\n\\nRest.")
    ('fever', 'Rest.', True)
    >>> split_think_answer("no tags here")
    ('', 'no tags here', False)
    """
    if THINK_CLOSE not in text:
        return "", text.strip(), False
    head, _, answer = text.partition(THINK_CLOSE)
    opened = head.count(THINK_OPEN)
    think = head.split(THINK_OPEN)[-1].strip()
    answer = answer.strip()
    well_formed = opened <= 1 and THINK_OPEN not in answer and THINK_CLOSE not in answer and bool(answer)
    return think, answer, well_formed
