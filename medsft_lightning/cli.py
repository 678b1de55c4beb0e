"""``medsft``: LightningCLI for fit / validate / test / predict, plus ``medsft tiny``."""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

from medsft_lightning.data.datamodule import MedicalDataModule
from medsft_lightning.data.encoding import TemplateError
from medsft_lightning.data.packing import ROW_MASK_ATTENTION
from medsft_lightning.data.sources import DataError
from medsft_lightning.generation.metrics import GenerationMetrics
from medsft_lightning.generation.predict import AnswerWriter
from medsft_lightning.generation.samples import SampleGenerations
from medsft_lightning.generation.vllm_engine import VllmEngineError, add_vllm_arguments, setup_engine
from medsft_lightning.tools.doctor import check_fit_export
from medsft_lightning.tools.vllm_env import vllm_python
from medsft_lightning.training.checkpoints import (
    AtomicCheckpointIO,
    UnsafeCheckpointError,
    checkpoint_metadata,
    find_last_checkpoint,
    is_whole,
    load_checkpoint_weights,
)
from medsft_lightning.training.loggers import MedSwanLabLogger
from medsft_lightning.training.module import MedSFTModule
from medsft_lightning.training.optim_choice import problems as optimizer_problems
from medsft_lightning.training.sharding import prepare_fsdp2

