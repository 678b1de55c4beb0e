"""A model to talk to or compare, from whatever the user names: ``medsft chat/webchat/compare``'s MODEL.

- an exported folder (``runs/…/hf_model``) or any local Hugging Face model folder;
- a ``.ckpt`` written by ``medsft fit`` (or a sharded FSDP2 checkpoint folder): its weights in the base model
  its hyperparameters name (:func:`~medsft_lightning.training.export.model_from_checkpoint`);
- ``medsft:tiny-qwen3``, a ModelScope id ``owner/name`` or an ``hf://owner/name`` id (downloaded, or taken
  from the download cache).

Every failure is a :class:`ModelError` naming what was given and why it cannot load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class ModelError(ValueError):
    """MODEL names nothing loadable: no such file or folder, not a model folder, a checkpoint that does not fit."""


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer; ``name``: what the user gave; ``source``: where it loaded from."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str


def looks_like_path(name: str) -> bool:
    """A name meant as a local path, not a hub id: ``./x``, ``/x``, ``~/x``, ``runs/a/b`` (more than one
    slash), or one ending in ``.ckpt``. A hub id is ``owner/name`` (one slash)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".ckpt") or "\\" in name


def load_model(name: str, *, flag: str = "MODEL", dtype: torch.dtype | None = None, device: str = "cpu",
               cache_dir: str | None = None, revision: str | None = None) -> LoadedModel:
    """Load ``name`` (see the module docstring) for generation: eval mode, KV cache on, on ``device``.

    Args:
        name: the model as the user gave it.
        flag: how the user gave it, for error messages (``MODEL``, ``--compare``, ``--base``).
        dtype: weights' dtype; ``None``: fp32 on CPU (bf16 matmuls are slow on most CPUs), else the
            checkpoint's or folder's own dtype.
        device: ``cpu``, ``cuda``, ``cuda:1``, …
        cache_dir: the hub's download cache (``None``: the hub's default).
        revision: branch, tag or commit of a hub id (a run's ``model.model_revision``); ignored for local paths.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medsft_lightning.training.checkpoints import UnsafeCheckpointError, is_sharded_checkpoint
    from medsft_lightning.training.export import CheckpointMismatchError, model_from_checkpoint

    path = Path(name).expanduser()
    if looks_like_path(name) and not path.exists():
        raise ModelError(f"{flag}={name!r}: no such file or folder (give an exported hf_model folder, a .ckpt, "
                         "or a hub id such as Qwen/Qwen3-1.7B)")
    want = dtype if dtype is not None else (torch.float32 if device == "cpu" else None)
    try:
        if path.is_file() or is_sharded_checkpoint(path):
            model, source = model_from_checkpoint(path)
            model = model.to(want) if want is not None else model
            tokenizer = AutoTokenizer.from_pretrained(source)
        else:
            if path.is_dir() and not (path / "config.json").is_file():
                raise ModelError(f"{flag}={name!r}: {path} holds no config.json, so it is not a model folder "
                                 "(an exported run's is <run>/hf_model)")
            source = _resolve(name, flag, cache_dir, revision)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=want if want is not None else "auto")
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (UnsafeCheckpointError, CheckpointMismatchError) as err:
        raise ModelError(f"{flag}={name!r}: {err}") from None
    except OSError as err:  # transformers' "not a valid model folder / no such repo" family
        raise ModelError(f"{flag}={name!r}: cannot load it ({str(err).splitlines()[0]})") from None
    model.to(device).eval()
    model.config.use_cache = True
    logger.info("[model] %s: %s, %.1fM parameters, %s", flag, source, sum(p.numel() for p in model.parameters()) / 1e6,
                next(model.parameters()).dtype)
    return LoadedModel(model, tokenizer, name, str(source))


def _resolve(name: str, flag: str, cache_dir: str | None, revision: str | None) -> str:
    """A local folder for ``name``; a failed download (offline, no such repo) becomes one :class:`ModelError`."""
    from medsft_lightning import hub

    try:
        return hub.resolve_model(name, revision=revision, cache_dir=cache_dir, local_first=True)
    except Exception as err:  # ModelScope's and huggingface_hub's errors share no base class
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelError(f"{flag}={name!r}: not a local file or folder, and fetching it as a hub id failed "
                         f"({type(err).__name__}: {first})") from None
