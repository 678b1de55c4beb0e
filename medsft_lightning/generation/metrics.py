"""Generation metrics at validation: ROUGE-L of generated answers against the references, think-format rate.

ROUGE-L comes from torchmetrics with a CJK-aware tokenizer. torchmetrics' default normalizer replaces every
character outside ``[a-z0-9]`` by a space, so a Chinese answer becomes an empty token list and scores 0 whatever
it says. :func:`cjk_tokens` instead makes each CJK character one token and each run of other letters/digits
(lower-cased) one word token; punctuation (ASCII and CJK) is dropped, as the default normalizer drops ASCII
punctuation, so ``，`` and ``。`` (in nearly every Chinese sentence) do not inflate the common subsequence.

Caveat: on Chinese this is *character-level* ROUGE-L (no word segmentation, no jieba dependency), on English
it is word-level; the two scales are not comparable (character overlap is much higher by chance), so compare a
number only with runs on the same language and data.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torchmetrics.functional.text.rouge import rouge_score

from medsft_lightning.data.encoding import build_prompts
from medsft_lightning.generation.generate import (
    Generation,
    check_room,
    generate_batch,
    generation_mode,
    truncation,
)

# CJK ideographs (unified, extension A, compatibility, extensions B-G), kana and Hangul syllables.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af\U00020000-\U0003134f"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+")


def normalize(text: str) -> str:
    """NFKC (full-width ``ＣＴ１`` → ``CT1``) and lower case."""
    return unicodedata.normalize("NFKC", text).lower()


def cjk_tokens(text: str) -> list[str]:
    """ROUGE tokens of normalized text: one per CJK character, one per run of other letters/digits.

    Punctuation, spaces and ``_`` separate tokens and are dropped. On ASCII text this gives the same tokens
    as torchmetrics' default (``[a-z0-9]+`` runs of the lower-cased text).

    >>> cjk_tokens("ct检查: 正常, 2 次")
    ['ct', '检', '查', '正', '常', '2', '次']
    """
    return _TOKEN.findall(text)


def rouge_l_f1(preds: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 over ``(generated, reference)`` pairs, CJK-aware (see the module docstring).

    Per pair ``F1 = 2·LCS / (len(pred) + len(ref))`` in tokens; an empty side scores 0.

    Raises:
        ValueError: no pairs, or ``preds`` and ``references`` differ in length.
    """
    if not preds or len(preds) != len(references):
        raise ValueError(f"rouge_l_f1 needs as many predictions as references (>= 1); got {len(preds)} "
                         f"predictions and {len(references)} references")
    scores = rouge_score(list(preds), list(references), rouge_keys="rougeL", normalizer=normalize,
                         tokenizer=cjk_tokens)
    return float(scores["rougeL_fmeasure"])


class GenerationMetrics(L.Callback):
    """Generate answers for the first validation rows at every validation; log ROUGE-L and the format rate.

    Off by default (``num_rows=0``): it generates ``num_rows`` full answers at every validation, which costs
    minutes on a GPU for a real model. When on, at the end of every validation (not the sanity check) rank zero
    generates in batches under :func:`~medsft_lightning.generation.generate.generation_mode` (eval, KV cache on,
    checkpointing off, training state and RNG restored exactly afterwards) and logs to every logger at the
    trainer's global step: ``val_gen/rougeL`` (mean ROUGE-L F1 of the answer after ``</think>`` against the
    reference answer, character-level on Chinese: see :func:`rouge_l_f1`), ``val_gen/think_format_rate`` (share
    of well-formed ``<think>…</think>`` + answer generations), ``val_gen/truncation_rate`` (share cut off at
    ``max_new_tokens``, ``finish_reason: length``) and ``val_gen/answer_chars`` (mean answer length). A
    generation cut off before ``</think>`` counts its whole text as the answer. At fit start a warning names a
    ``max_new_tokens`` below the longest reference completion of the validation rows. Other ranks wait;
    under FSDP2 (a sharded model's forward needs all ranks) every rank generates the same rows in lockstep.

    Args:
        num_rows: how many validation rows (the first ones of the validation split) to answer; 0: off.
        batch_size: prompts generated together (left-padded).
        generation: decoding settings; ``None``: ``Generation()`` (the model's own sampling settings, else
            Qwen3's, and ``max_new_tokens=2048``: room for the think block).
    """

    def __init__(self, num_rows: int = 0, batch_size: int = 8, generation: Generation | None = None) -> None:
        if num_rows < 0:
            raise ValueError(f"--gen_metrics.num_rows={num_rows}: use 0 (off) or a positive number of rows")
        if batch_size < 1:
            raise ValueError(f"--gen_metrics.batch_size={batch_size}: use 1 or more")
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.generation = generation or Generation()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.num_rows:
            check_room(self.generation, trainer, "gen_metrics.generation")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.num_rows == 0 or trainer.sanity_checking:
            return
        if trainer.is_global_zero or getattr(pl_module, "fsdp_root", None) is not None:
            self._record(trainer, self._evaluate(trainer, pl_module))  # rank zero only
        trainer.strategy.barrier("generation_metrics")

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        rows = trainer.datamodule.val_rows.rows[: self.num_rows]
        tokenizer = trainer.datamodule.load_tokenizer()
        prompts = build_prompts(rows, tokenizer, trainer.datamodule.hparams.system_prompt)
        model, root, outputs, start = pl_module.model, getattr(pl_module, "fsdp_root", None), [], time.perf_counter()
        with generation_mode(model, self.generation.seed, root):
            for i in range(0, len(prompts), self.batch_size):
                outputs += generate_batch(model, tokenizer, prompts[i : i + self.batch_size], self.generation)
        answers, (truncated, truncation_rate) = [o["answer"] for o in outputs], truncation(outputs)
        return {
            "val_gen/rougeL": rouge_l_f1(answers, [r["answer"] for r in rows]),
            "val_gen/think_format_rate": sum(o["well_formed"] for o in outputs) / len(outputs),
            "val_gen/truncation_rate": truncation_rate,
            "val_gen/answer_chars": sum(len(a) for a in answers) / len(answers),
            "truncated": truncated,
            "seconds": time.perf_counter() - start,
            "rows": len(rows),
        }

    @rank_zero_only
    def _record(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        step = trainer.global_step
        logged = {k: v for k, v in metrics.items() if k.startswith("val_gen/")}
        for lg in trainer.loggers:
            lg.log_metrics(logged, step=step)
        rank_zero_info(
            f"[gen_metrics] step {step}: rougeL {metrics['val_gen/rougeL']:.4f}, think_format_rate "
            f"{metrics['val_gen/think_format_rate']:.2f}, {metrics['truncated']} of {metrics['rows']} truncated at "
            f"max_new_tokens={self.generation.max_new_tokens}, answer {metrics['val_gen/answer_chars']:.0f} chars "
            f"({metrics['rows']} rows, {metrics['seconds']:.1f} s)"
        )