EXTRA_COMMANDS = {
    "tiny": "medsft_lightning.hub.tiny",
    "export": "medsft_lightning.training.export",
    "memory": "medsft_lightning.tools.memory_report",
    "preview": "medsft_lightning.tools.preview",
    "compare": "medsft_lightning.tools.compare",
    "eval": "medsft_lightning.tools.eval",
    "webchat": "medsft_lightning.tools.webchat",
    "chat": "medsft_lightning.tools.chat",
    "serve": "medsft_lightning.tools.serve",
    "doctor": "medsft_lightning.tools.doctor",
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
    need(0 <= data.get("no_think_share", 0) <= 1, "data.no_think_share", data.get("no_think_share"), "use [0, 1]")
    need(model.get("learning_rate", 1) > 0, "model.learning_rate", model.get("learning_rate"), "use a positive LR")
    need(0 <= model.get("warmup_ratio", 0) < 1, "model.warmup_ratio", model.get("warmup_ratio"), "use [0, 1)")
    accumulate, every = trainer.get("accumulate_grad_batches") or 1, trainer.get("val_check_interval")
    if isinstance(every, int) and not isinstance(every, bool) and accumulate > 1 and every % accumulate:
        need(False, "trainer.val_check_interval", every,
             f"validation (and the last.ckpt it writes) would land inside an accumulation window of {accumulate} "
             f"micro-batches; use a multiple of accumulate_grad_batches, e.g. "
             f"{max(accumulate, every // accumulate * accumulate)}, or a fraction of the epoch (rounded for you)")
    need(not (isinstance(every, str) and accumulate > 1), "trainer.val_check_interval", every,
         "a time-based interval validates (and checkpoints) between micro-batches; with accumulate_grad_batches > 1 "
         "use a fraction of the epoch or a number of micro-batches")
    need(cfg.get("weights_only") is not False, "weights_only", False,
         "medsft loads checkpoints with torch.load(weights_only=True) only, so that a checkpoint cannot run code")
    attn = str(model.get("attn_implementation", "sdpa"))
    need(data.get("batching") != "pack" or attn in ROW_MASK_ATTENTION or "flash" in attn,
         "model.attn_implementation", attn, "data.batching=pack needs sdpa, eager, flex_attention or a flash-attention "
         "implementation (the others would let packed examples see each other); or use data.batching=group_by_length")
    precision = str(trainer.get("precision"))
    need(not (trainer.get("accelerator") == "cpu" and precision.startswith(("bf16", "16"))),
         "trainer.precision", precision,
         "half precision on CPU is ~200x slower than fp32 here; use 32-true on CPU, bf16-true on GPU")
    return problems + optimizer_problems(model, trainer)


class MedSFTCLI(LightningCLI):
    """LightningCLI with medsft's argument links, config checks and run-folder wiring."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(MedSFTModule, MedicalDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("model.model_revision", "data.tokenizer_revision")
        parser.link_arguments("model.cache_dir", "data.cache_dir")
        # The WindowBatchSampler shards rows across ranks itself (see data/sampler.py).
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        parser.add_lightning_class_args(SampleGenerations, "samples")
        parser.add_lightning_class_args(GenerationMetrics, "gen_metrics")
        parser.add_lightning_class_args(AnswerWriter, "predict_writer")
        add_vllm_arguments(parser)  # predict: --engine hf|vllm, --vllm_python, --vllm_batch
        parser.add_argument(
            "--export", type=bool, default=True,
            help="fit: at the end, save the best checkpoint's weights as a Hugging Face folder <run>/hf_model",
        )
        parser.add_argument(
            "--baseline_validation", type=bool, default=True,
            help="fit: validate once before the first step, so metrics.csv starts from the untrained model",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self._argv = args  # kept for _parse_ckpt_path's second parse
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """The checkpoint's saved ``model`` hyperparameters become defaults; the config files and flags win.

        LightningCLI itself parses them *over* the config, so ``predict --ckpt_path best.ckpt
        --model.generation.max_new_tokens 2048`` would decode with the saved value and ``fit --ckpt_path last
        --model.learning_rate …`` would keep the old LR. Here the arguments are parsed again with the saved
        values as defaults (a checkpoint still supplies what the command line leaves out, e.g. the model), and
        every value that differs from the checkpoint's is logged.
        """
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if not path or not is_whole(Path(path)):
            return
        saved = {k: v for k, v in (checkpoint_metadata(path).get("hyper_parameters") or {}).items()
                 if not k.startswith("_")}
        if not saved:
            return
        subparser, unknown = self.parser._subcommands_action._name_parser_map[sub], []
        for key, value in saved.items():
            try:
                subparser.set_defaults({f"model.{key}": value})
            except KeyError:  # an option this version no longer has
                unknown.append(key)
        if unknown:
            rank_zero_info(f"[ckpt] {path}: saved hyperparameters that are no options now, ignored: {unknown}")
        self.parse_arguments(self.parser, self._argv)
        _log_changes({k: v for k, v in saved.items() if k not in unknown}, self.config[sub]["model"])

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            kwargs["weights_only"] = True  # Lightning's own load of --ckpt_path: tensors and plain values only
        return kwargs

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
        saved = checkpoint_metadata(found).get("hyper_parameters") or {}  # resolved only now: log what changed
        _log_changes({k: v for k, v in saved.items() if not k.startswith("_")}, self.config[self.subcommand]["model"])

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
        """ModelParallelStrategy (FSDP2): the strategy's adjustments (:func:`~medsft_lightning.training.sharding.
        prepare_fsdp2`) and a word on the generating callbacks, which run on every rank in lockstep (see
        generation/samples.py)."""
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
        from medsft_lightning.training.export import export_sharded, save_hf

        best = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        if self.model.fsdp_root is not None:  # FSDP2: every rank takes part in loading and gathering the weights
            out = export_sharded(self.trainer, self.model, self.trainer.strategy.broadcast(best), f"{log_dir}/hf_model")
            if out is not None:  # rank zero
                check_fit_export(out)
            return
        if not self.trainer.is_global_zero:
            return
        if best:
            load_checkpoint_weights(self.model, best)
        out = save_hf(self.model.model, self.datamodule.load_tokenizer(), f"{log_dir}/hf_model")
        rank_zero_info(f"[export] {'best' if best else 'final'} weights → {out}")
        check_fit_export(out)

    def before_validate(self) -> None:
        self._wire_run_folder()
        self._fsdp2_setup()
        setup_engine(self, vllm_python)  # predict --engine vllm: vLLM decodes in its own Python (vllm_engine.py)

    before_test = before_predict = before_validate


def _log_changes(saved: dict, model) -> None:
    """Log every ``model.*`` value of the parsed config that differs from the checkpoint's saved one."""
    for key, old in saved.items():
        new = _plain(model.get(key))
        if new != _plain(old):
            rank_zero_info(f"[ckpt] model.{key}: {new!r} from your config/flags, not the checkpoint's {_plain(old)!r}")


def _plain(value):
    """A parsed value (jsonargparse Namespace, tuple) as plain dicts and lists, to compare with a checkpoint's."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


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
    except (ConfigError, DataError, TemplateError, FileNotFoundError, UnsafeCheckpointError, VllmEngineError) as err:
        sys.exit(f"medsft: error: {err}")
    except pickle.UnpicklingError as err:  # Lightning's own load of --ckpt_path (weights_only=True) refused it
        sys.exit(f"medsft: error: {UnsafeCheckpointError.__name__}: the checkpoint holds objects other than tensors "
                 f"and plain values, and loading it could run code: refused ({str(err).splitlines()[0]})")
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
