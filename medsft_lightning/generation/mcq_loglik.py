"""``medsft eval --scorer loglik``: each option of a question scored by its log-likelihood after the prompt.

The prompt is the chat template's with ``enable_thinking=False`` (:func:`~medsft_lightning.data.mcq_prompt.render`:
Qwen3 pre-fills ``<think>\\n\\n</think>\\n\\n``), and each option's text, tokenized on its own, is the
continuation. Its log-likelihood is the sum of its tokens' log-probabilities; ``acc`` picks the option with
the largest, ``acc_norm`` the largest per character of the option's text (lm-evaluation-harness's
``multiple_choice`` definitions, which a test checks on the same prompts through its ``HFLM``). A
multi-answer question has no single option to pick: this scorer leaves it out and counts it.

Only the continuation positions go through the LM head (a ``[tokens × vocab]`` logits tensor of whole
sequences would not fit beside a real model's 151,936-token vocabulary); (question, option) pairs are batched
by length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from medsft_lightning.data.mcq_prompt import prompt_ids, render
from medsft_lightning.generation.wrapped import base_model


def pick(values: Sequence[float]) -> int:
    """Index of the largest value (the first on a tie, as ``numpy.argmax``)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def pairs_of(tokenizer, questions: Sequence[Mapping], system_prompt: str | None) -> list[tuple[int, list, list]]:
    """``(question index, prompt ids, option ids)`` for every option of every single-answer question."""
    texts = render(tokenizer, questions, "loglik", system_prompt)
    prompts = prompt_ids(tokenizer, texts)
    out = []
    for index, (question, prompt) in enumerate(zip(questions, prompts)):
        options = list(question["options"].values())
        encoded = tokenizer(options, add_special_tokens=False)["input_ids"]
        out += [(index, prompt, ids) for ids in encoded]
    return out


@torch.inference_mode()
def continuation_logliks(model, pairs: Sequence[tuple[list, list]], pad_id: int, batch_size: int = 8,
                         on_batch: Callable[[int], None] | None = None) -> list[float]:
    """The summed log-probability of each ``(prompt ids, continuation ids)`` pair's continuation, in order."""
    lm = base_model(model)
    device = next(lm.parameters()).device
    weight = lm.get_output_embeddings().weight
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    out = [0.0] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        hidden = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        for row, i in enumerate(chunk):
            prompt, cont = pairs[i]
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(cont) - 1, device=device)
            logits = (hidden[row, positions] @ weight.t()).float()
            target = torch.tensor(cont, device=device)
            out[i] = float(torch.log_softmax(logits, dim=-1).gather(-1, target[:, None]).sum())
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def score_loglik(model, tokenizer, questions: Sequence[Mapping], system_prompt: str | None, batch_size: int = 8,
                 progress: Callable[[int], None] | None = None) -> list[dict | None]:
    """Per question: ``logliks`` per option letter, the ``acc`` and ``acc_norm`` picks and whether each is right;
    ``None`` for a multi-answer question (not scored here).

    Args:
        model: a causal LM in eval mode (a peft wrapper is unwrapped).
        tokenizer: its tokenizer with a Qwen3-style chat template.
        questions: questions in medsft's schema.
        system_prompt: the system turn (``None``: none).
        batch_size: (question, option) sequences per forward pass.
        progress: called with the number of sequences each batch scored.
    """
    single = [i for i, q in enumerate(questions) if len(q["answer"]) == 1]
    chosen = [questions[i] for i in single]
    pairs = pairs_of(tokenizer, chosen, system_prompt) if chosen else []
    lls = continuation_logliks(model, [(p, c) for _, p, c in pairs], tokenizer.pad_token_id, batch_size, progress)
    per: dict[int, list[float]] = {}
    for (index, _, _), ll in zip(pairs, lls):
        per.setdefault(index, []).append(ll)
    out: list[dict | None] = [None] * len(questions)
    for local, index in enumerate(single):
        question, values = questions[index], per[local]
        letters = list(question["options"])
        lengths = [len(text) for text in question["options"].values()]
        acc, norm = letters[pick(values)], letters[pick([v / n for v, n in zip(values, lengths)])]
        out[index] = {"logliks": dict(zip(letters, values)), "chosen": acc, "chosen_norm": norm,
                      "correct": acc == question["answer"], "correct_norm": norm == question["answer"]}
    return out
