"""Export weights as a plain Hugging Face folder (model + tokenizer + generation config)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def save_hf(model, tokenizer, out_dir: str | Path) -> Path:
    """``save_pretrained`` model, tokenizer and a generation config that stops on Qwen3's end tokens.

    Written to a temporary sibling folder and renamed, so ``out_dir`` is never half-written. A LoRA
    (peft) model is saved twice: the bare adapter in ``out_dir/adapter`` and, merged into the base
    weights (in place), as the plain model that ``AutoModelForCausalLM.from_pretrained`` loads.
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
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("[export] wrote %s", out)
    return out


def load_checkpoint_weights(module, ckpt_path: str | Path) -> None:
    """Load a Lightning checkpoint's weights (no optimizer state) into a configured module."""
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)  # strict: a key mismatch must fail, not export the wrong weights


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Export any ``medsft`` checkpoint to ``out_dir`` as a Hugging Face folder."""
    from transformers import AutoTokenizer

    from medsft_lightning import hub
    from medsft_lightning.module import MedSFTModule

    hparams = torch.load(ckpt_path, map_location="cpu", weights_only=False)["hyper_parameters"]
    module = MedSFTModule(**{k: v for k, v in hparams.items() if not k.startswith("_")})
    module.configure_model()
    load_checkpoint_weights(module, ckpt_path)
    source = hub.resolve_model(hparams["model_name_or_path"], cache_dir=hparams.get("cache_dir"), tokenizer_only=True)
    return save_hf(module.model, AutoTokenizer.from_pretrained(source), out_dir)


def main(argv: list[str] | None = None) -> None:
    """``medsft export CKPT OUT_DIR``: write a checkpoint as a plain Hugging Face model folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="medsft export", description=main.__doc__)
    parser.add_argument("ckpt", help="a .ckpt written by medsft fit")
    parser.add_argument("out_dir", help="folder to write (loadable by AutoModelForCausalLM.from_pretrained)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    export_checkpoint(args.ckpt, args.out_dir)
