"""Rows → token ids and labels, through the tokenizer's own chat template.

The prompt (everything up to and including the assistant header ``<|im_start|>assistant\\n``) is
masked with -100; the assistant turn (``<think>…</think>`` + answer) is supervised through its
``<|im_end|>``; the newline the template writes after ``<|im_end|>`` stays masked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from medsft_lightning.data.collate import IGNORE_INDEX
from medsft_lightning.data.formatting import prompt_messages, row_to_messages

END_OF_TURN = "<|im_end|>"


class TemplateError(ValueError):
    """The chat template renders the prompt differently inside and outside the full conversation."""


def encode_rows(
    rows: Sequence[Mapping[str, object]],
    tokenizer,
    *,
    system_prompt: str | None,
    max_length: int,
) -> list[dict | None]:
    """Encode many rows at once (one batched fast-tokenizer call); ``None`` where nothing is supervised.

    Each result holds ``input_ids``, ``attention_mask``, ``labels`` (lists of int, equal length,
    at most ``max_length``), ``num_supervised``, ``truncated`` and ``length`` (tokens before truncation).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    full_texts = tokenizer.apply_chat_template(
        [row_to_messages(r, system_prompt) for r in rows], tokenize=False
    )
    prompt_texts = tokenizer.apply_chat_template(
        [prompt_messages(r, system_prompt) for r in rows], tokenize=False, add_generation_prompt=True
    )
    full_ids = tokenizer(full_texts, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)

    out: list[dict | None] = []
    for i, (ids, prompt) in enumerate(zip(full_ids, prompt_ids)):
        if not full_texts[i].startswith(prompt_texts[i]) or ids[: len(prompt)] != prompt:
            raise TemplateError(
                f"row {i}: the tokenizer's chat template does not render the prompt as a prefix of the "
                "full conversation, so the prompt/answer boundary is ambiguous; use a Qwen3-style template"
            )
        ends = [j for j in range(len(prompt), len(ids)) if ids[j] == end_id]
        stop = ends[-1] + 1 if ends else len(ids)
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt) : stop] + [IGNORE_INDEX] * (len(ids) - stop)
        truncated = len(ids) > max_length
        ids, labels = ids[:max_length], labels[:max_length]
        num_supervised = sum(label != IGNORE_INDEX for label in labels)
        if num_supervised == 0:
            out.append(None)
            continue
        out.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": labels,
                "num_supervised": num_supervised,
                "truncated": truncated,
                "length": len(full_ids[i]),
            }
        )
    return out


def token_lengths(rows: Sequence[Mapping[str, object]], tokenizer, *, system_prompt: str | None) -> list[int]:
    """Tokens of each row's full conversation, untruncated (what ``encode_rows`` reports as ``length``)."""
    texts = tokenizer.apply_chat_template([row_to_messages(r, system_prompt) for r in rows], tokenize=False)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def encode_example(
    example: Mapping[str, object],
    tokenizer,
    *,
    system_prompt: str | None,
    max_length: int,
) -> dict | None:
    """Encode one row (``question``, ``think``, ``answer``) for supervised fine-tuning.

    Args:
        example: the row; other keys are ignored.
        tokenizer: a Hugging Face tokenizer with a chat template (Qwen3's, or medsft's tiny one).
        system_prompt: the system turn (``None``/``""`` for none).
        max_length: keep at most this many tokens (the end of the answer is cut first).

    Returns:
        ``{"input_ids", "attention_mask", "labels"}`` as lists of int, with labels -100 on the prompt,
        or ``None`` when truncation leaves no supervised token.
    """
    (encoded,) = encode_rows([example], tokenizer, system_prompt=system_prompt, max_length=max_length)
    if encoded is None:
        return None
    return {key: encoded[key] for key in ("input_ids", "attention_mask", "labels")}


def build_prompts(rows: Sequence[Mapping], tokenizer, system_prompt: str | None) -> list[list[int]]:
    """Token ids of each row's prompt: the chat template with the assistant turn opened."""
    texts = tokenizer.apply_chat_template(
        [prompt_messages(r, r.get("system", system_prompt)) for r in rows], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
