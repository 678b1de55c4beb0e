"""``medsft predict``'s answer file, written so that a killed run resumes exactly (the questions it answers:
:mod:`medsft_lightning.data.questions`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from medsft_lightning.generation.generate import truncation

logger = logging.getLogger(__name__)
OUTPUT_FIELDS = ("id", "question", "think", "answer", "raw", "finish_reason", "num_generated_tokens")


def read_answers(path: Path) -> list[dict]:
    """Complete answer lines of ``path``; a torn last line (killed mid-write) is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    good_end, answers = 0, []
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            answers.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good_end += len(line)
    if good_end < len(data):
        logger.warning("%s: dropping a torn last line (%d bytes) from an interrupted write", path, len(data) - good_end)
        with path.open("r+b") as f:
            f.truncate(good_end)
    return answers


class AnswerWriter(BasePredictionWriter):
    """Appends each batch's answers to ``output_path`` as soon as it is generated; at the end, rewrites
    the file in input order. Rerunning with the same path answers only the rows not written yet.

    With several processes each rank answers every N-th row and appends to its own part file
    (``output_path`` on rank zero, ``output_path.rank<r>`` on the others); at the end rank zero merges
    them into ``output_path`` in input order and removes the parts.

    Logs the decoding settings at the start (``model.generation``, resolved against the model's generation
    config) and, at the end, how many answers stopped at ``max_new_tokens`` (``finish_reason: length``).

    Args:
        output_path: the JSON-lines file of answers.
    """

    def __init__(self, output_path: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path

    def _parts(self) -> list[Path]:
        path = Path(self.output_path)
        return [path, *sorted(path.parent.glob(f"{path.name}.rank*"))] if path.parent.is_dir() else [path]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        done = {a["id"] for part in self._parts() for a in read_answers(part)}
        trainer.datamodule.predict_skip_ids = done
        if done:
            logger.info("[predict] %s already holds %d answer(s): answering only the rest", self.output_path, len(done))

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        settings = getattr(pl_module, "generation", None)
        if settings is not None and trainer.is_global_zero:
            model = getattr(pl_module, "model", None)
            resolved = settings.resolved(getattr(model, "generation_config", None))
            logger.info("[predict] decoding: %s (--model.generation.*)", resolved.describe())

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        path = Path(self.output_path)
        if trainer.global_rank:
            path = path.with_name(f"{path.name}.rank{trainer.global_rank}")
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps({k: p[k] for k in OUTPUT_FIELDS}, ensure_ascii=False) + "\n" for p in prediction)
        with path.open("a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("answer_writer")  # every rank's part is complete
        if not trainer.is_global_zero:
            return
        path = Path(self.output_path)
        order = {row["id"]: i for i, row in enumerate(trainer.datamodule.predict_rows)}
        parts = self._parts()
        answers = {a["id"]: a for part in parts for a in read_answers(part)}
        ordered = sorted(answers.values(), key=lambda a: order.get(a["id"], len(order)))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in ordered), encoding="utf-8")
        os.replace(tmp, path)
        for part in parts[1:]:
            part.unlink()
        log_written(ordered, path, getattr(getattr(pl_module, "generation", None), "max_new_tokens", None))


def log_written(answers: list[dict], path: Path, max_new_tokens: int | None) -> None:
    """The end-of-run line: answers written, and how many stopped at ``max_new_tokens`` (a warning if any)."""
    cut, share = truncation(answers)
    where = f"max_new_tokens={max_new_tokens}" if max_new_tokens is not None else "max_new_tokens"
    if not cut:
        logger.info("[predict] wrote %d answer(s) to %s; none stopped at %s", len(answers), path, where)
        return
    logger.warning("[predict] wrote %d answer(s) to %s; %d of %d (%.0f%%) stopped at %s (finish_reason: length): "
                   "raise --model.generation.max_new_tokens", len(answers), path, cut, len(answers), 100 * share, where)
