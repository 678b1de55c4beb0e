"""medsft: fine-tune Qwen3 into a medical reasoning assistant with PyTorch Lightning.

One package per stage of the pipeline, imports running one way, bottom to top: :mod:`~medsft_lightning.hub`
(where models, tokenizers and datasets come from) ← :mod:`~medsft_lightning.data` (rows to batches) ←
:mod:`~medsft_lightning.generation` (answers from a model) ← :mod:`~medsft_lightning.training` (the
LightningModule, its loss, optimizer, checkpoints and export) ← :mod:`~medsft_lightning.tools` (``medsft
memory``, ``medsft preview``) ← :mod:`medsft_lightning.cli` (the ``medsft`` command). Importing this package
imports none of them: the two public classes below load on first use, and the module paths from before the
stages (``medsft_lightning.loggers``, ``medsft_lightning.module``, …, as saved ``config.yaml`` files name
them) still import, with a warning naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import warnings

_PUBLIC = {"MedicalDataModule": "medsft_lightning.data.datamodule", "MedSFTModule": "medsft_lightning.training.module"}
__all__ = sorted(_PUBLIC)

# Where each flat module of medsft <= 0.1 now lives (medsft_lightning.data, the DataModule's module, is now the
# data package; it still answers medsft_lightning.data.MedicalDataModule).
MOVED = {
    "tiny": "hub.tiny",
    **{name: f"data.{name}" for name in ("sources", "checks", "formatting", "encoding", "encoded_cache", "sampler",
                                          "collate", "packing")},
    "decode": "generation.decode", "generate": "generation.generate", "callbacks": "generation.samples",
    "genmetrics": "generation.metrics", "predict": "generation.predict",
    **{name: f"training.{name}" for name in ("module", "loss", "optim", "lora", "sharding", "resume", "loggers",
                                              "export")},
    **{name: f"tools.{name}" for name in ("memory", "memory_settings", "memory_report", "preview")},
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``medsft_lightning.<old>`` as the module it became (the same module object, not a copy)."""

    def find_spec(self, fullname: str, path=None, target=None):
        old = fullname.removeprefix(f"{__name__}.")
        if fullname.startswith(f"{__name__}.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"{__name__}.{MOVED[spec.name.removeprefix(f'{__name__}.')]}"
        warnings.warn(f"{spec.name} moved to {new}; import (or name in class_path) the new path", FutureWarning,
                      stacklevel=2)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system sets module.__spec__ to the old name's spec
        return module

    def exec_module(self, module) -> None:
        """Nothing to run (:meth:`create_module` returned the imported module); its own spec goes back."""
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


class _TorchaoCpuNoise(logging.Filter):
    """torchao (the 8-bit optimizer's library; transformers imports it too whenever it is installed) logs on a
    CPU-only torch that its CUDA kernels cannot load (``Failed to load …/_C_mxfp8…``, ``_C_cutlass_90a``), and torch
    logs a deprecation note for enums torchao registers with pytree. Neither touches anything medsft runs: those
    lines alone are dropped (``training/optim_lowbit.py``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not (text.startswith("Failed to load") and "torchao" in str(record.args or text)
                    or "is an Enum subclass and is now natively supported by torch.compile" in text)


for _name in ("torchao", "torch.utils._pytree"):
    if not any(isinstance(f, _TorchaoCpuNoise) for f in logging.getLogger(_name).filters):
        logging.getLogger(_name).addFilter(_TorchaoCpuNoise())
