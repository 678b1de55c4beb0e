"""Pure functions between dataset rows and chat messages. No I/O, no tokenizer, no Lightning."""

from __future__ import annotations

from collections.abc import Mapping

# The seed tutorial's system prompt ("You are a medical expert; answer the user's question with
# your reasoning shown."), kept so that results compare with it.
DEFAULT_SYSTEM_PROMPT = "你是一个医学专家，你需要根据用户的问题，给出带有思考的回答。"

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


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
