"""``medsft compare``'s figures: teacher-forced metrics on the references, per-answer scores, the paired test.

Every figure here is defined once, in :data:`DEFINITIONS` (what the report prints beside it):

- teacher-forced (the reference conversation fed in, as at validation): ``val_loss`` (cross-entropy, token mean
  over the supervised tokens: the assistant turn through ``<|im_end|>``, exactly what ``medsft fit`` logs as
  ``val_loss``), ``perplexity`` (``exp(val_loss)``), ``token_accuracy`` (share of supervised tokens the argmax
  predicts), ``p_think_close`` / ``p_im_end`` (the mean probability given to ``</think>`` / ``<|im_end|>`` at the
  reference positions whose label is that token);
- generated answers: ``rougeL`` and ``bleu4`` (per question against the reference answer, then the mean),
  ``think_format_rate``, ``truncation_rate``, ``think_tokens`` / ``answer_tokens`` (mean lengths),
  ``tokens_per_s``;
- paired, per question, on ROUGE-L: the fine-tuned model's wins / losses / ties and the mean difference with
  a seeded 95% bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from medsft_lightning.data.collate import pad_collate
from medsft_lightning.data.encoding import END_OF_TURN, encode_rows
from medsft_lightning.data.formatting import THINK_CLOSE
from medsft_lightning.generation.metrics import cjk_tokens, normalize, rouge_l_f1
from medsft_lightning.generation.wrapped import base_model
from medsft_lightning.training.loss import chunked_cross_entropy

TEACHER_FORCED = ("val_loss", "perplexity", "token_accuracy", "p_think_close", "p_im_end")
GENERATED = ("rougeL", "bleu4", "think_format_rate", "truncation_rate", "think_tokens", "answer_tokens",
             "tokens_per_s")
DEFINITIONS = {
    "val_loss": "cross-entropy on the reference answers, token mean over the supervised tokens (the assistant turn "
                "through <|im_end|>), as medsft fit logs val_loss",
    "perplexity": "exp(val_loss)",
    "token_accuracy": "share of supervised reference tokens that the model's argmax predicts",
    "p_think_close": "mean probability given to </think> where the reference has it (teacher-forced)",
    "p_im_end": "mean probability given to <|im_end|> where the reference has it (teacher-forced)",
    "rougeL": "ROUGE-L F1 of the answer (after </think>) against the reference answer, per character on Chinese, "
              "per word on English; mean over the questions with a reference",
    "bleu4": "BLEU-4 (torchmetrics BLEUScore n_gram=4 smooth=True) per question on the same tokens (one per CJK "
             "character, one per Latin word, punctuation dropped); mean over the questions with a reference",
    "think_format_rate": "share of answers with one well-formed <think>…</think> block and a non-empty answer",
    "truncation_rate": "share of answers cut off at max_new_tokens (finish_reason: length)",
    "think_tokens": "mean tokens in the think block (the tokenizer's count; 0 when there is none)",
    "answer_tokens": "mean tokens in the answer (all of the text when </think> never came)",
    "tokens_per_s": "generated tokens (stop token included) per second of generation, all batches",
}
LABELS = {
    "val_loss": "val loss", "perplexity": "perplexity", "token_accuracy": "token accuracy",
    "p_think_close": "P(</think>)", "p_im_end": "P(<|im_end|>)", "rougeL": "ROUGE-L F1", "bleu4": "BLEU-4",
    "think_format_rate": "think-format rate", "truncation_rate": "truncation rate", "think_tokens": "think tokens",
    "answer_tokens": "answer tokens", "tokens_per_s": "tokens/s",
}


def has_reference(row: Mapping) -> bool:
    """A row teacher-forced metrics can use: a string ``think`` and a non-empty string ``answer``."""
    return isinstance(row.get("think"), str) and isinstance(row.get("answer"), str) and bool(row["answer"].strip())


@torch.no_grad()
def teacher_forced(model, tokenizer, rows: Sequence[Mapping], *, system_prompt: str | None, max_length: int,
                   batch_size: int = 8, chunk_size: int = 128) -> dict[str, float | int | None]:
    """Teacher-forced metrics (:data:`TEACHER_FORCED`) of ``model`` on the rows with a reference.

    Args:
        model: a causal LM (a peft wrapper is unwrapped), in eval mode.
        tokenizer: its tokenizer (with the chat template ``medsft fit`` encodes with).
        rows: rows with ``question``/``think``/``answer`` (rows without a reference are skipped).
        system_prompt: the system turn, as at training.
        max_length: rows are cut to this many tokens, as at training (``data.max_length``).
        batch_size: rows per forward pass (right-padded).
        chunk_size: supervised tokens per LM-head chunk (:func:`chunked_cross_entropy`).

    Returns:
        The figures (``None`` when no row has a reference), ``rows`` and ``tokens`` counted.
    """
    references = [r for r in rows if has_reference(r)]
    encoded = [e for e in (encode_rows(references, tokenizer, system_prompt=system_prompt, max_length=max_length)
                           if references else []) if e is not None]
    lm = base_model(model)
    device = next(lm.parameters()).device
    special = {"p_think_close": tokenizer.convert_tokens_to_ids(THINK_CLOSE),
               "p_im_end": tokenizer.convert_tokens_to_ids(END_OF_TURN)}
    loss = correct = count = 0.0
    prob_sum, prob_n = dict.fromkeys(special, 0.0), dict.fromkeys(special, 0)
    for start in range(0, len(encoded), batch_size):
        batch = pad_collate(encoded[start : start + batch_size], tokenizer.pad_token_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        hidden = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        weight = lm.get_output_embeddings().weight
        loss_sum, n, right = chunked_cross_entropy(hidden, weight, labels, chunk_size)
        loss, count, correct = loss + float(loss_sum), count + int(n), correct + int(right)
        targets, before = labels[:, 1:], hidden[:, :-1]
        for name, token in special.items():
            where = targets == token
            if where.any():
                logits = (before[where] @ weight.t()).float()
                prob_sum[name] += float(torch.softmax(logits, dim=-1)[:, token].sum())
                prob_n[name] += int(where.sum())
    out: dict[str, float | int | None] = dict.fromkeys(TEACHER_FORCED)
    if count:
        mean = loss / count
        out.update(val_loss=mean, perplexity=float(torch.tensor(mean, dtype=torch.float64).exp()),
                   token_accuracy=correct / count)
    out.update({name: prob_sum[name] / prob_n[name] if prob_n[name] else None for name in special})
    return {**out, "rows": len(encoded), "tokens": int(count)}


def bleu4(pred: str, reference: str) -> float:
    """Sentence BLEU-4 (smoothed) of ``pred`` against ``reference`` on CJK-aware tokens; an empty side scores 0.

    >>> bleu4("Rest and drink water.", "rest and drink water")
    1.0
    """
    from torchmetrics.text import BLEUScore

    pred_tokens, ref_tokens = cjk_tokens(normalize(pred)), cjk_tokens(normalize(reference))
    if not pred_tokens or not ref_tokens:
        return 0.0
    return float(BLEUScore(n_gram=4, smooth=True)([" ".join(pred_tokens)], [[" ".join(ref_tokens)]]))


def score_answer(output: dict, reference: str | None, tokenizer) -> dict:
    """One generation as ``pairs.jsonl`` keeps it, with its scores (``None`` without a reference).

    Args:
        output: a :func:`~medsft_lightning.generation.generate.generate_batch` dict.
        reference: the reference answer, if any.
        tokenizer: counts the think and answer tokens.
    """
    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    scored = {key: output[key] for key in ("think", "answer", "finish_reason", "num_generated_tokens", "well_formed")}
    scored.update(think_tokens=tokens(output["think"]), answer_tokens=tokens(output["answer"]), rougeL=None, bleu4=None)
    if reference:
        scored.update(rougeL=rouge_l_f1([output["answer"]], [reference]), bleu4=bleu4(output["answer"], reference))
    return scored


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def generation_summary(scored: Sequence[dict], seconds: float) -> dict[str, float | None]:
    """The generation figures (:data:`GENERATED`) of one model's scored answers."""
    scores = {key: [s[key] for s in scored if s[key] is not None] for key in ("rougeL", "bleu4")}
    generated = sum(s["num_generated_tokens"] for s in scored)
    return {
        "rougeL": _mean(scores["rougeL"]), "bleu4": _mean(scores["bleu4"]),
        "think_format_rate": _mean([float(s["well_formed"]) for s in scored]),
        "truncation_rate": _mean([float(s["finish_reason"] == "length") for s in scored]),
        "think_tokens": _mean([s["think_tokens"] for s in scored]),
        "answer_tokens": _mean([s["answer_tokens"] for s in scored]),
        "tokens_per_s": generated / seconds if seconds > 0 else None,
        "generated_tokens": generated, "seconds": seconds,
    }


