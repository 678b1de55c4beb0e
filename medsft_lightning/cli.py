"""``medsft``: LightningCLI for fit / validate / test / predict, plus ``medsft tiny``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

from medsft_lightning.callbacks import SampleGenerations
from medsft_lightning.data import MedicalDataModule
from medsft_lightning.encoding import TemplateError
from medsft_lightning.genmetrics import GenerationMetrics
from medsft_lightning.loggers import MedSwanLabLogger
from medsft_lightning.module import MedSFTModule
from medsft_lightning.packing import ROW_MASK_ATTENTION
from medsft_lightning.predict import AnswerWriter
from medsft_lightning.resume import AtomicCheckpointIO, checkpoint_metadata, find_last_checkpoint
from medsft_lightning.sharding import prepare_fsdp2
from medsft_lightning.sources import DataError

EXTRA_COMMANDS = {
    "tiny": "medsft_lightning.tiny",
    "export": "medsft_lightning.export",
    "memory": "medsft_lightning.memory",
    "preview": "medsft_lightning.preview",
}


class ConfigError(ValueError):
    """One or more config values that cannot work; the message lists each with its fix."""


def check_config(cfg) -> list[str]:
    """Problems in a parsed subcommand config, each naming the flag, its value and the fix."""
    problems = []
    data, model, trainer = cfg.get("data", {}), cfg.get("model", {}), cfg.get("trainer", {})

    def need(ok: bool, flag: str, value, fix: str) -> None:
        if not ok:
            problems.append(f"--{flag}={value!r}: {fix}")

    need(data.get("max_length", 2) >= 16, "data.max_length", data.get("max_length"), "use at least 16 tokens")
    need(data.get("batch_size", 1) >= 1, "data.batch_size", data.get("batch_size"), "use 1 or more")
    need(0 < data.get("val_fraction", 0.1) < 1, "data.val_fraction", data.get("val_fraction"),
         "use a fraction strictly between 0 and 1")
    need(model.get("learning_rate", 1) > 0, "model.learning_rate", model.get("learning_rate"), "use a positive LR")
    need(0 <= model.get("warmup_ratio", 0) < 1, "model.warmup_ratio", model.get("warmup_ratio"), "use [0, 1)")
    attn = str(model.get("attn_implementation", "sdpa"))
    need(data.get("batching") != "pack" or attn in ROW_MASK_ATTENTION or "flash" in attn,
         "model.attn_implementation", attn, "data.batching=pack needs sdpa, eager, flex_attention or a flash-attention "
         "implementation (the others would let packed examples see each other); or use data.batching=group_by_length")
    precision = str(trainer.get("precision"))
    need(not (trainer.get("accelerator") == "cpu" and precision.startswith(("bf16", "16"))),
         "trainer.precision", precision,
         "half precision on CPU is ~200x slower than fp32 here; use 32-true on CPU, bf16-true on GPU")
    return problems


class MedSFTCLI(LightningCLI):
    """LightningCLI with medsft's argument links, config checks and run-folder wiring."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(MedSFTModule, MedicalDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.model_revision", "data.tokenizer_revision")
        parser.link_arguments("model.cache_dir", "data.cache_dir")
        # The WindowBatchSampler shards rows across ranks itself (see sampler.py).
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        parser.add_lightning_class_args(SampleGenerations, "samples")
        parser.add_lightning_class_args(GenerationMetrics, "gen_metrics")
        parser.add_lightning_class_args(AnswerWriter, "predict_writer")
        parser.add_argument(
            "--export", type=bool, default=True,
            help="fit: at the end, save the best checkpoint's weights as a Hugging Face folder <run>/hf_model",
        )
        parser.add_argument(
            "--baseline_validation", type=bool, default=True,
            help="fit: validate once before the first step, so metrics.csv starts from the untrained model",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        problems = check_config(cfg)
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))

    def _wire_run_folder(self) -> None:
        """SwanLab's files go inside the run folder of the first (CSV) logger."""
        loggers = self.trainer.loggers
        csv = next((lg for lg in loggers if isinstance(lg, CSVLogger)), None)
        for lg in loggers:
            if isinstance(lg, MedSwanLabLogger) and csv is not None:
                lg.set_log_dir(f"{csv.log_dir}/swanlog")

    def _resolve_last(self) -> None:
        """``--ckpt_path last``: the newest last.ckpt of any earlier version of this run (the CSV logger's
        ``save_dir/name``); Lightning itself would only look in the new, empty version folder."""
        init = self.config_init[self.subcommand]
        if init.get("ckpt_path") != "last":
            return
        csv = next((lg for lg in self.trainer.loggers if isinstance(lg, CSVLogger)), None)
        root = Path(csv.root_dir) if csv is not None else Path(self.trainer.default_root_dir)
        found = find_last_checkpoint(root)
        if found is None:
            raise ConfigError(f"--ckpt_path='last': no last.ckpt under {root}/version_*/checkpoints; "
                              "pass the checkpoint's path, or fit without --ckpt_path")
        init["ckpt_path"] = self.config[self.subcommand]["ckpt_path"] = str(found)
        rank_zero_info(f"[resume] --ckpt_path last → {found}")

    def _restore_data_position(self) -> None:
        """Strategies that restore a checkpoint only after their setup (ModelParallelStrategy) build the training
        dataloader before that (configure_optimizers counts the steps for the LR schedule), so its sampler would
        start the epoch from the beginning: give the DataModule its checkpointed position first."""
        ckpt = self.config_init[self.subcommand].get("ckpt_path")
        if not ckpt or not self.trainer.strategy.restore_checkpoint_after_setup or not Path(ckpt).exists():
            return
        key = type(self.datamodule).__qualname__  # where Lightning keeps a DataModule's state_dict
        state = checkpoint_metadata(ckpt).get(key)
        if state is not None:
            self.datamodule.load_state_dict(state)

    def _fsdp2_setup(self) -> None:
        """ModelParallelStrategy (FSDP2): the strategy's adjustments (:func:`~medsft_lightning.sharding.prepare_fsdp2`)
        and a word on the generating callbacks, which run on every rank in lockstep (see callbacks.py)."""
        if not prepare_fsdp2(self.trainer):
            return
        generating = [type(cb).__name__ for cb in self.trainer.callbacks if isinstance(cb, SampleGenerations)
                      or (isinstance(cb, GenerationMetrics) and cb.num_rows > 0)]
        if generating:
            rank_zero_info(f"[fsdp2] {' and '.join(generating)}: every rank generates the same answers in lockstep "
                           "(the root unit gathered, each layer gathered at every token); rank zero records them")

    def before_fit(self) -> None:
        self._wire_run_folder()
        self._resolve_last()
        self._restore_data_position()
        self._fsdp2_setup()
        # A kill while saving must leave the previous checkpoint usable: write aside, then rename. Single files
        # here; sharded folders (torch.distributed.checkpoint, without the CheckpointIO) in AtomicModelParallelStrategy.
        self.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        cfg = self.config[self.subcommand]
        if cfg.get("baseline_validation") and not cfg.get("ckpt_path"):
            self.trainer.validate(self.model, datamodule=self.datamodule)

    def after_fit(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks before rank zero goes on alone
        if not self.config[self.subcommand].get("export"):
            return
        from medsft_lightning.export import export_sharded, load_checkpoint_weights, save_hf

        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        if self.model.fsdp_root is not None:  # FSDP2: every rank takes part in loading and gathering the weights
            export_sharded(self.trainer, self.model, self.trainer.strategy.broadcast(best), f"{log_dir}/hf_model")
            return
        if not self.trainer.is_global_zero:
            return
        if best:
            load_checkpoint_weights(self.model, best)
        out = save_hf(self.model.model, self.datamodule.load_tokenizer(), f"{log_dir}/hf_model")
        rank_zero_info(f"[export] {'best' if best else 'final'} weights → {out}")

    def before_validate(self) -> None:
        self._wire_run_folder()
        self._fsdp2_setup()

    before_test = before_predict = before_validate


def cli_main(args: list[str] | None = None) -> None:
    """Console entry point."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in EXTRA_COMMANDS:
        import importlib

        importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(argv[1:])
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        MedSFTCLI(args=argv)
    except (ConfigError, DataError, TemplateError, FileNotFoundError) as err:
        sys.exit(f"medsft: error: {err}")
    close_process_groups()


def close_process_groups() -> None:
    """After a finished multi-process run, destroy its process groups while Python is still whole. Left to
    interpreter shutdown, gloo's worker threads can abort a process that has done everything right (SIGABRT,
    "terminate called without an active exception"; seen after 1 of ~10 FSDP2 runs on CPU, whose device mesh
    adds groups)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli_main()
