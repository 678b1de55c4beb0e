"""Sample generations during training: what the model answers, logged to SwanLab and samples.jsonl."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from medsft_lightning.data.encoding import build_prompts
from medsft_lightning.generation.generate import (
    Generation,
    check_room,
    generate_batch,
    generation_mode,
    truncation,
)

logger = logging.getLogger(__name__)


class SampleGenerations(L.Callback):
    """Answer a few fixed validation questions at every validation, and once before training.

    Generation runs on rank zero in ``eval()`` mode under ``inference_mode`` with the KV cache on and
    gradient checkpointing off; afterwards the training state (mode, checkpointing, cache flag, RNG
    states) is restored exactly, so training continues as if nothing had happened. Under FSDP2 every rank
    generates the same answers in lockstep (a sharded model's forward needs all ranks); rank zero records.

    Args:
        num_samples: how many validation questions to answer each time.
        indices: which validation rows (positions in the validation split); ``None``: the first ones.
        generation: decoding settings (default: the model's own sampling settings, else Qwen3's; the same
            ``seed`` every round, so rounds differ only by the weights). ``sample/truncation_rate`` logs the share
            of answers cut off at ``max_new_tokens``; at fit start a warning names a ``max_new_tokens`` below the
            longest reference completion of the validation rows.
        filename: JSON-lines file in the run folder that every round is appended to.
    """

    def __init__(
        self,
        num_samples: int = 3,
        indices: list[int] | None = None,
        generation: Generation | None = None,
        filename: str = "samples.jsonl",
    ) -> None:
        self.num_samples = num_samples
        self.indices = indices
        self.generation = generation or Generation()
        self.filename = filename
        self.rounds = 0

    # -- hooks ---------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check_room(self.generation, trainer, "samples.generation")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rounds == 0:  # no baseline validation ran: generate the baseline round now
            self._round(trainer, pl_module, baseline=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._round(trainer, pl_module, baseline=self.rounds == 0 and trainer.global_step == 0)

    # -- one round -------------------------------------------------------------------------------
    def _rows(self, trainer: L.Trainer) -> list[dict]:
        rows = trainer.datamodule.val_rows.rows
        picks = self.indices if self.indices is not None else list(range(min(self.num_samples, len(rows))))
        return [rows[i] for i in picks]

    def _round(self, trainer: L.Trainer, pl_module: L.LightningModule, baseline: bool) -> None:
        # trainer.log_dir broadcasts from rank zero under DDP: every rank must ask, not only rank zero.
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero or getattr(pl_module, "fsdp_root", None) is not None:
            results = self._generate(trainer, pl_module)
            self._record(trainer, results, baseline, run_dir)  # rank zero only
        self.rounds += 1
        trainer.strategy.barrier("sample_generations")

    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict]:
        model, root = pl_module.model, getattr(pl_module, "fsdp_root", None)
        rows = self._rows(trainer)
        tokenizer = trainer.datamodule.load_tokenizer()
        prompts = build_prompts(rows, tokenizer, trainer.datamodule.hparams.system_prompt)
        with generation_mode(model, self.generation.seed, root):
            outputs = generate_batch(model, tokenizer, prompts, self.generation)
        return [{"question": r["question"], "reference": r["answer"], **o} for r, o in zip(rows, outputs)]

    @rank_zero_only
    def _record(self, trainer: L.Trainer, results: list[dict], baseline: bool, run_dir: Path) -> None:
        step, epoch = trainer.global_step, trainer.current_epoch
        rate = sum(r["well_formed"] for r in results) / max(1, len(results))
        chars = sum(len(r["answer"]) for r in results) / max(1, len(results))
        truncated, truncation_rate = truncation(results)
        metrics = {"sample/think_format_rate": rate, "sample/truncation_rate": truncation_rate,
                   "sample/answer_chars": chars}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)
            if hasattr(lg, "log_text"):  # SwanLab (CSVLogger has no text)
                texts = [f"Q: {r['question']}\n\n<think>\n{r['think']}\n</think>\n\nA: {r['answer']}\n\n"
                         f"Reference: {r['reference']}" for r in results]
                lg.log_text("samples", texts, step=step, caption=[f"step {step} #{i}" for i in range(len(texts))])
        run_dir.mkdir(parents=True, exist_ok=True)
        with (run_dir / self.filename).open("a", encoding="utf-8") as f:
            for i, r in enumerate(results):
                line = {"round": self.rounds, "baseline": baseline, "step": step, "epoch": epoch, "sample": i,
                        "think_format_rate": rate, **r}
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        logger.info("[samples] step %d: think_format_rate %.2f, %d of %d truncated at max_new_tokens=%d, answer "
                    "%.0f chars; first answer: %s", step, rate, truncated, len(results), self.generation.max_new_tokens,
                    chars, results[0]["answer"][:120].replace("\n", " ") if results else "")

    def state_dict(self) -> dict:
        return {"rounds": self.rounds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rounds = state_dict.get("rounds", 0)
