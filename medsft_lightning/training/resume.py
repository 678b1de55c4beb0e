"""Exact resume: checkpoints written atomically, the RNG state in every checkpoint, ``--ckpt_path last``.

Where training stands inside an epoch is kept by the DataModule (``state_dict``: epoch and micro-batches
done; the sampler skips those on resume); the optimizer, LR scheduler and loop counters by Lightning.
"""

from __future__ import annotations

import glob
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the same folder, fsync it, then rename it into place.

    A kill during saving leaves the previous checkpoint of that name whole (a rename is atomic on POSIX
    file systems); at worst a ``*.tmp-<pid>`` file stays behind, which the next save of the same name
    in this folder removes.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{target.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync(target.parent)  # the rename itself survives a power cut


def rng_state() -> dict:
    """The Python, torch CPU and CUDA RNG states (saved in every checkpoint by the LightningModule)."""
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng(state: dict | None) -> None:
    """Put back what :func:`rng_state` returned (``None``: a checkpoint from before medsft saved it)."""
    if not state:
        return
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than tensors and plain values: refused, since loading it could run code."""


def load_checkpoint_file(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """``torch.load`` a checkpoint a user handed us: ``weights_only=True`` (only tensors and plain Python values
    are unpickled, so a crafted file cannot run code) and memory-mapped (a 10 GB checkpoint with its AdamW states
    is not read into RAM to take the weights: only the tensors used are paged in)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain Python values ({first}). "
            "medsft reads every checkpoint with torch.load(weights_only=True) so that a file cannot run code; "
            "checkpoints written by medsft load this way. If you wrote this file yourself and trust it, save its "
            "state_dict and hyper_parameters as plain values") from None


def checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """What a checkpoint holds besides weights and optimizer states (loops, callbacks, DataModule state, …).

    A sharded folder keeps it in ``meta.pt`` (small); a ``.ckpt`` file is memory-mapped, so its tensors are
    not read.
    """
    path = Path(path)
    return load_checkpoint_file(path / "meta.pt" if path.is_dir() else path)


def sync_optimizer_hparams(optimizer, scheduler, lr: float, betas: tuple[float, float],
                           weight_decays: list[float]) -> list[str]:
    """Put the configured LR, betas and weight decay into an optimizer and LambdaLR restored from a checkpoint.

    Lightning restores the checkpoint's optimizer param groups (``lr``, ``initial_lr``, ``betas``,
    ``weight_decay``) and the scheduler's ``base_lrs``, so a resumed fit would keep the old values whatever
    the config says. Returns what changed, as ``"name: old → new"`` (nothing for a fresh run).
    """
    changes = []
    for group, decay in zip(optimizer.param_groups, weight_decays):
        settings = (("initial_lr", lr), ("betas", tuple(betas)), ("beta1", betas[0]), ("beta2", betas[1]),
                    ("weight_decay", decay))  # torch keeps "betas", torch-optimi "beta1"/"beta2"
        for key, value in settings:
            old = group.get(key)
            old = tuple(old) if isinstance(old, list) else old
            if key in group and old != value:
                changes.append(f"{key}: {old} → {value}")
                group[key] = value
    if scheduler is not None and list(scheduler.base_lrs) != [lr] * len(scheduler.base_lrs):
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        for group, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = lr * lam(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    return sorted(set(changes))


def align_val_check(trainer) -> str | None:
    """Move a within-epoch validation interval onto optimizer-step boundaries; a note when it moved it.

    Validation writes ``last.ckpt``. With ``val_check_interval`` 0.25, 542 micro-batches and
    ``accumulate_grad_batches`` 2, Lightning validates every 135 micro-batches, so every other checkpoint
    would land between the two micro-batches of a step (their accumulated gradient is not saved: a resume
    from it is not exact). The interval is rounded down to a multiple of the accumulation (at least one
    step), which keeps the number of validations per epoch. An interval that ends at the epoch's last
    batch is a boundary already (Lightning steps there).
    """
    every, accumulate = trainer.val_check_batch, trainer.accumulate_grad_batches
    if not isinstance(every, int) or accumulate <= 1 or every % accumulate == 0:
        return None
    if every == trainer.num_training_batches:
        return None
    trainer.val_check_batch = max(accumulate, every // accumulate * accumulate)
    return (f"[resume] validation (and its last.ckpt) every {trainer.val_check_batch} micro-batches instead of "
            f"{every}: a multiple of accumulate_grad_batches={accumulate}, so every checkpoint lands on an "
            "optimizer-step boundary")


def find_last_checkpoint(run_root: Path) -> Path | None:
    """The newest whole ``last*.ckpt`` in any ``<run_root>/version_*/checkpoints`` folder, or ``None``.

    A ``last*.ckpt`` may be a file or, under ModelParallelStrategy, a sharded checkpoint folder: shards
    plus Lightning's ``meta.pt``, written last, whose time dates the folder. A sharded save is swapped in
    by renames (:func:`swap_in_folder`); killed between them, ``last.ckpt`` is missing and its previous
    folder, whole, waits as ``last.ckpt.old-<step>``: that one counts instead. ``*.tmp-*`` never counts.
    """
    def stamp(path: Path) -> Path:
        return path / "meta.pt" if path.is_dir() else path

    found = []
    for path in Path(run_root).glob("version_*/checkpoints/last*.ckpt*"):
        base, _, tag = path.name.partition(".ckpt")
        if tag.startswith(".old-") and not is_whole(path.with_name(f"{base}.ckpt")):
            tag = ""  # the previous folder, set aside by a save that never renamed its new one into place
        if not tag and is_whole(path):
            found.append(path)
    return max(found, key=lambda p: stamp(p).stat().st_mtime, default=None)


def is_whole(path: Path) -> bool:
    """A checkpoint file, or a sharded folder with its ``meta.pt`` (rank zero writes it after all shards)."""
    return path.is_file() or (path / "meta.pt").is_file()


def clear_leftovers(target: Path) -> None:
    """Delete what interrupted saves of ``target`` left beside it: every ``<target>.tmp-*``, and the
    ``<target>.old-*`` folders once ``target`` itself is whole (until then they are the fallback)."""
    pattern = glob.escape(target.name)
    leftovers = list(target.parent.glob(f"{pattern}.tmp-*"))
    if is_whole(target):
        leftovers += target.parent.glob(f"{pattern}.old-*")
    for path in leftovers:
        _remove(path)


def swap_in_folder(tmp: Path, target: Path, tag: str) -> None:
    """Put the finished checkpoint folder ``tmp`` in place of ``target``; rank zero calls it, after all
    ranks wrote into ``tmp``.

    The previous ``target`` is renamed aside to ``<target>.old-<tag>``, ``tmp`` renamed to ``target``, the
    folder fsynced, then the old one deleted. A kill at any point leaves a whole checkpoint under
    ``target`` or, between the two renames, under ``<target>.old-<tag>`` (:func:`find_last_checkpoint`).
    """
    for path in [*tmp.iterdir(), tmp]:  # the shards are fsynced by torch.distributed.checkpoint; meta.pt not
        _fsync(path)
    if target.exists() or target.is_symlink():
        os.replace(target, target.with_name(f"{target.name}.old-{tag}"))
    os.replace(tmp, target)
    _fsync(target.parent)
    clear_leftovers(target)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