def paired(base: Sequence[float | None], tuned: Sequence[float | None], *, resamples: int = 2000,
           seed: int = 0) -> dict[str, float | int | None]:
    """The fine-tuned model against the base, question by question (ROUGE-L; ``None`` pairs are left out).

    Args:
        base: the base model's per-question scores.
        tuned: the fine-tuned model's, same order.
        resamples: bootstrap resamples of the questions (with replacement).
        seed: the bootstrap's seed (the same figures every run).

    Returns:
        ``n``, ``wins`` / ``losses`` / ``ties`` (tuned above / below / equal to base), ``mean_diff`` (tuned -
        base) and its percentile bootstrap 95% interval ``ci_low``/``ci_high`` (``None`` without pairs).

    >>> paired([0.1, 0.2, 0.3], [0.2, 0.2, 0.1])["wins"], paired([0.1], [0.3])["ci_low"]
    (1, 0.2)
    """
    pairs = [(b, t) for b, t in zip(base, tuned, strict=True) if b is not None and t is not None]
    diffs = torch.tensor([t - b for b, t in pairs], dtype=torch.float64)
    out = {"n": len(pairs), "wins": int((diffs > 0).sum()), "losses": int((diffs < 0).sum()),
           "ties": int((diffs == 0).sum()), "mean_diff": None, "ci_low": None, "ci_high": None,
           "resamples": resamples, "seed": seed}
    if pairs:
        generator = torch.Generator().manual_seed(seed)
        means = diffs[torch.randint(0, len(pairs), (resamples, len(pairs)), generator=generator)].mean(dim=1)
        low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        out.update(mean_diff=float(diffs.mean()), ci_low=round(low, 12), ci_high=round(high, 12))
    return out
