"""Export weights as a plain Hugging Face folder (model + tokenizer + generation config)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from medsft_lightning.training.checkpoints import UnsafeCheckpointError, read_checkpoint

logger = logging.getLogger(__name__)


def save_hf(model, tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` model, tokenizer and a generation config that stops on Qwen3's end tokens.

    Written to a temporary sibling folder and renamed, so ``out_dir`` is never half-written. A LoRA
    (peft) model is saved twice: the bare adapter in ``out_dir/adapter`` and, merged into the base
    weights (in place), as the plain model that ``AutoModelForCausalLM.from_pretrained`` loads. The
    weights keep their dtype (a ``bf16-true`` run exports bf16), and ``config.json`` names it both as
    ``dtype`` (transformers 5) and ``torch_dtype`` (what older transformers and tools built on them read).
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(tmp / "adapter")
        model = model.merge_and_unload()
    stop = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = True
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _name_dtype(tmp / "config.json", next(model.parameters()).dtype)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("[export] wrote %s", out)
    return out


def _name_dtype(config_file: Path, dtype: torch.dtype) -> None:
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def export_sharded(trainer, module, ckpt_path: str, out_dir: str | Path) -> Path | None:
    """Export an FSDP2-sharded module at the end of ``fit``; every rank must call it.

    The checkpoint's weights (``ckpt_path``; ``""``: the weights as trained) are loaded into the shards, the
    full state dict is gathered once onto rank zero's CPU, and rank zero writes a plain transformers model
    with :func:`save_hf`. Returns the folder on rank zero, ``None`` on the others.
    """
    from medsft_lightning.training.sharding import gather_full_state_dict, load_sharded_weights, unsharded_copy

    if ckpt_path:
        load_sharded_weights(module, ckpt_path)
    state = gather_full_state_dict(module.model)
    out = None
    if trainer.is_global_zero:
        plain = unsharded_copy(module.model, state)
        out = save_hf(plain, trainer.datamodule.load_tokenizer(), out_dir)
        logger.info("[export] %s weights (gathered from %d FSDP2 shards) → %s",
                    "best" if ckpt_path else "final", trainer.world_size, out)
    trainer.strategy.barrier("medsft_export")
    return out


class CheckpointMismatchError(ValueError):
    """A checkpoint that is not medsft's, or whose weights do not fit the model its hyperparameters name."""


def model_from_checkpoint(ckpt_path: str | Path):
    """``(model, tokenizer_folder)``: a medsft checkpoint's weights in a plain transformers model, in the
    checkpoint's dtype (a LoRA checkpoint: the peft model, adapters not merged).

    The checkpoint holds every weight, so the base model it names (``hyper_parameters.model_name_or_path``)
    contributes only its ``config.json``, generation config and tokenizer: taken from a local folder, medsft's
    tiny model, or the hub's download cache, and downloaded (without weights) only when not cached.

    Raises:
        CheckpointMismatchError: not a medsft checkpoint, or its weights do not fit that base model's config.
    """
    from transformers import AutoConfig, GenerationConfig

    from medsft_lightning import hub
    from medsft_lightning.training.lora import LoraSettings, apply_lora
    from medsft_lightning.training.module import as_dataclass
    from medsft_lightning.training.sharding import skeleton

    checkpoint = read_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if "model_name_or_path" not in hparams or "state_dict" not in checkpoint:
        raise CheckpointMismatchError(f"{ckpt_path}: not a medsft checkpoint (no state_dict, or no model_name_or_path "
                                      "in its hyper_parameters); give a .ckpt written by medsft fit")
    source = hub.resolve_model(hparams["model_name_or_path"], revision=hparams.get("model_revision"),
                               cache_dir=hparams.get("cache_dir"), tokenizer_only=True, local_first=True)
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    dtype = max(set(floats), key=floats.count)  # the training dtype (bf16 for bf16-true)
    model = skeleton(AutoConfig.from_pretrained(source), dtype)
    if (Path(source) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    if hparams.get("lora"):  # a dict as LightningCLI saves it
        model = apply_lora(model, as_dataclass(LoraSettings, hparams["lora"]))
    _check_fits(model, state, f"{ckpt_path} (base model {hparams['model_name_or_path']}, config from {source})")
    model.load_state_dict(state)  # strict: a key mismatch must fail, not export the wrong weights
    logger.info("[export] %s: %d weights in %s (%s)", ckpt_path, len(state), dtype, hparams["model_name_or_path"])
    return model, source


def _check_fits(model, state: dict, where: str) -> None:
    """One clear error naming the first weights that do not fit, instead of torch's list of every key."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and not k.endswith("lm_head.weight"))
    unexpected = sorted(k for k in state if k not in expected)
    shapes = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(expected[k].shape)} in the model" for k, v in
              state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    problems = shapes[:3] + [f"missing {missing[:3]}"] * bool(missing)
    problems += [f"unexpected {unexpected[:3]}"] * bool(unexpected)
    if problems:
        raise CheckpointMismatchError(f"{where}: the checkpoint's weights do not fit the model: "
                                      + "; ".join(problems))


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Export any ``medsft`` checkpoint to ``out_dir`` as a Hugging Face folder, in the checkpoint's dtype
    (:func:`model_from_checkpoint`)."""
    from transformers import AutoTokenizer

    model, source = model_from_checkpoint(ckpt_path)
    return save_hf(model, AutoTokenizer.from_pretrained(source), out_dir)


def main(argv: list[str] | None = None) -> None:
    """``medsft export CKPT OUT_DIR``: write a checkpoint as a plain Hugging Face model folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="medsft export", description=main.__doc__)
    parser.add_argument("ckpt", help="a .ckpt written by medsft fit, or a sharded checkpoint folder (FSDP2)")
    parser.add_argument("out_dir", help="folder to write (loadable by AutoModelForCausalLM.from_pretrained)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export_checkpoint(args.ckpt, args.out_dir)
    except (UnsafeCheckpointError, CheckpointMismatchError, FileNotFoundError) as err:
        sys.exit(f"medsft export: error: {err}")
