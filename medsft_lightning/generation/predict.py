"""``medsft predict``'s answer file, written so that a killed run resumes exactly, and only a run of the same model,
decoding settings and questions resumes it (the record beside it: :mod:`~medsft_lightning.generation.answer_record`;
the questions it answers: :mod:`medsft_lightning.data.questions`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from medsft_lightning.data.sources import DataError
from medsft_lightning.generation.answer_record import (
    differences,
    local_or_id,
    make_record,
    read_record,
    record_path,
    weights_fingerprint,
    write_record,
)
from medsft_lightning.generation.generate import truncation
from medsft_lightning.generation.wrapped import base_model

logger = logging.getLogger(__name__)
OUTPUT_FIELDS = ("id", "question", "think", "answer", "raw", "finish_reason", "num_generated_tokens")
HOW_TO_GO_ON = ("pass another --predict_writer.output_path, or --predict_writer.overwrite true to discard them and "
                "answer every question anew")


class AnswersOfAnotherRun(DataError):
    """The answers file holds answers that another model, other decoding settings or other questions wrote, or that
    no record vouches for: appending this run's answers would mix the two."""


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
    the file in input order. Rerunning with the same path answers only the rows not written yet, provided the
    same model, decoding settings and questions wrote them: ``<output_path>.meta.json`` records these
    (:mod:`~medsft_lightning.generation.answer_record`); otherwise the run stops at its start with one line naming
    what differs, before any answer is written. An answers file without that record (written before medsft kept
    one, or by hand) is refused the same way.

    With several processes each rank answers every N-th row and appends to its own part file
    (``output_path`` on rank zero, ``output_path.rank<r>`` on the others); at the end rank zero merges
    them into ``output_path`` in input order and removes the parts.

    Logs the decoding settings at the start (``model.generation``, resolved against the model's generation
    config) and, at the end, how many answers stopped at ``max_new_tokens`` (``finish_reason: length``).

    Args:
        output_path: the JSON-lines file of answers.
        overwrite: discard the answers already in ``output_path`` (and its record) and answer every question anew;
            ``false`` resumes them when the same model, decoding settings and questions wrote them, else stops.
    """

    def __init__(self, output_path: str = "predictions.jsonl", overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.overwrite = overwrite
        self._answered: list = []  # ids already in the file when the run started
        self._checked = False

    def _parts(self) -> list[Path]:
        path = Path(self.output_path)
        return [path, *sorted(path.parent.glob(f"{path.name}.rank*"))] if path.parent.is_dir() else [path]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        self._checked, record = False, record_path(self.output_path)
        if self.overwrite:
            done = []
            if trainer.is_global_zero:  # before the other ranks append to their parts (Lightning's post_setup barrier)
                dropped = sum(len(read_answers(part)) for part in self._parts())
                for old in [*self._parts(), record]:
                    old.unlink(missing_ok=True)
                if dropped:
                    logger.info("[predict] --predict_writer.overwrite: discarded %d answer(s) in %s", dropped,
                                self.output_path)
        else:
            done = [a["id"] for part in self._parts() for a in read_answers(part)]
            if done and not record.is_file():
                raise AnswersOfAnotherRun(
                    f"{self.output_path} holds {len(done)} answer(s) but no record {record.name} of the model, "
                    f"decoding settings and questions that wrote them (written before medsft kept one, or by hand), "
                    f"so they cannot be resumed: {HOW_TO_GO_ON}")
        self._answered = done
        trainer.datamodule.predict_skip_ids = set(done)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_and_record(trainer, pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict" and not self._checked:  # every question was answered: no predict loop ran
            self._check_and_record(trainer, pl_module)

    def _check_and_record(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop if the answers already in the file are another run's; else record this run beside the file. Runs
        once the model is loaded and ``--ckpt_path`` restored, before the first answer."""
        self._checked = True
        record, settings = run_record(trainer, pl_module)
        if settings is not None and trainer.is_global_zero:
            logger.info("[predict] decoding: %s (--model.generation.*)", settings.describe())
        path = record_path(self.output_path)
        if self._answered:
            try:
                changed = differences(read_record(path) or {}, record, self._answered)
            except ValueError as err:
                changed = [str(err)]
            if changed:
                raise AnswersOfAnotherRun(f"{self.output_path} holds {len(self._answered)} answer(s) of another run "
                                          f"({'; '.join(changed)}): {HOW_TO_GO_ON}")
            logger.info("[predict] %s already holds %d answer(s) of this model, decoding settings and questions "
                        "(%s): answering only the rest", self.output_path, len(self._answered), path.name)
        if trainer.is_global_zero:
            write_record(path, record)

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


def run_record(trainer: L.Trainer, pl_module: L.LightningModule):
    """``(record, resolved generation settings)`` of this predict run (see :func:`~medsft_lightning.generation.
    answer_record.make_record`): the model as loaded (by this process, or by the vLLM engine), ``--ckpt_path``, the
    settings resolved against the model's generation config, and the prompt ids of every question."""
    hp = getattr(pl_module, "hparams", {})
    engine = getattr(pl_module, "predict_engine", None)
    if engine is not None:
        folder, dtype, config = engine.model, engine.dtype, engine.generation_config
    else:
        lm = base_model(pl_module.model)
        folder, dtype = lm.name_or_path, str(lm.dtype).removeprefix("torch.")
        config = getattr(lm, "generation_config", None)
    ckpt = str(trainer.ckpt_path) if trainer.ckpt_path else None
    lora = hp.get("lora")
    model = {"source": local_or_id(hp.get("model_name_or_path") or folder), "revision": hp.get("model_revision"),
             "weights": weights_fingerprint(folder) if folder and Path(folder).exists() else None,
             "checkpoint": local_or_id(ckpt), "checkpoint_weights": weights_fingerprint(ckpt) if ckpt else None,
             "lora": dataclasses.asdict(lora) if dataclasses.is_dataclass(lora) else lora, "dtype": dtype}
    generation = getattr(pl_module, "generation", None)
    settings = generation.resolved(config) if generation is not None else None
    decoding = {"engine": "hf" if engine is None else "vllm", **(dataclasses.asdict(settings) if settings else {})}
    rows = trainer.datamodule.predict_rows
    return make_record(model, decoding, ((r["id"], r["prompt_ids"]) for r in rows)), settings


def log_written(answers: list[dict], path: Path, max_new_tokens: int | None) -> None:
    """The end-of-run line: answers written, and how many stopped at ``max_new_tokens`` (a warning if any)."""
    cut, share = truncation(answers)
    where = f"max_new_tokens={max_new_tokens}" if max_new_tokens is not None else "max_new_tokens"
    if not cut:
        logger.info("[predict] wrote %d answer(s) to %s; none stopped at %s", len(answers), path, where)
        return
    logger.warning("[predict] wrote %d answer(s) to %s; %d of %d (%.0f%%) stopped at %s (finish_reason: length): "
                   "raise --model.generation.max_new_tokens", len(answers), path, cut, len(answers), 100 * share, where)
